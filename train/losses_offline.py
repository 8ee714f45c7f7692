"""Offline losses over fixed rollouts: SFT, RFT, DFT, RIFT, Offline GRPO and
the DPO family (docs/design.md "Losses"; seed paper 2606.23740 §2 "Methods").

Every function has the one signature
    loss_fn(batch, *, normaliser, **hyper) -> (loss, metrics)
and returns a SUM over the micro-batch's units divided by `normaliser`, the
unit count of the whole optimizer-step batch (`train.losses.normaliser_for`).
Summing these over micro-batches and ranks therefore gives exactly the loss
(and gradient) of the whole batch. Units: see `LossSpec.unit` in
train/losses.py. Formulas, sources and seed-vs-source differences:
docs/losses.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import WsgError
from .losses_batch import (
    LossBatch,
    check_normaliser,
    group_all,
    group_mean,
    is_positive,
    masked_logprobs,
    mean_or_nan,
    require,
    sequence_logprob,
    token_counts,
)

Metrics = dict[str, float]


def _nll_metrics(nll: torch.Tensor, batch: LossBatch) -> Metrics:
    return {
        "nll_mean": mean_or_nan(nll.detach()),
        "tokens_mean": mean_or_nan(batch.mask.bool().sum(-1)),
    }


def sft_loss(batch: LossBatch, *, normaliser: float) -> tuple[torch.Tensor, Metrics]:
    """SFT: Σ_i ℓ_i over all rows (seed §2). Unit: sequences."""
    n = check_normaliser(normaliser)
    nll = -sequence_logprob(batch)
    return nll.sum() / n, _nll_metrics(nll, batch)


def rft_loss(
    batch: LossBatch, *, normaliser: float, positive_threshold: float = 0.5
) -> tuple[torch.Tensor, Metrics]:
    """RFT (Yuan et al. 2023): Σ_{i: r_i=1} ℓ_i, positives only. Unit:
    positive_sequences, i.e. SFT on the positive subset (docs/losses.md)."""
    require(batch, "rft", "rewards")
    n = check_normaliser(normaliser)
    nll = -sequence_logprob(batch)
    pos = is_positive(batch.rewards, positive_threshold)
    loss = torch.where(pos, nll, torch.zeros_like(nll)).sum() / n
    metrics = _nll_metrics(nll, batch)
    metrics["positive_frac"] = mean_or_nan(pos.float())
    return loss, metrics


def dft_loss(batch: LossBatch, *, normaliser: float) -> tuple[torch.Tensor, Metrics]:
    """DFT (Wu et al. 2025): Σ_t sg(π_t)·(−log π_t), each completion token
    weighted by its own detached probability. Unit: tokens, as TRL's
    SFTTrainer(loss_type="dft") which divides by the token count."""
    n = check_normaliser(normaliser)
    lp, m = masked_logprobs(batch)
    weight = lp.detach().exp().masked_fill(~m, 0.0)
    loss = (-(weight * lp)).sum() / n
    return loss, {
        "nll_token_mean": mean_or_nan(-lp.detach()[m]),
        "weight_mean": mean_or_nan(weight[m]),
    }


def rift_loss(
    batch: LossBatch,
    *,
    normaliser: float,
    positive_threshold: float = 0.5,
    pos_reward: float = 1.0,
    neg_reward: float = -0.2,
    negative_level: str = "token",
) -> tuple[torch.Tensor, Metrics]:
    """RIFT source form (Liu et al. 2026, arXiv 2601.09253): positives keep
    the reward-weighted NLL −r⁺·log π(y|x) = r⁺·ℓ_i; negatives replace the
    unbounded −r⁻·log π by the linear-in-probability term −r⁻·π, bounded in
    [0, |r⁻|] per unit with a gradient that cannot blow up as π → 0.

    negative_level="token" applies the linear term per token, |r⁻|·Σ_t π_t
    (bounded by |r⁻|·T_i); "sequence" uses the sequence probability
    |r⁻|·exp(Σ_t log π_t), which vanishes for long completions. Binary rewards
    are mapped to r⁺ = pos_reward, r⁻ = neg_reward. Unit: sequences."""
    require(batch, "rift", "rewards")
    n = check_normaliser(normaliser)
    if neg_reward > 0:
        raise WsgError(f"rift: neg_reward must be <= 0 (it suppresses negatives), got {neg_reward}")
    if negative_level not in ("token", "sequence"):
        raise WsgError(f"rift: negative_level must be 'token' or 'sequence', got {negative_level!r}")
    lp, m = masked_logprobs(batch)
    seq_lp = lp.sum(-1)
    if negative_level == "token":
        prob_term = lp.exp().masked_fill(~m, 0.0).sum(-1)
    else:
        prob_term = seq_lp.exp()
    pos = is_positive(batch.rewards, positive_threshold)
    per_row = torch.where(pos, -pos_reward * seq_lp, -neg_reward * prob_term)
    metrics = _nll_metrics(-seq_lp, batch)
    metrics["positive_frac"] = mean_or_nan(pos.float())
    neg_prob = prob_term.detach()[~pos]
    metrics["negative_prob_term_mean"] = mean_or_nan(neg_prob)
    return per_row.sum() / n, metrics


def rift_seed_linear_loss(
    batch: LossBatch, *, normaliser: float, lam: float = 0.5
) -> tuple[torch.Tensor, Metrics]:
    """RIFT as the seed paper writes it (§2): Σ_i (1 − r_i·λ)·ℓ_i, with the
    rewards as given. The seed gives no λ; 0.5 is our choice. Unit: sequences."""
    require(batch, "rift/seed_linear", "rewards")
    n = check_normaliser(normaliser)
    nll = -sequence_logprob(batch)
    w = 1.0 - batch.rewards.float() * lam
    metrics = _nll_metrics(nll, batch)
    metrics["weight_mean"] = mean_or_nan(w)
    return (w * nll).sum() / n, metrics


# ---------------------------------------------------------------------------
# Offline GRPO (KRAFTON AI 2025; Shao et al. 2024)


def seed_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, bias: float) -> torch.Tensor:
    """Seed form: Â_i = r_i − mean_group(r) + b for every row."""
    r = rewards.float()
    return r - group_mean(r, group_ids) + bias


def krafton_grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, bias: float, positive_threshold: float
) -> torch.Tensor:
    """KRAFTON form: Â_i = r_i − mean_group(r), plus b only in groups whose
    rows are all correct (where the centred advantage would be 0 and the
    positives would teach nothing)."""
    r = rewards.float()
    all_pos = group_all(is_positive(r, positive_threshold), group_ids)
    return r - group_mean(r, group_ids) + bias * all_pos.float()


def _advantages(batch: LossBatch, loss: str, compute) -> torch.Tensor:
    if batch.advantages is not None:
        return batch.advantages.float()
    require(batch, loss, "rewards", "group_ids")
    return compute(batch.rewards, batch.group_ids)


def _adv_metrics(adv: torch.Tensor, batch: LossBatch, positive_threshold: float = 0.5) -> Metrics:
    out = {"advantage_mean": mean_or_nan(adv), "advantage_pos_frac": mean_or_nan((adv > 0).float())}
    if batch.rewards is not None:
        out["reward_mean"] = mean_or_nan(batch.rewards.float())
        out["positive_frac"] = mean_or_nan(is_positive(batch.rewards, positive_threshold).float())
    return out


def offline_grpo_loss(batch: LossBatch, *, normaliser: float, bias: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Seed form (§2): Σ_i Â_i·ℓ_i, Â_i = r_i − mean_group(r) + b, b = 0.1,
    no probability weighting, no ratio, no KL. Unit: sequences."""
    n = check_normaliser(normaliser)
    adv = _advantages(batch, "offline_grpo", lambda r, g: seed_grpo_advantages(r, g, bias=bias))
    nll = -sequence_logprob(batch)
    metrics = _nll_metrics(nll, batch)
    metrics.update(_adv_metrics(adv, batch))
    return (adv.detach() * nll).sum() / n, metrics


