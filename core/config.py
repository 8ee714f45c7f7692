"""The experiment description: YAML validated into typed pydantic models.

Every key is declared here; unknown keys, wrong types and impossible
combinations are `ConfigError`s naming the key path and the fix (the CLI prints
them in a few lines, exit code 2). Defaults follow the seed paper's protocol
(§2 Training: LoRA q,k,v,o r=32 α=64 dropout 0, effective batch 32, cosine,
5% warmup, wd 0.01, clip 1.0, bf16, seed 42, LR 5e-6 and DPO 10x smaller).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Protocol, Union

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .config_base import Strict
# The tracking schema lives in its own module; its types are imported from here too.
from .config_tracking import (  # noqa: F401  (re-exported)
    SQL_STORE_NEEDS,
    MlflowCfg,
    TrackingCfg,
    WandbCfg,
    mlflow_store_kind,
)
from .errors import ConfigError


class LossCatalogue(Protocol):
    """What config validation asks of the loss registry (train/losses.py,
    passed in by the loader, core/config.py): the ground floor names no stage."""

    def loss_names(self, *, online: bool | None = None) -> tuple[str, ...]: ...

    def hyper_problems(self, name: str, variant: str | None, hyper: Any) -> list[tuple[str, str]]: ...


def _catalogue(info: ValidationInfo | None) -> LossCatalogue | None:
    return (info.context or {}).get("losses") if info is not None else None


def _known_losses(cat: LossCatalogue | None, names, where: str = "") -> None:
    if cat is None:  # a run's saved config, validated when the run started
        return
    valid = cat.loss_names()
    bad = [x for x in names if x not in valid]
    if bad:
        raise ValueError(f"{where + ': ' if where else ''}unknown loss(es) {bad}; valid: {', '.join(valid)}")


class ModelCfg(Strict):
    # An alias (`smollm2-135m-instruct`, `tiny-qwen3`), an HF hub id or a local folder.
    name: str = "smollm2-135m-instruct"
    # Weights dtype for training; vLLM engines use `rollouts.dtype`.
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    max_model_len: int = Field(1024, gt=0)


#: Where prompts can come from (rollouts/datasets.py reads each).
Source = Literal["synthetic", "deepscaler", "gsm8k", "aime", "jsonl", "parquet"]


class _PromptSource(Strict):
    """The fields a set of prompts is drawn by, for training and eval alike."""

    source: Source = "synthetic"
    # For hub/local sources: a hub dataset id or a local .parquet/.jsonl file.
    path: Optional[str] = None
    # Column mapping, e.g. {problem: question, answer: answer}.
    columns: dict[str, str] = Field(default_factory=dict)
    # Synthetic generator: family/difficulty of the arithmetic problems.
    family: str = "add_single_digit"
    n_prompts: int = Field(64, gt=0)


class DataCfg(_PromptSource):
    """Where the training prompts come from (seed §2 Data)."""

    split: str = "train"
    seed: int = 0
    system_prompt: Optional[str] = None
    instruction: str = "Put the final answer in \\boxed{}."


class EvalSetCfg(_PromptSource):
    name: str
    split: str = "test"
    seed: int = 1


class EndpointCfg(Strict):
    """An OpenAI-compatible teacher (the seed's teacher is an API model)."""

    base_url: str
    model: str
    api_key_env: Optional[str] = None
    concurrency: int = Field(8, gt=0)
    max_retries: int = Field(3, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    # "chat": /chat/completions with messages (any OpenAI-compatible server; the
    # server applies its own template). "completions": /completions with the
    # policy's chat-templated text, so prompt_text is exactly what was sent.
    api: Literal["chat", "completions"] = "chat"


class RolloutsCfg(Strict):
    # "scripted": procedurally written solutions with a set error rate
    # (rollouts/scripted.py), for settings where the policy gets nothing right.
    backend: Literal["vllm", "openai", "scripted"] = "vllm"
    scripted_error_rate: float = Field(0.5, ge=0, le=1)
    # Teacher model; None = the policy model (`model.name`).
    teacher: Optional[str] = None
    endpoint: Optional[EndpointCfg] = None
    k: int = Field(4, gt=0, description="samples per prompt (seed: K=4)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Engines: an int, or "auto" (GPUs on a cluster, 1 per box on CPU).
    num_engines: Union[int, Literal["auto"]] = "auto"
    cpus_per_engine: float = Field(1.0, gt=0)
    gpus_per_engine: float = Field(0.0, ge=0)
    # false: compiled engines (+10-15% tok/s on CPU; CUDA graphs on GPU), their
    # compile cache kept per node. On CPU, eval and online engines stay eager
    # (docs/rollouts.md, "Compiled engines").
    enforce_eager: bool = True
    seed: int = 0
    shard_size: int = Field(64, gt=0)
    max_pairs_per_prompt: int = Field(1, gt=0)
    reward_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _endpoint_needed(self):
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("rollouts.backend is 'openai' but rollouts.endpoint is missing: "
                             "add endpoint: {base_url: ..., model: ...}")
        return self


class LoraCfg(Strict):
    r: int = Field(32, gt=0)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False


class DeepSpeedCfg(Strict):
    enabled: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2


class TrainCfg(Strict):
    lora: LoraCfg = Field(default_factory=LoraCfg)
    effective_batch: int = Field(32, gt=0)
    per_device_batch: int = Field(8, gt=0)
    grad_accum: int = Field(4, gt=0)
    num_workers: int = Field(1, gt=0)
    max_steps: int = Field(1500, gt=0)
    checkpoint_steps: list[int] = Field(default_factory=lambda: [1000, 1500])
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # "auto": bf16 autocast where the hardware has it (GPU), fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_seq_len: int = Field(512, gt=0)
    # Recompute each decoder layer's activations in the backward pass: a paper
    # cell peaks at 19 instead of 61 GiB for 1.4-1.8x the step time (measured
    # on an H200, docs/benchmarks.gpu.md).
    gradient_checkpointing: bool = False
    deepspeed: DeepSpeedCfg = Field(default_factory=DeepSpeedCfg)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=0)
    # Extra resume-only checkpoints (optimizer/RNG state, no adapter folder)
    # every N steps; 0 = only at checkpoint_steps and the last step.
    resume_every: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_lr(cls, data):
        if isinstance(data, dict) and "lr" in data:
            raise ValueError("lr is not read by anything: a cell's learning rate comes from grid.lrs "
                             "(and losses.<name>.lrs / lr_scale); remove train.lr")
        return data

    @model_validator(mode="after")
    def _batch_and_steps(self):
        got = self.per_device_batch * self.grad_accum * self.num_workers
        if got != self.effective_batch:
            raise ValueError(
                f"train.effective_batch={self.effective_batch} but per_device_batch x grad_accum x "
                f"num_workers = {self.per_device_batch} x {self.grad_accum} x {self.num_workers} = {got}; "
                "make them agree (e.g. change train.grad_accum)")
        bad = [s for s in self.checkpoint_steps if s <= 0 or s > self.max_steps]
        if bad:
            raise ValueError(f"train.checkpoint_steps {bad} lie outside 1..max_steps={self.max_steps}; "
                             "lower them or raise train.max_steps")
        if sorted(set(self.checkpoint_steps)) != list(self.checkpoint_steps):
            raise ValueError("train.checkpoint_steps must be strictly increasing without repeats")
        return self


class LossCfg(Strict):
    """Per-loss settings: variant, keyword hyperparameters, LR rules."""

    variant: Optional[str] = None
    hyper: dict[str, Any] = Field(default_factory=dict)
    # Explicit LR list for this loss (overrides grid.lrs x lr_scale).
    lrs: Optional[list[float]] = None
    # Multiplier on the grid LRs (the seed's DPO convention: 0.1).
    lr_scale: float = Field(1.0, gt=0)

    @field_validator("lrs")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(x <= 0 for x in v):
            raise ValueError(f"learning rates must be > 0, got {v}")
        return v


class OnlineCfg(Strict):
    """On-policy cells (online_grpo / online_dapo), seed §3.4."""

    group_size: int = Field(8, gt=1, description="G samples per prompt from the current policy")
    prompts_per_step: int = Field(4, gt=0)
    sync: Literal["auto", "lora", "merged"] = "auto"
    colocate: bool = True
    max_resample_rounds: int = Field(4, ge=0)
    overlong_buffer: int = Field(32, ge=0)
    overlong_penalty: float = Field(1.0, ge=0)
    # DAPO overlong filtering: truncated samples (finish_reason "length") get no loss.
    overlong_filter: bool = True
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(128, gt=0)
    engine_cpus: float = Field(1.0, gt=0)
    engine_gpus: float = Field(0.0, ge=0)


class ExtraCell(Strict):
    loss: str
    seed: int
    lr: float = Field(gt=0)
    # Either seed alone (the other stays `seed`): a control cell by hand.
    init_seed: Optional[int] = None
    data_seed: Optional[int] = None


class ControlsCfg(Strict):
    """Cheap control cells that measure noise floors (docs/findings.md): for
    each control loss and each (seed, LR) of the grid, one cell per entry
    that differs from the grid cell in ONE factor only: the LoRA-init seed,
    the data-order seed, or the LR (times a factor). The seed paper shows the
    init seed alone rotates dW more than the loss does (§3.4)."""

    # Default: [analysis.reference_loss] when any control is asked for.
    losses: Optional[list[str]] = None
    init_seeds: list[int] = Field(default_factory=list)
    data_seeds: list[int] = Field(default_factory=list)
    lr_factors: list[float] = Field(default_factory=list)
    # Horizon controls: the same cell on a shorter schedule, train.max_steps x
    # this fraction, its LR schedule ending there (e.g. [0.75]). A claim is
    # settled only if such a cell's final ΔW matches the full one's: a cosine
    # schedule freezes ΔW near its end whatever the data (docs/findings.md).
    horizons: list[float] = Field(default_factory=list)

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v):
        if any(not 0 < x < 1 for x in v):
            raise ValueError(f"grid.controls.horizons must lie strictly between 0 and 1 (fractions of "
                             f"train.max_steps, e.g. [0.75]), got {v}")
        return v

    @field_validator("lr_factors")
    @classmethod
    def _factors(cls, v):
        if any(x <= 0 or x == 1 for x in v):
            raise ValueError(f"grid.controls.lr_factors must be > 0 and != 1, got {v}")
        return v

    @property
    def any(self) -> bool:
        return bool(self.init_seeds or self.data_seeds or self.lr_factors or self.horizons)


class GridCfg(Strict):
    # The seed paper's six offline methods (§2 Methods), in the registry's order.
    losses: list[str] = Field(default_factory=lambda: ["sft", "rft", "dft", "rift", "offline_grpo", "dpo"])
    seeds: list[int] = Field(default_factory=lambda: [42])
    lrs: list[float] = Field(default_factory=lambda: [5e-6])
    extra_cells: list[ExtraCell] = Field(default_factory=list)
    controls: ControlsCfg = Field(default_factory=ControlsCfg)

    @field_validator("losses")
    @classmethod
    def _known(cls, v, info: ValidationInfo):
        _known_losses(_catalogue(info), v)
        if len(set(v)) != len(v):
            raise ValueError(f"grid.losses has repeats: {v}")
        return v

    @field_validator("lrs")
    @classmethod
    def _lr_pos(cls, v):
        if not v or any(x <= 0 for x in v):
            raise ValueError(f"grid.lrs must be a non-empty list of values > 0, got {v}")
        return v


class ResourcesCfg(Strict):
    # Upper bound on cells running at once; None = as many as resources allow.
    max_concurrent_cells: Optional[int] = Field(None, gt=0)
    ray_address: Optional[str] = None
    # Cells that fit one CPU worker train in turn in long-lived grid worker
    # processes (base model and engine loaded once per worker; train/shared.py);
    # false: a fresh Ray Train worker group per cell. Adapters are the same.
    share_workers: bool = True


class StorageCfg(Strict):
    # Where runs go when `--run` is not given: <runs_root>/<name>-<hash8>.
    runs_root: str = "runs"


class AnalysisCfg(Strict):
    top_k: int = Field(10, gt=0)
    # Which checkpoints to analyse: "all", "last" or a list of steps.
    steps: Union[Literal["all", "last"], list[int]] = "all"
    # Of those, which eval and the functional stage serve as models (each costs
    # a model load and forwards; geometry is cheap): same choices.
    model_steps: Union[Literal["all", "last"], list[int]] = "all"
    reference_loss: str = "sft"
    eval_sets: list[EvalSetCfg] = Field(default_factory=lambda: [EvalSetCfg(name="synthetic")])
    eval_max_tokens: int = Field(256, gt=0)
    lmc_alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    lmc_pairs: Union[Literal["reference", "all"], list[list[str]]] = "reference"
    lmc_items: int = Field(64, gt=0)
    cka_prompts: int = Field(32, gt=0)
    extra_adapters: dict[str, str] = Field(default_factory=dict)
    # How the eval stage serves adapters: vLLM LoRA requests ("lora"), or each
    # adapter merged into the base and reloaded ("merged": exact and full speed
    # on CPU, where the LoRA path is 8-12x slower); "auto" = merged on CPU,
    # lora on GPU.
    eval_mode: Literal["auto", "lora", "merged"] = "auto"


class ExperimentConfig(Strict):
    name: str = "wsg"
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    rollouts: RolloutsCfg = Field(default_factory=RolloutsCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    losses: dict[str, LossCfg] = Field(default_factory=dict)
    online: OnlineCfg = Field(default_factory=OnlineCfg)
    grid: GridCfg = Field(default_factory=GridCfg)
    resources: ResourcesCfg = Field(default_factory=ResourcesCfg)
    storage: StorageCfg = Field(default_factory=StorageCfg)
    analysis: AnalysisCfg = Field(default_factory=AnalysisCfg)
    # Experiment trackers (docs/tracking.md); not part of the config hash:
    # where results are mirrored does not change them.
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo):
        cat = _catalogue(info)
        _known_losses(cat, list(self.losses), "losses")
        _known_losses(cat, [c.loss for c in self.grid.extra_cells], "grid.extra_cells")
        _known_losses(cat, self.grid.controls.losses or [], "grid.controls.losses")
        # Every loss's variant and hyperparameters, online ones included, now
        # rather than when its cell starts (the message names losses.<name>.<key>).
        problems = [f"losses.{name}.{key}: {why}" for name, lc in self.losses.items()
                    for key, why in (cat.hyper_problems(name, lc.variant, lc.hyper) if cat else [])]
        if problems:
            raise ValueError("\n".join(problems))
        trained = self.grid.losses + [c.loss for c in self.grid.extra_cells]
        if self.analysis.reference_loss not in trained:
            raise ValueError(f"analysis.reference_loss={self.analysis.reference_loss!r} is not in grid.losses "
                             f"{self.grid.losses}; pick one of them")
        missing = [x for x in self.control_losses if x not in self.grid.losses]
        if missing:
            raise ValueError(f"grid.controls.losses {missing} are not in grid.losses {self.grid.losses}: a control "
                             "cell varies one factor of a grid cell; add them to grid.losses")
        return self

    @property
    def control_losses(self) -> list[str]:
        c = self.grid.controls
        if not c.any:
            return []
        return list(c.losses) if c.losses is not None else [self.analysis.reference_loss]

    def loss_cfg(self, loss: str) -> LossCfg:
        return self.losses.get(loss, LossCfg())

    def horizon_steps(self, frac: float) -> int:
        """The last step of a horizon control at `frac` of train.max_steps."""
        return max(1, int(round(self.train.max_steps * frac)))

    def for_horizon(self, steps: int | None) -> "ExperimentConfig":
        """This config with train.max_steps = steps (the LR schedule ends
        there) and the checkpoints below it plus `steps`: a horizon control
        cell's training config. None: this config itself."""
        if steps is None or steps == self.train.max_steps:
            return self
        ckpts = [s for s in self.train.checkpoint_steps if s < steps] + [steps]
        train = self.train.model_copy(update={"max_steps": steps, "checkpoint_steps": ckpts})
        return self.model_copy(update={"train": train})


def config_hash(cfg: ExperimentConfig) -> str:
    """sha256 of the canonical JSON of the resolved config (first 16 hex
    digits), `tracking` left out: changing a tracker must not make a run
    refuse to resume."""
    blob = json.dumps(cfg.model_dump(mode="json", exclude={"tracking"}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "<top level>"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' if err.error_count() > 1 else ''}):"]
    for e in err.errors():
        # Skip pydantic's union/function-name noise in the location.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        msg = e["msg"].removeprefix("Value error, ")
        if not loc and e["type"] == "value_error":  # a cross-field check names its own keys
            lines.extend(f"  {m}" for m in msg.split("\n") if m)
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?); remove it or check the spelling against `wsg config show`"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        tail = f" (got {got!r})" if e["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict) else ""
        lines.append(f"  {_loc(loc)}: {msg}{tail}")
    return "\n".join(lines)


def parse_config(data: dict | None, source: str = "<config>", *,
                 losses: LossCatalogue | None = None) -> ExperimentConfig:
    """Validate `data` into the config. `losses`: the loss registry the loss
    names, variants and hyperparameters are checked against (a user's config,
    core/config.py); None for a run's saved config, checked when it started."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data, context={"losses": losses})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, *, losses: LossCatalogue | None = None) -> ExperimentConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass a YAML file, e.g. configs/smoke.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_config(data, str(p), losses=losses)


def dump_config(cfg: ExperimentConfig) -> str:
    """Resolved config as YAML, with its hash as a leading comment."""
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return f"# wsg resolved config, hash {config_hash(cfg)}\n{body}"


def default_config_path() -> Path:
    """The embedded default (`configs/smoke.yaml`), found next to the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs" / "smoke.yaml", here / "smoke.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError("the embedded default configs/smoke.yaml was not found next to the wsg package")
