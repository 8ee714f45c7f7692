"""The reusable pieces of a LoRA training step, and the one step every cell
runs (train/worker.py), offline or online.

- `build_policy`: base model + PEFT LoRA on the configured attention
  projections, LoRA init seeded (seed paper §2 Training).
- `CompletionLogprobs` / `sequence_logprobs`: per-token log π of completion
  tokens only. The base transformer runs once; the LM head (vocab 49k on
  SmolLM2, a large share of the step) runs on completion positions only
  (docs/stack.md "Training": 1.8x TRL's SFTTrainer with length buckets).
- `reference_logprobs`: π_ref = the same model with the adapter disabled,
  under no_grad: no second copy of the model (docs/design.md, DPO row).
- `PolicyTrainer`: AdamW on the LoRA parameters, cosine schedule with
  warmup, grad-norm clipping, gradient accumulation, and either DDP
  (ray.train.torch.prepare_model) or DeepSpeed ZeRO as the backend.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from ..core.config import ExperimentConfig
from ..core.models import load_causal_lm
from .losses import LossBatch, count_units, normaliser_from_count, required_fields


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware has it ("auto": CUDA with bf16), fp32
    otherwise; "bf16" forces it (CPU autocast too), "fp32" disables it."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


#: Frozen base models kept by a shared worker process (train/shared.py), one
#: per (model, dtype): each cell gets a copy, so the next cell of the process
#: starts from the same untouched weights without reading them again.
_BASES: dict[tuple, torch.nn.Module] = {}


def build_policy(cfg: ExperimentConfig, *, seed: int, device: torch.device | str = "cpu", keep_base: bool = False):
    """The base model with a fresh LoRA adapter; same seed → same adapter init.
    keep_base: load the base once per process and give each call a copy (a
    worker that trains many cells in turn)."""

    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    if keep_base:
        import copy

        k = (cfg.model.name, str(dtype), cfg.model.trust_remote_code)
        if k not in _BASES:
            _BASES.clear()  # one base per process: a new model replaces the old
            _BASES[k] = load_causal_lm(cfg.model.name, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        base = copy.deepcopy(_BASES[k])
    else:
        base = load_causal_lm(cfg.model.name, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    return attach_lora(base, cfg.train.lora, seed=seed, device=device,
                       gradient_checkpointing=cfg.train.gradient_checkpointing)


def attach_lora(base, lc, *, seed: int, device: torch.device | str = "cpu", gradient_checkpointing: bool = False):
    """`base` with a fresh LoRA adapter of config `lc` (cfg.train.lora), in
    train mode on `device` (bench/gpu_check.py uses it on random-weight models)."""
    from peft import LoraConfig, get_peft_model

    base.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: the frozen embeddings' outputs need no requires_grad hook,
        # and the gradient equals the plain one (tests/train/test_train_data.py).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    alpha = int(lc.alpha) if float(lc.alpha).is_integer() else float(lc.alpha)
    lora = LoraConfig(r=lc.r, lora_alpha=alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      use_rslora=lc.use_rslora, bias="none", task_type="CAUSAL_LM")
    # The LoRA A matrices are drawn from torch's global RNG: seed it right here
    # so the init depends on `seed` only (seed §3.3 disentangles seed effects).
    torch.manual_seed(seed)
    policy = get_peft_model(base, lora)
    policy.to(device)
    policy.train()
    return policy


class CompletionLogprobs(torch.nn.Module):
    """policy + a micro-batch's forwards → flat log-probs [N] of its
    completion tokens (train.data.MicroBatch explains the layout).

    A module (not a function) so DDP/DeepSpeed wrap the whole micro-batch as
    one forward, however many length groups it runs as."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, forwards):
        base = self.policy.get_base_model()
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        cap = getattr(base.config, "final_logit_softcapping", None)
        out = []
        for f in forwards:
            # Right padding + causal attention: real tokens never see the pads
            # after them, so no attention mask is needed (SDPA stays causal).
            hidden = decoder(input_ids=f.input_ids, use_cache=False).last_hidden_state
            out.append(token_logprobs(head, hidden[f.rows, f.cols], f.targets, cap))
        return torch.cat(out)