def offline_grpo_krafton_loss(
    batch: LossBatch, *, normaliser: float, bias: float = 0.1, positive_threshold: float = 0.5
) -> tuple[torch.Tensor, Metrics]:
    """KRAFTON variant: bias only in all-correct groups; token loss −Â_i·π_t
    (probability, not log-probability, so each token's gradient is weighted
    by π_t), summed over the completion. Unit: sequences."""
    n = check_normaliser(normaliser)
    adv = _advantages(
        batch,
        "offline_grpo/krafton",
        lambda r, g: krafton_grpo_advantages(r, g, bias=bias, positive_threshold=positive_threshold),
    )
    lp, m = masked_logprobs(batch)
    prob = lp.exp().masked_fill(~m, 0.0)
    per_row = -(adv.detach()[:, None] * prob).sum(-1)
    metrics = _nll_metrics(-lp.detach().sum(-1), batch)
    metrics.update(_adv_metrics(adv, batch, positive_threshold))
    return per_row.sum() / n, metrics


# ---------------------------------------------------------------------------
# Preference pairs. Sequence log-probs are token sums, as TRL's DPOTrainer.


def _pair_logps(batch: LossBatch, loss: str, *, with_ref: bool):
    require(batch, loss, "pair_index", *(("ref_logprobs",) if with_ref else ()))
    lp, m = masked_logprobs(batch)
    seq = lp.sum(-1)
    cnt = token_counts(batch)
    w, l = batch.pair_index[:, 0].long(), batch.pair_index[:, 1].long()
    ref = None
    if with_ref:
        ref_seq = batch.ref_logprobs.float().masked_fill(~m, 0.0).sum(-1).detach()
        ref = (ref_seq[w], ref_seq[l])
    return seq[w], seq[l], ref, cnt[w], cnt[l]


