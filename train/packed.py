"""Several cells' LoRA adapters on one frozen base, trained together: one
forward and one backward per micro-batch for all of them.

A cell of the seed paper's grid (§2 Training) is a small LoRA on a frozen
base. One cell per GPU leaves most of the GPU idle on a small model (~11% MFU
measured on an H200 for Qwen3-4B r=32, docs/benchmarks.md), so packing K
cells puts K cells' rows in one batch: the base's matrix products run once
on all of them, and each cell's LoRA is added to its own rows only
(multi-LoRA training as in prime-rl's MultiRunManager or LoRAFusion).

Each cell keeps its own semantics: its LoRA init (the same tensors as
`steps.attach_lora` with its seed), its loss and normaliser, its gradient
clipping, its AdamW and cosine schedule. The cells' parameters are disjoint,
so the gradient of the summed losses with respect to cell k's LoRA is cell
k's own gradient. tests/train/test_packed.py holds a packed run to K separate
`PolicyTrainer` runs step by step (losses, gradient norms, adapters).

Scope: offline losses on one worker (no DDP / DeepSpeed), LoRA dropout 0
(dropout would draw from one RNG stream for all cells). The grid does not
schedule packed cells yet: bench/packed_cells.py measures what packing gives
on the device at hand first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import WsgError
from .losses import count_units, normaliser_from_count, required_fields
from .steps import attach_lora, loss_batch, token_logprobs


@dataclass(frozen=True)
class PackedCell:
    """What makes one packed cell its own: LoRA init seed and learning rate."""

    seed: int
    lr: float


class _Rows:
    """The packed batch's row ranges, one per cell, shared by every layer."""

    def __init__(self):
        self.slices: list[tuple[int, int]] = []
        self.lora_on = True


class PackedLinear(torch.nn.Module):
    """A frozen linear layer plus one LoRA per cell, each applied to its
    cell's rows: y = W x + s_k · B_k A_k x (peft's vanilla LoRA, same order
    of operations)."""

    def __init__(self, base: torch.nn.Linear, factors: list[tuple[torch.Tensor, torch.Tensor]],
                 scalings: list[float], rows: _Rows):
        super().__init__()
        self.base = base
        self.A = torch.nn.ParameterList([torch.nn.Parameter(a.detach().clone()) for a, _ in factors])
        self.B = torch.nn.ParameterList([torch.nn.Parameter(b.detach().clone()) for _, b in factors])
        self.scalings, self.rows = list(scalings), rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.rows.lora_on:
            return y
        parts = []
        for k, (s, e) in enumerate(self.rows.slices):
            a = self.A[k]
            d = F.linear(F.linear(x[s:e].to(a.dtype), a), self.B[k]) * self.scalings[k]
            parts.append((y[s:e] + d).to(y.dtype))
        return torch.cat(parts)