def token_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """log π(target) from the final hidden states [n, h] of the positions that
    predict the targets [n]: the LM head in float32, the model's logit
    soft-capping where it has one."""
    logits = head(hidden).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sequence_logprobs(module, mb, *, autocast: torch.dtype | None = None) -> torch.Tensor:
    """[B, T] log π of every completion token of micro-batch `mb` (0 off-mask).

    `module` is a CompletionLogprobs, possibly wrapped by DDP or DeepSpeed."""
    with _autocast(mb.mask.device, autocast):
        flat = module(mb.forwards)
    out = flat.new_zeros(tuple(mb.mask.shape))
    return out.index_put((mb.rows, mb.tpos), flat)


def reference_logprobs(module: CompletionLogprobs, mb, *, autocast: torch.dtype | None = None) -> torch.Tensor:
    """log π_ref: the same weights with the LoRA adapter disabled, no grad."""
    with torch.no_grad(), module.policy.disable_adapter():
        return sequence_logprobs(module, mb, autocast=autocast)


def lora_parameters(policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def warmup_steps(max_steps: int, warmup_frac: float) -> int:
    return int(math.ceil(warmup_frac * max_steps))


class PolicyTrainer:
    """Optimizer side of a cell for one rank.

    Loss scaling: every loss is SUM(units of a micro-batch) / (units of the
    whole global batch), so the gradient wanted is the plain SUM of the
    micro-batch gradients over micro-batches and ranks. DDP and DeepSpeed
    AVERAGE over ranks (and DeepSpeed also over accumulation steps), so
    `backward` multiplies by what they divide by."""

    def __init__(self, policy, *, lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 max_grad_norm: float, device: torch.device, world_size: int = 1, micro_per_step: int = 1,
                 units_per_micro: int = 1, autocast: torch.dtype | None = None, deepspeed_stage: int | None = None):
        from transformers import get_cosine_schedule_with_warmup

        self.policy, self.device, self.world = policy, torch.device(device), world_size
        if self.device.type == "cuda":
            # cuDNN's attention builds an execution plan for every new shape, and a
            # cell's length-grouped forwards rarely repeat one: measured on an H200
            # (bench/gpu_check.py), ~2.9 ms of CPU per attention call, most of a
            # SmolLM2 step. Flash / memory-efficient SDPA have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.max_grad_norm, self.autocast = max_grad_norm, autocast
        self.module = CompletionLogprobs(policy)
        self.deepspeed = deepspeed_stage is not None
        params = lora_parameters(policy)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

        def sched(o):
            return get_cosine_schedule_with_warmup(o, num_warmup_steps=warmup_steps, num_training_steps=max_steps)

        if self.deepspeed:
            self.engine = _deepspeed_engine(self.module, opt, sched, stage=deepspeed_stage, micro=units_per_micro,
                                            gas=micro_per_step, clip=max_grad_norm, bf16=autocast is torch.bfloat16)
            self.wrapped, self.optimizer, self.scheduler = self.engine, self.engine.optimizer, self.engine.lr_scheduler
            self.autocast = None  # DeepSpeed casts the model itself when bf16 is on
            self.scale = float(world_size * micro_per_step)
        else:
            self.optimizer, self.scheduler = opt, sched(opt)
            self.wrapped = self.module
            if world_size > 1:
                import ray.train.torch

                self.wrapped = ray.train.torch.prepare_model(self.module, parallel_strategy="ddp")
            self.scale = float(world_size)
        self.params = params

    # -- forward ------------------------------------------------------------
    def logprobs(self, mb) -> torch.Tensor:
        return sequence_logprobs(self.wrapped, mb, autocast=self.autocast)

    def ref_logprobs(self, mb) -> torch.Tensor:
        return reference_logprobs(self.module, mb, autocast=self.autocast)

    def accumulate(self, last: bool):
        """Context for one micro-batch's forward+backward: DDP syncs
        gradients only on the last micro-batch of a step."""
        if not self.deepspeed and not last and hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self._lr = float(self.optimizer.param_groups[0]["lr"])  # before the boundary step moves it
            self.engine.backward(loss * self.scale)
            self.engine.step()  # acts only at the accumulation boundary
        else:
            (loss * self.scale).backward()

    def step(self) -> dict:
        """Clip, step optimizer and schedule, zero grads; returns the pre-clip
        global grad norm and the LR this step used."""
        if self.deepspeed:
            lr = self._lr
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            lr = float(self.optimizer.param_groups[0]["lr"])
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "lr": lr}

    def gathered(self):
        """Context in which every rank holds the full LoRA tensors (ZeRO-3
        partitions them); collective: all ranks must enter."""
        if self.deepspeed and self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
        return contextlib.nullcontext()