def _pair_metrics(chosen_r: torch.Tensor, rejected_r: torch.Tensor, cw, cl) -> Metrics:
    c, r = chosen_r.detach(), rejected_r.detach()
    return {
        "rewards_chosen": mean_or_nan(c),
        "rewards_rejected": mean_or_nan(r),
        "reward_margin_mean": mean_or_nan(c - r),
        "reward_accuracy": mean_or_nan((c > r).float()),
        "logps_chosen": mean_or_nan(cw.detach()),
        "logps_rejected": mean_or_nan(cl.detach()),
    }


def dpo_loss(batch: LossBatch, *, normaliser: float, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """DPO sigmoid (Rafailov et al. 2023): −log σ(β·[(s_w − s_w^ref) −
    (s_l − s_l^ref)]) per pair, s = token-summed log-prob. Unit: pairs."""
    n = check_normaliser(normaliser)
    sw, sl, (rw, rl), _, _ = _pair_logps(batch, "dpo", with_ref=True)
    chosen, rejected = beta * (sw - rw), beta * (sl - rl)
    per_pair = -F.logsigmoid(chosen - rejected)
    return per_pair.sum() / n, _pair_metrics(chosen, rejected, sw, sl)


def ipo_loss(batch: LossBatch, *, normaliser: float, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, Eq. 17): (h − 1/(2β))² with h the difference
    of the chosen and rejected log-ratios, each divided by its completion's
    token count (TRL's convention, confirmed there with the IPO authors).
    Unit: pairs."""
    n = check_normaliser(normaliser)
    sw, sl, (rw, rl), nw, nl = _pair_logps(batch, "ipo", with_ref=True)
    h = (sw - rw) / nw - (sl - rl) / nl
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    return per_pair.sum() / n, _pair_metrics(beta * (sw - rw), beta * (sl - rl), sw, sl)


def simpo_loss(
    batch: LossBatch, *, normaliser: float, beta: float = 2.0, gamma: float = 1.0
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024): −log σ(β·(ā_w − ā_l) − γ), ā = length-
    normalised (mean per token) log-prob, no reference model. Defaults
    β = 2.0, γ = 1.0 (γ/β = 0.5). Unit: pairs."""
    n = check_normaliser(normaliser)
    sw, sl, _, nw, nl = _pair_logps(batch, "simpo", with_ref=False)
    chosen, rejected = beta * sw / nw, beta * sl / nl
    per_pair = -F.logsigmoid(chosen - rejected - gamma)
    return per_pair.sum() / n, _pair_metrics(chosen, rejected, sw, sl)