def _initial_factors(base, lc, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The LoRA tensors `attach_lora(base, lc, seed=seed)` starts a cell
    with, per adapted module name; `base` is left as it was."""
    policy = attach_lora(base, lc, seed=seed, device=next(base.parameters()).device)
    out = {}
    for name, mod in policy.get_base_model().named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = (mod.lora_A["default"].weight.detach().clone(), mod.lora_B["default"].weight.detach().clone(),
                         float(mod.scaling["default"]))
    policy.unload()
    return out


class PackedTrainer:
    """K cells on one frozen base: their forwards run as one batch, their
    optimizer steps apart (per-cell clipping, AdamW, schedule)."""

    def __init__(self, base, lc, cells: list[PackedCell], *, weight_decay: float, warmup_steps: int,
                 max_steps: int, max_grad_norm: float, device: torch.device | str = "cpu"):
        from transformers import get_cosine_schedule_with_warmup

        if lc.dropout:
            raise WsgError(f"train.lora.dropout is {lc.dropout}: packed cells need 0 (one dropout RNG for all cells "
                           f"would give each cell other masks than it draws alone)")
        if not cells:
            raise WsgError("PackedTrainer needs at least one cell")
        self.cells, self.device, self.max_grad_norm = list(cells), torch.device(device), max_grad_norm
        inits = [_initial_factors(base, lc, c.seed) for c in cells]
        self.base, self.rows = base.to(self.device), _Rows()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.modules: dict[str, PackedLinear] = {}
        for name in inits[0]:
            parent, _, leaf = name.rpartition(".")
            holder = self.base.get_submodule(parent)
            packed = PackedLinear(getattr(holder, leaf), [(i[name][0], i[name][1]) for i in inits],
                                  [i[name][2] for i in inits], self.rows).to(self.device)
            setattr(holder, leaf, packed)
            self.modules[name] = packed
        self.base.train()
        self.params = [[p for m in self.modules.values() for p in (m.A[k], m.B[k])] for k in range(len(cells))]
        self.optimizers = [torch.optim.AdamW(ps, lr=c.lr, weight_decay=weight_decay)
                           for ps, c in zip(self.params, cells)]
        self.schedulers = [get_cosine_schedule_with_warmup(o, num_warmup_steps=warmup_steps,
                                                           num_training_steps=max_steps) for o in self.optimizers]

    def logprobs(self, mbs: list) -> list[torch.Tensor]:
        """Per cell, the [B, T] log π of its micro-batch's completion tokens
        (steps.sequence_logprobs), all cells' rows in one forward."""
        blocks = [(k, f) for k, mb in enumerate(mbs) for f in mb.forwards]
        width = max(f.input_ids.shape[1] for _, f in blocks)
        # Right padding + causal attention: real tokens never see the pads after them.
        ids = torch.cat([F.pad(f.input_ids, (0, width - f.input_ids.shape[1])) for _, f in blocks])
        self.rows.slices, start = [], 0
        for mb in mbs:
            n = sum(f.input_ids.shape[0] for f in mb.forwards)
            self.rows.slices.append((start, start + n))
            start += n
        decoder, head = self.base.get_decoder(), self.base.get_output_embeddings()
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        hidden = decoder(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
        flat: list[list[torch.Tensor]] = [[] for _ in mbs]
        offset = 0
        for k, f in blocks:
            flat[k].append(token_logprobs(head, hidden[offset + f.rows, f.cols], f.targets, cap))
            offset += f.input_ids.shape[0]
        return [mb.mask.new_zeros(tuple(mb.mask.shape), dtype=x[0].dtype).index_put((mb.rows, mb.tpos), torch.cat(x))
                for mb, x in zip(mbs, flat)]

    def ref_logprobs(self, mbs: list) -> list[torch.Tensor]:
        """log π_ref of every cell's micro-batch: the base, no LoRA, no grad."""
        self.rows.lora_on = False
        try:
            with torch.no_grad():
                return self.logprobs(mbs)
        finally:
            self.rows.lora_on = True

    def step(self, finite: list[bool]) -> list[dict]:
        """Per cell: clip its gradient to its own norm, step its AdamW and
        schedule; returns each cell's pre-clip grad norm and the LR it used.
        A cell whose loss was not finite is not stepped (steps.train_step:
        the caller stops that cell); its gradient is dropped."""
        out = []
        for ok, ps, opt, sched in zip(finite, self.params, self.optimizers, self.schedulers):
            if ok:
                lr = float(opt.param_groups[0]["lr"])
                norm = float(torch.nn.utils.clip_grad_norm_(ps, self.max_grad_norm))
                opt.step()
                sched.step()
                out.append({"grad_norm": norm, "lr": lr})
            else:
                out.append({"grad_norm": float("nan"), "lr": float("nan")})
            opt.zero_grad(set_to_none=True)
        return out

    def adapter(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Cell k's LoRA factors (A, B) per adapted module name."""
        return {name: (m.A[k].detach(), m.B[k].detach()) for name, m in self.modules.items()}


def packed_train_step(trainer: PackedTrainer, specs: list, hypers: list[dict], micro_batches: list[list]) -> list[dict]:
    """One optimizer step of every cell: cell k's micro-batches
    `micro_batches[k]` (the same count for every cell), its loss `specs[k]`
    with `hypers[k]`. Micro-batch j of every cell runs in one forward; the
    backward of the summed losses gives each cell its own gradient. Per cell:
    the loss (normalised over its whole step, as steps.train_step), grad norm, LR."""
    n = {len(m) for m in micro_batches}
    if len(n) != 1 or len(micro_batches) != len(trainer.cells):
        raise WsgError(f"packed_train_step needs the same number of micro-batches for each of the "
                       f"{len(trainer.cells)} cells, got {[len(m) for m in micro_batches]}")
    norms = [normaliser_from_count(sum(count_units(s, loss_batch(mb, torch.zeros(mb.mask.shape)), h) for mb in mbs))
             for s, h, mbs in zip(specs, hypers, micro_batches)]
    needs_ref = any("ref_logprobs" in required_fields(s, h) for s, h in zip(specs, hypers))
    totals = [0.0] * len(specs)
    for j in range(n.pop()):
        mbs = [m[j].to(trainer.device) for m in micro_batches]
        refs = trainer.ref_logprobs(mbs) if needs_ref else [None] * len(mbs)
        lps = trainer.logprobs(mbs)
        values = [s.fn(loss_batch(mb, lp, ref), normaliser=z, **h)[0]
                  for s, h, mb, lp, ref, z in zip(specs, hypers, mbs, lps, refs, norms)]
        torch.stack(values).sum().backward()
        totals = [t + float(v.detach()) for t, v in zip(totals, values)]
    steps = trainer.step([math.isfinite(t) for t in totals])
    return [{"loss": t, **s} for t, s in zip(totals, steps)]
