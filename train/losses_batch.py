"""The data every loss reads (`LossBatch`) and the helpers the losses share.

A loss never sees a model: it reads per-token log-probs of the completion
tokens plus whatever fields it declares (docs/design.md "Losses"). Keeping the
losses pure over tensors lets them be tested against independent references
on random inputs, and lets one trainer serve every loss.

Conventions shared by all losses (docs/losses.md):
- the sequence NLL is the SUM over completion tokens, ℓ_i = −Σ_t m_it·log π_it,
  as the seed paper defines ℓ_i = −log π_θ(y_i|x) (a sequence log-prob);
- positions outside the mask never contribute, even if their log-prob is
  -inf or NaN (padding): masked positions are replaced, not multiplied;
- arithmetic runs in float32 whatever the input dtype (bf16 training).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..core.errors import WsgError

#: The optional fields a loss may declare in `LossSpec.needs`.
OPTIONAL_FIELDS = (
    "rewards",
    "group_ids",
    "ref_logprobs",
    "behaviour_logprobs",
    "pair_index",
    "advantages",
)


@dataclass
class LossBatch:
    """One micro-batch of completions, as tensors.

    logprobs: [B, T] log π_θ of each completion token (carries the graph).
    mask: [B, T] bool or 0/1 float, True on completion tokens.
    rewards: [B] scalar reward per completion (binary math-verify reward).
    group_ids: [B] long; completions of the same prompt share an id.
    ref_logprobs: [B, T] log π_ref (frozen base model), no grad.
    behaviour_logprobs: [B, T] log-probs of the policy that sampled the
        completion (online losses' importance ratio), no grad.
    pair_index: [P, 2] long; row indices (chosen, rejected) into this batch.
    advantages: [B] precomputed advantages. When set, group-relative losses
        use it instead of computing advantages from rewards within this
        micro-batch (see `train.losses.precompute_advantages`): this is how a
        trainer splits one prompt's group across micro-batches or ranks.
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    behaviour_logprobs: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 2:
            raise WsgError(
                f"LossBatch.logprobs must be [B, T], got shape {tuple(self.logprobs.shape)}; "
                "pass the per-token log-probs of the completion tokens"
            )
        bt = tuple(self.logprobs.shape)
        b = bt[0]
        if tuple(self.mask.shape) != bt:
            raise WsgError(f"LossBatch.mask has shape {tuple(self.mask.shape)}, logprobs {bt}: they must match")
        for name in ("ref_logprobs", "behaviour_logprobs"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != bt:
                raise WsgError(f"LossBatch.{name} has shape {tuple(t.shape)}, logprobs {bt}: they must match")
        for name in ("rewards", "group_ids", "advantages"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b,):
                raise WsgError(f"LossBatch.{name} has shape {tuple(t.shape)}; expected ({b},), one per row")
        if self.pair_index is not None:
            p = self.pair_index
            if p.dim() != 2 or p.shape[1] != 2 or p.dtype not in (torch.int64, torch.int32):
                raise WsgError(
                    f"LossBatch.pair_index must be an integer [P, 2] tensor of (chosen, rejected) rows, "
                    f"got shape {tuple(p.shape)} dtype {p.dtype}"
                )
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= b):
                raise WsgError(f"LossBatch.pair_index refers to rows outside 0..{b - 1}")

    def present(self) -> frozenset[str]:
        """Names of the optional fields that are set."""
        return frozenset(n for n in OPTIONAL_FIELDS if getattr(self, n) is not None)

    def select(self, rows: torch.Tensor | list[int]) -> "LossBatch":
        """The sub-batch of `rows` (a micro-batch). Pairs move with their rows
        and are re-indexed; a pair with only one row selected is an error,
        because a DPO term cannot be split."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.logprobs.device)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name == "pair_index":
                out[f.name] = v
            else:
                out[f.name] = v[rows_t]
        if self.pair_index is not None:
            new_pos = torch.full((self.logprobs.shape[0],), -1, dtype=torch.long, device=rows_t.device)
            new_pos[rows_t] = torch.arange(rows_t.numel(), device=rows_t.device)
            mapped = new_pos[self.pair_index.long()]
            inside = (mapped >= 0).all(dim=1)
            half = (mapped >= 0).any(dim=1) & ~inside
            if bool(half.any()):
                raise WsgError(
                    "LossBatch.select splits a (chosen, rejected) pair across micro-batches; "
                    "keep both rows of every pair together"
                )
            out["pair_index"] = mapped[inside]
        return replace(self, **out)


def require(batch: LossBatch, loss: str, *names: str) -> None:
    """Fail with the loss name and the missing fields."""
    missing = [n for n in names if getattr(batch, n) is None]
    if missing:
        raise WsgError(
            f"loss '{loss}' needs LossBatch field(s) {missing}; they are None in this batch "
            f"(set: {sorted(batch.present()) or 'none'})"
        )


def check_normaliser(normaliser: float) -> float:
    """The trainer's global unit count must be a positive number."""
    n = float(normaliser)
    if not n > 0:
        raise WsgError(
            f"normaliser must be > 0 (the unit count of the whole optimizer-step batch), got {normaliser}; "
            "use train.losses.normaliser_for"
        )
    return n


def masked_logprobs(batch: LossBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 log-probs with masked positions set to 0, bool mask)."""
    m = batch.mask.bool()
    lp = batch.logprobs.float().masked_fill(~m, 0.0)
    return lp, m


def masked(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """float32 copy of a [B, T] tensor with masked positions set to 0."""
    return t.float().masked_fill(~m, 0.0)


def sequence_logprob(batch: LossBatch) -> torch.Tensor:
    """[B] Σ_t m·log π (the sequence log-prob; −ℓ_i)."""
    lp, _ = masked_logprobs(batch)
    return lp.sum(dim=-1)


def token_counts(batch: LossBatch) -> torch.Tensor:
    """[B] number of completion tokens per row, float32, at least 1 (so that
    an empty row divides to 0 instead of NaN)."""
    return batch.mask.bool().sum(dim=-1).clamp(min=1).float()


def is_positive(rewards: torch.Tensor, positive_threshold: float) -> torch.Tensor:
    """A completion is positive when its reward reaches the threshold
    (binary math-verify rewards: r = 1)."""
    return rewards.float() >= positive_threshold


# ---------------------------------------------------------------------------
# Group statistics within the rows given. Group losses compute these inside
# a micro-batch only when the micro-batch holds whole groups; otherwise the
# trainer precomputes `advantages` over the whole group (docs/losses.md).


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] mean of `values` over each row's group."""
    inv, g = _group_index(group_ids)
    v = values.float()
    sums = torch.zeros(g, dtype=v.dtype, device=v.device).index_add_(0, inv, v)
    counts = torch.zeros(g, dtype=v.dtype, device=v.device).index_add_(0, inv, torch.ones_like(v))
    return (sums / counts)[inv]


def group_std(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] unbiased (Bessel, n−1) std over each row's group, as TRL's GRPO;
    0 for a group of one (its advantage is then 0, not NaN)."""
    inv, g = _group_index(group_ids)
    v = values.float()
    dev2 = (v - group_mean(v, group_ids)) ** 2
    ss = torch.zeros(g, dtype=v.dtype, device=v.device).index_add_(0, inv, dev2)
    counts = torch.zeros(g, dtype=v.dtype, device=v.device).index_add_(0, inv, torch.ones_like(v))
    var = torch.where(counts > 1, ss / (counts - 1).clamp(min=1), torch.zeros_like(ss))
    return var.sqrt()[inv]


def group_all(flags: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: every row of this row's group has the flag."""
    inv, g = _group_index(group_ids)
    bad = torch.zeros(g, dtype=torch.float32, device=flags.device).index_add_(0, inv, (~flags.bool()).float())
    return (bad == 0)[inv]


def mean_or_nan(x: torch.Tensor) -> float:
    """Mean as a Python float, NaN for an empty tensor (metrics only)."""
    return float(x.float().mean()) if x.numel() else float("nan")