def _deepspeed_engine(module, optimizer, scheduler, *, stage: int, micro: int, gas: int, clip: float, bf16: bool):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # The shm comm op serves only inference all-reduce; skipping it avoids a
        # ~1 min JIT build on first use (docs/stack.md "Training"). The torch AdamW
        # passed in avoids DeepSpeed's own Adam ops (another 2-3 min build).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                           dist_init_required=False)
    return engine


def allreduce_sum(values: list[float], world: int) -> list[float]:
    """Sum a few floats over ranks (float64, one collective)."""
    if world == 1:
        return values
    import torch.distributed as dist

    # NCCL reduces only CUDA tensors (gloo: CPU tensors).
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def loss_batch(mb, logprobs: torch.Tensor, ref: torch.Tensor | None = None):
    """The LossBatch of micro-batch `mb` with these policy (and ref) log-probs."""

    return LossBatch(logprobs=logprobs, mask=mb.mask, rewards=mb.rewards, group_ids=mb.group_ids, ref_logprobs=ref,
                     behaviour_logprobs=mb.behaviour_logprobs, pair_index=mb.pair_index, advantages=mb.advantages)


def train_step(trainer: PolicyTrainer, spec, hyper: dict, micro_batches: list, *, world: int,
               observer=None) -> dict:
    """One optimizer step over this rank's micro-batches (all ranks call it
    together), for every loss, offline or online. Returns the global batch's
    loss, grad norm, LR, token counts, unit count and the loss's statistics
    (means weighted by each micro-batch's units, `loss_<name>`).

    The normaliser is the unit count of the whole global batch: summed over
    this rank's micro-batches, then over ranks (train/losses.py). A
    non-finite loss skips the optimizer step (the caller stops the cell).
    `observer` (the on-policy source's): `.forward()` is a context around
    the policy forward, `.after(mb, logprobs)` sees each micro-batch's
    log-probs, `.metrics()` adds to the returned row."""

    needs_ref = "ref_logprobs" in required_fields(spec, hyper)
    local = sum(count_units(spec, loss_batch(mb, torch.zeros(mb.mask.shape)), hyper) for mb in micro_batches)
    units = allreduce_sum([float(local)], world)[0]
    normaliser = normaliser_from_count(units)
    loss_sum, tokens, comp, wsum, vsum, keys = 0.0, 0, 0, {}, {}, []
    for j, mb in enumerate(micro_batches):
        mb = mb.to(trainer.device)
        with trainer.accumulate(last=j == len(micro_batches) - 1):
            ref = trainer.ref_logprobs(mb) if needs_ref else None
            with observer.forward() if observer is not None else contextlib.nullcontext():
                lp = trainer.logprobs(mb)
            batch = loss_batch(mb, lp, ref)
            value, stats = spec.fn(batch, normaliser=normaliser, **hyper)
            trainer.backward(value)
        if observer is not None:
            observer.after(mb, lp)
        w = count_units(spec, batch, hyper)
        loss_sum, tokens, comp = loss_sum + float(value.detach()), tokens + mb.n_tokens, comp + int(mb.mask.sum())
        keys = sorted(stats)  # the same keys from every micro-batch of every rank
        for k in keys:
            if math.isfinite(float(stats[k])) and w > 0:
                wsum[k] = wsum.get(k, 0.0) + w
                vsum[k] = vsum.get(k, 0.0) + w * float(stats[k])
    red = allreduce_sum([loss_sum, tokens, comp] + [vsum.get(k, 0.0) for k in keys] + [wsum.get(k, 0.0) for k in keys],
                        world)
    out = {"loss": red[0]}
    # No trained row (e.g. every online group filtered) still counts as a step:
    # the schedule advances and AdamW skips parameters without gradients.
    out.update(trainer.step() if math.isfinite(red[0]) else {"grad_norm": float("nan"), "lr": float("nan")})
    out.update({"tokens": red[1], "completion_tokens": red[2], "units": units})
    n = len(keys)
    for i, k in enumerate(keys):
        out[f"loss_{k}"] = red[3 + i] / red[3 + n + i] if red[3 + n + i] > 0 else float("nan")
    if observer is not None:
        out.update(observer.metrics())
    return out


def configure_threads(cpus: float) -> int:
    """Give torch exactly the CPUs Ray granted this worker: more threads than
    cores collapse throughput when the box is shared (docs/stack.md "Training")."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
