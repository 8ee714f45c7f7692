"""How wsg configures its vLLM engines, in one place: the rollout engines
(rollouts/stage.py), the evaluation engines (analysis/evaluate.py) and each
online cell's engine (train/online.py).

- LoRA ranks: vLLM accepts only some `max_lora_rank` values.
- Adapters on an engine: "auto" serves them as LoRA requests on a GPU and
  merged into the weights on a CPU, where vLLM's LoRA path is 7-12x slower
  than the base model (docs/stack.md, "vLLM"); the same rule for weight sync
  of online cells (online.sync) and for evaluation (analysis.eval_mode).
- Compilation: short-lived engines stay eager on a CPU.
"""
from __future__ import annotations

from ..core.errors import WsgError
from ..core.models import VLLM_LORA_RANKS, vllm_lora_rank  # noqa: F401  (engine rules in one place)
from .engine import EngineOptions

ADAPTER_MODES = ("auto", "lora", "merged")


def adapter_mode(mode: str, *, gpus: float, field: str) -> str:
    """How an engine with `gpus` GPUs serves adapters: "auto" → "lora" on a
    GPU, "merged" on a CPU (docs/benchmarks.online.md measures both)."""
    if mode not in ADAPTER_MODES:
        raise WsgError(f"{field}={mode!r} is not one of {', '.join(ADAPTER_MODES)}")
    if mode == "auto":
        return "lora" if gpus > 0 else "merged"
    return mode


def eager_unless_gpu(cfg, gpus: float) -> bool:
    """`enforce_eager` for the engines that live briefly: evaluation and online
    cells. On CPU they stay eager: compiling gains 10-15% sampling speed but
    costs 22-84 s per start, and a compiled graph is keyed by the weights
    folder, so every merged model of an evaluation would compile anew
    (docs/rollouts.md, "Compiled engines"). With GPUs the config decides."""
    return cfg.rollouts.enforce_eager or gpus == 0


def rollout_engine_options(cfg, model: str, **overrides) -> EngineOptions:
    """The rollout (and evaluation) engines' options from the config."""
    ro = cfg.rollouts
    kw = dict(model=model, dtype=ro.dtype, seed=ro.seed, max_model_len=cfg.model.max_model_len,
              enforce_eager=ro.enforce_eager, trust_remote_code=cfg.model.trust_remote_code,
              tensor_parallel_size=max(1, int(ro.gpus_per_engine)))
    if 0 < ro.gpus_per_engine < 1:
        # Engines sharing a GPU must each stay within their share of its memory.
        kw["gpu_memory_utilization"] = round(0.85 * ro.gpus_per_engine, 3)
    kw.update(overrides)
    return EngineOptions(**kw)


def online_engine_options(cfg, strategy: str, *, threads: int | None = None) -> EngineOptions:
    """An online cell's engine: the policy's base model (resolved by the engine
    on its own node), LoRA enabled only for LoRA sync."""
    return EngineOptions(
        model=cfg.model.name,
        dtype=cfg.rollouts.dtype, seed=cfg.rollouts.seed, max_model_len=cfg.model.max_model_len,
        enforce_eager=eager_unless_gpu(cfg, cfg.online.engine_gpus),
        enable_lora=strategy == "lora",
        max_lora_rank=vllm_lora_rank(cfg.train.lora.r) if strategy == "lora" else 16,
        trust_remote_code=cfg.model.trust_remote_code, cpu_threads=threads)
