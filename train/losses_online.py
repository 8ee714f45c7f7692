"""Per-batch objectives of the two on-policy losses, online GRPO (Shao et al.
2024) and online DAPO (Yu et al. 2025), plus DAPO's overlong reward shaping.

The sampling side (G completions per prompt from the current adapter,
DAPO's dynamic sampling that drops all-0/all-1 groups and refills) lives in
the trainer/rollout code; here is only what turns one batch of sampled
completions into a loss. Same signature and normaliser contract as the
offline losses (train/losses_offline.py, docs/losses.md).
"""
from __future__ import annotations

import torch

from ..core.errors import WsgError
from .losses_batch import (
    LossBatch,
    check_normaliser,
    group_mean,
    group_std,
    masked,
    masked_logprobs,
    mean_or_nan,
    require,
    token_counts,
)

Metrics = dict[str, float]


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_std: bool, std_eps: float
) -> torch.Tensor:
    """GRPO's group-relative advantage: r_i − mean_group(r), divided by
    (std_group(r) + eps) when scale_std (TRL: unbiased std, eps 1e-4)."""
    r = rewards.float()
    adv = r - group_mean(r, group_ids)
    if scale_std:
        adv = adv / (group_std(r, group_ids) + std_eps)
    return adv


def _per_token_objective(
    batch: LossBatch,
    loss: str,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float,
    scale_std: bool,
    std_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """(per-token loss [B, T] zero off-mask, bool mask, metrics).

    PPO clipped surrogate with the behaviour policy's log-probs:
    ρ_t = exp(log π_θ − log π_behaviour),
    loss_t = −min(ρ_t·Â_i, clip(ρ_t, 1−ε_low, 1+ε_high)·Â_i) + β_KL·k3_t,
    k3_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 (Schulman's
    unbiased, non-negative KL estimator, as DeepSeekMath and TRL)."""
    require(batch, loss, "behaviour_logprobs")
    if clip_eps_low < 0 or clip_eps_high < 0:
        raise WsgError(f"{loss}: clip_eps_low/high must be >= 0, got {clip_eps_low}, {clip_eps_high}")
    if kl_coef < 0:
        raise WsgError(f"{loss}: kl_coef must be >= 0, got {kl_coef}")
    if batch.advantages is not None:
        adv = batch.advantages.float()
    else:
        require(batch, loss, "rewards", "group_ids")
        adv = group_advantages(batch.rewards, batch.group_ids, scale_std=scale_std, std_eps=std_eps)
    adv = adv.detach()[:, None]
    lp, m = masked_logprobs(batch)
    log_ratio = lp - masked(batch.behaviour_logprobs, m).detach()
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    metrics: Metrics = {}
    if kl_coef > 0:
        require(batch, f"{loss} with kl_coef > 0", "ref_logprobs")
        d = masked(batch.ref_logprobs, m).detach() - lp
        k3 = d.exp() - d - 1.0
        per_token = per_token + kl_coef * k3
        metrics["kl_ref_mean"] = mean_or_nan(k3.detach()[m])
    per_token = per_token.masked_fill(~m, 0.0)
    with torch.no_grad():
        low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
        high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
        # k3 estimate of KL(behaviour || current) on the sampled tokens.
        approx_kl = (-log_ratio).exp() - 1.0 + log_ratio
        metrics.update(
            {
                "clip_frac_low": mean_or_nan(low[m].float()),
                "clip_frac_high": mean_or_nan(high[m].float()),
                "clip_frac": mean_or_nan((low | high)[m].float()),
                "ratio_mean": mean_or_nan(ratio[m]),
                "approx_kl_behaviour": mean_or_nan(approx_kl[m]),
                "advantage_mean": mean_or_nan(adv),
                "advantage_abs_mean": mean_or_nan(adv.abs()),
            }
        )
        if batch.rewards is not None:
            metrics["reward_mean"] = mean_or_nan(batch.rewards.float())
    return per_token, m, metrics


def online_grpo_loss(
    batch: LossBatch,
    *,
    normaliser: float,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
    scale_std: bool = True,
    std_eps: float = 1e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO (DeepSeekMath Eq. 3): each sequence's token losses averaged over
    its own length, summed over sequences, divided by the global sequence
    count (TRL loss_type="grpo"). Symmetric clip ε = 0.2, no KL by default.
    Unit: sequences."""
    n = check_normaliser(normaliser)
    per_token, _, metrics = _per_token_objective(
        batch,
        "online_grpo",
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        kl_coef=kl_coef,
        scale_std=scale_std,
        std_eps=std_eps,
    )
    per_seq = per_token.sum(-1) / token_counts(batch)
    return per_seq.sum() / n, metrics


def online_dapo_loss(
    batch: LossBatch,
    *,
    normaliser: float,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    kl_coef: float = 0.0,
    scale_std: bool = True,
    std_eps: float = 1e-4,
) -> tuple[torch.Tensor, Metrics]:
    """DAPO (Yu et al. 2025, Eq. 8): clip-higher (ε_low 0.2, ε_high 0.28) and
    token-level aggregation, Σ over every token of the batch divided by the
    global token count (TRL loss_type="dapo"); no KL. Unit: tokens."""
    n = check_normaliser(normaliser)
    per_token, _, metrics = _per_token_objective(
        batch,
        "online_dapo",
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        kl_coef=kl_coef,
        scale_std=scale_std,
        std_eps=std_eps,
    )
    return per_token.sum() / n, metrics


def overlong_penalty(
    lengths: torch.Tensor | list[int], *, max_len: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), a reward
    term added to the task reward: 0 up to max_len − buffer, then falling
    linearly to −penalty at max_len, and −penalty beyond it."""
    if buffer <= 0 or buffer > max_len:
        raise WsgError(f"overlong_penalty: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    if penalty < 0:
        raise WsgError(f"overlong_penalty: penalty is a magnitude and must be >= 0, got {penalty}")
    length = torch.as_tensor(lengths, dtype=torch.float32)
    start = float(max_len - buffer)
    ramp = (start - length) / float(buffer) * penalty
    out = torch.where(length <= start, torch.zeros_like(length), ramp)
    return torch.where(length > max_len, torch.full_like(length, -penalty), out)
