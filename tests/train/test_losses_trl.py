"""Our losses against TRL 1.16.0's own loss code on the same log-probs.

TRL 1.16 has no standalone dft/dpo loss functions: DFT and NLL live inside
`SFTTrainer.compute_loss`, DPO/IPO inside `DPOTrainer._compute_loss`, GRPO/
DAPO inside `GRPOTrainer._compute_loss`; SimPO is the function
`CPOTrainer.cpo_loss`. We run those methods unbound, with a plain namespace
as `self` holding only the settings they read, and a stand-in for the model
forward that returns our per-token log-probs. TRL's loss arithmetic (masking,
reductions, detach, clipping, KL) is then exercised as shipped; we compare
values and gradients with respect to the logits.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace as NS

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns about the vLLM version at import
    import trl  # a pinned test dependency (requirements/test.txt): fail, never skip
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.sft_trainer import SFTTrainer
    from trl.trainer.utils import nanstd

from wsg.train.losses import get_loss
from wsg.train.losses_batch import LossBatch
from wsg.train.losses_online import group_advantages

assert trl.__version__ == "1.16.0"

B, T, V = 8, 6, 10


def setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2.0).requires_grad_(True)
    tokens = torch.randint(V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    noise = torch.randn(2, B, T, generator=g)
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    return logits, tokens, mask, noise, rewards


def logprobs_of(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def metrics_store():
    return defaultdict(lambda: defaultdict(list))


def accel():
    ident = lambda x: x  # noqa: E731 — one process: gather is the identity
    return NS(
        device=torch.device("cpu"),
        gather=ident,
        gather_for_metrics=ident,
        reduce=lambda x, reduction="sum": x,
        num_processes=1,
        sync_gradients=True,
        parallelism_config=None,
    )


def forward_outputs(per_token_logps, mask):
    """What TRL's fused-LM-head forward returns: log-probs of the labels,
    zero on ignored positions, plus the metric tensors it logs."""
    lp = per_token_logps.masked_fill(~mask, 0.0)
    zeros = torch.zeros_like(lp).detach()
    return NS(log_probs=lp, label_mask=mask, entropy=zeros, mean_logits=zeros, is_top1=torch.zeros_like(mask))


# ---------------------------------------------------------------------------
# SFT (nll) and DFT via SFTTrainer.compute_loss


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sft_and_dft_match_trl(loss_type, seed):
    logits, tokens, mask, _, _ = setup(seed)
    fake = NS(
        model=NS(training=True),
        aux_loss_enabled=False,
        accelerator=accel(),
        compute_loss_func=None,
        label_smoother=None,
        args=NS(loss_type=loss_type, average_tokens_across_devices=False),
        _metrics=metrics_store(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    model = lambda **kw: forward_outputs(logprobs_of(logits, tokens), mask)  # noqa: E731
    # nll: TRL divides by num_items_in_batch; passing the sequence count gives
    # our sequence-normalised SFT. dft: TRL's default, the token count.
    items = torch.tensor(B) if loss_type == "nll" else None
    theirs = SFTTrainer.compute_loss(fake, model, {"attention_mask": torch.ones(B, T)}, num_items_in_batch=items)
    (g_theirs,) = torch.autograd.grad(theirs, logits)

    name = "sft" if loss_type == "nll" else "dft"
    spec = get_loss(name)
    batch = LossBatch(logprobs=logprobs_of(logits, tokens), mask=mask)
    n = B if name == "sft" else int(mask.sum())
    ours, _ = spec.fn(batch, normaliser=n)
    (g_ours,) = torch.autograd.grad(ours, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# DPO (sigmoid) and IPO via DPOTrainer._compute_loss; SimPO via cpo_loss


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_and_ipo_match_trl(loss_type, beta, seed):
    logits, tokens, mask, noise, _ = setup(seed)
    lp = logprobs_of(logits, tokens)
    ref = lp.detach() + 0.5 * noise[0]
    # ours: rows in a shuffled order, pairs given by index
    order = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    pos = torch.empty(B, dtype=torch.long)
    pos[order] = torch.arange(B)
    half = B // 2
    pairs = torch.stack([pos[:half], pos[half:]], dim=1)  # chosen i, rejected i + B/2
    batch = LossBatch(logprobs=lp[order], mask=mask[order], ref_logprobs=ref[order], pair_index=pairs)
    name = "dpo" if loss_type == "sigmoid" else "ipo"
    ours, m = get_loss(name).fn(batch, normaliser=half, beta=beta)
    (g_ours,) = torch.autograd.grad(ours, logits)

    # TRL: the batch is [chosen; rejected]; completion_mask has a leading
    # prompt column that the shift drops.
    cm = torch.cat([torch.zeros(B, 1, dtype=torch.bool), mask], dim=1)
    ref_seq = ref.masked_fill(~mask, 0.0).sum(-1)
    fake = NS(
        model=NS(training=True),
        accelerator=accel(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        _metrics=metrics_store(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(B, T + 1, dtype=torch.long),
        "completion_mask": cm.long(),
        "ref_chosen_logps": ref_seq[:half],
        "ref_rejected_logps": ref_seq[half:],
    }
    model = lambda **kw: forward_outputs(logprobs_of(logits, tokens), mask)  # noqa: E731 — a fresh graph
    theirs = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)
    trl_m = fake._metrics["train"]
    assert m["rewards_chosen"] == pytest.approx(trl_m["rewards/chosen"][0], rel=1e-5)
    assert m["reward_margin_mean"] == pytest.approx(trl_m["rewards/margins"][0], rel=1e-5, abs=1e-7)
    assert m["reward_accuracy"] == pytest.approx(trl_m["rewards/accuracies"][0])


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.5)])
def test_simpo_matches_trl_cpo_loss(beta, gamma):
    logits, tokens, mask, _, _ = setup(3)
    lp = logprobs_of(logits, tokens)
    half = B // 2
    batch = LossBatch(logprobs=lp, mask=mask, pair_index=torch.stack([torch.arange(half), torch.arange(half, B)], 1))
    ours, _ = get_loss("simpo").fn(batch, normaliser=half, beta=beta, gamma=gamma)
    (g_ours,) = torch.autograd.grad(ours, logits)
    # CPOTrainer feeds SimPO the average per-token log-prob of each completion
    avg = logprobs_of(logits, tokens).masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1)
    fake = NS(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0, accelerator=accel())
    losses, _, _ = CPOTrainer.cpo_loss(fake, avg[:half], avg[half:])
    theirs = losses.mean()
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Online GRPO / DAPO via GRPOTrainer._compute_loss


@pytest.mark.parametrize(
    "name,loss_type,eps_high,kl",
    [
        ("online_grpo", "grpo", 0.2, 0.0),
        ("online_grpo", "grpo", 0.2, 0.04),
        ("online_dapo", "dapo", 0.28, 0.0),
        ("online_dapo", "dapo", 0.28, 0.1),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_online_losses_match_trl(name, loss_type, eps_high, kl, seed):
    logits, tokens, mask, noise, rewards = setup(seed)
    lp = logprobs_of(logits, tokens)
    behaviour = lp.detach() + 0.4 * noise[0]
    ref = lp.detach() + 0.3 * noise[1]
    groups = torch.arange(B) // 4
    rewards[0], rewards[1] = 1.0, 0.0  # no zero-std group: TRL and we both divide by std

    # TRL computes advantages in its generation step with this formula
    grouped = rewards.view(-1, 4)
    trl_adv = (rewards - grouped.mean(1).repeat_interleave(4)) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    our_adv = group_advantages(rewards, groups, scale_std=True, std_eps=1e-4)
    torch.testing.assert_close(our_adv, trl_adv, rtol=1e-6, atol=1e-6)

    batch = LossBatch(
        logprobs=lp, mask=mask, rewards=rewards, group_ids=groups, behaviour_logprobs=behaviour, ref_logprobs=ref
    )
    n = B if name == "online_grpo" else int(mask.sum())
    ours, m = get_loss(name).fn(batch, normaliser=n, clip_eps_high=eps_high, kl_coef=kl)
    (g_ours,) = torch.autograd.grad(ours, logits)

    fake = NS(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs_of(logits, tokens), torch.zeros(B, T), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=kl,
        args=NS(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=NS(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accel(),
        _entropy_bonus_enabled=False,
        _metrics=metrics_store(),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": tokens,
        "completion_mask": mask.long(),
        "advantages": trl_adv,
        "old_per_token_logps": behaviour,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().float(),
    }
    theirs = GRPOTrainer._compute_loss(fake, None, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)
    assert m["clip_frac"] == pytest.approx(fake._metrics["train"]["clip_ratio/region_mean"][0], abs=1e-6)
