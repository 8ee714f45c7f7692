"""Online GRPO / DAPO objectives and DAPO's overlong shaping against
hand-worked cases and per-token Python loop references."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from wsg.core.errors import WsgError
from wsg.train.losses import get_loss, validate_hyper
from wsg.train.losses_batch import LossBatch
from wsg.train.losses_online import group_advantages, overlong_penalty

E = math.exp


def hand_batch(**extra) -> LossBatch:
    lp = torch.tensor([[-1.0, -2.0], [-0.7, float("nan")]], requires_grad=True)
    beh = torch.tensor([[-1.5, -1.9], [-0.2, 0.0]])
    return LossBatch(
        logprobs=lp,
        mask=torch.tensor([[1, 1], [1, 0]], dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=torch.tensor([7, 7]),
        behaviour_logprobs=beh,
        **extra,
    )


def test_grpo_hand_worked():
    # Â = ±0.5 (no std scaling). Row 0: ρ = e^0.5 (clipped to 1.2), e^−0.1;
    # row 1: ρ = e^−0.5 < 0.8 with Â < 0 → clipped at 0.8: loss +0.5·0.8.
    b = hand_batch()
    loss, m = get_loss("online_grpo").fn(b, normaliser=2, scale_std=False)
    row0 = (-0.5 * 1.2 - 0.5 * E(-0.1)) / 2
    row1 = 0.5 * 0.8
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == pytest.approx(1 / 3)
    loss.backward()
    g = b.logprobs.grad
    # clipped tokens carry no gradient; the free one: −Â·ρ/(len·N)
    assert g[0, 0].item() == 0.0 and g[1, 0].item() == 0.0
    assert g[0, 1].item() == pytest.approx(-0.5 * E(-0.1) / (2 * 2))


def test_dapo_hand_worked():
    b = hand_batch()
    loss, _ = get_loss("online_dapo").fn(b, normaliser=3, scale_std=False)
    # clip-higher: the first token is clipped at 1.28 instead of 1.2
    assert loss.item() == pytest.approx((-0.5 * 1.28 - 0.5 * E(-0.1) + 0.5 * 0.8) / 3)


def test_grpo_kl_hand_worked():
    ref = torch.tensor([[-1.2, -2.5], [-0.4, 0.0]])
    b = hand_batch(ref_logprobs=ref)
    loss, m = get_loss("online_grpo").fn(b, normaliser=2, scale_std=False, kl_coef=0.1)
    k3 = lambda d: E(d) - d - 1  # noqa: E731
    row0 = (-0.5 * 1.2 - 0.5 * E(-0.1) + 0.1 * (k3(-0.2) + k3(-0.5))) / 2
    row1 = 0.5 * 0.8 + 0.1 * k3(0.3)
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    assert m["kl_ref_mean"] == pytest.approx((k3(-0.2) + k3(-0.5) + k3(0.3)) / 3)


def test_overlong_penalty_hand_worked():
    # max_len 10, buffer 4: free up to 6, linear to −penalty at 10, −penalty after.
    got = overlong_penalty([3, 6, 7, 8, 10, 11], max_len=10, buffer=4, penalty=2.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -2.0, -2.0])
    with pytest.raises(WsgError, match="buffer"):
        overlong_penalty([1], max_len=10, buffer=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_overlong_penalty_random_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 300, (50,), generator=g)
    got = overlong_penalty(lengths, max_len=256, buffer=64, penalty=1.0)
    for n, v in zip(lengths.tolist(), got.tolist()):
        want = 0.0 if n <= 192 else (-1.0 if n > 256 else (192 - n) / 64)
        assert v == pytest.approx(want)


@pytest.mark.parametrize("scale_std", [True, False])
def test_group_advantages_against_statistics(scale_std):
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(15, generator=g).round()
    groups = torch.tensor([3, 3, 3, 1, 1, 1, 1, 9, 9, 9, 9, 9, 4, 4, 2])  # uneven, one singleton
    got = group_advantages(rewards, groups, scale_std=scale_std, std_eps=1e-4).tolist()
    r, gl = rewards.tolist(), groups.tolist()
    for i in range(15):
        members = [r[k] for k in range(15) if gl[k] == gl[i]]
        adv = r[i] - statistics.fmean(members)
        if scale_std:
            sd = statistics.stdev(members) if len(members) > 1 else 0.0
            adv = adv / (sd + 1e-4)
        assert got[i] == pytest.approx(adv, rel=1e-5, abs=1e-6)


def random_online(seed: int, b: int = 12, t: int = 10, v: int = 13) -> LossBatch:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2.0
    tokens = torch.randint(v, (b, t), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    return LossBatch(
        logprobs=lp,
        mask=torch.arange(t)[None, :] < lengths[:, None],
        rewards=(torch.rand(b, generator=g) < 0.5).float(),
        group_ids=torch.arange(b) // 3,
        behaviour_logprobs=lp + 0.4 * torch.randn(b, t, generator=g),
        ref_logprobs=lp + 0.3 * torch.randn(b, t, generator=g),
    )


def ref_online(batch: LossBatch, token_level: bool, h: dict) -> float:
    adv = group_advantages(batch.rewards, batch.group_ids, scale_std=h["scale_std"], std_eps=h["std_eps"]).tolist()
    total, tokens = 0.0, 0
    for i in range(batch.logprobs.shape[0]):
        seq = []
        for j in range(batch.logprobs.shape[1]):
            if not bool(batch.mask[i, j]):
                continue
            lp, blp, rlp = (float(x[i, j]) for x in (batch.logprobs, batch.behaviour_logprobs, batch.ref_logprobs))
            rho = math.exp(lp - blp)
            clipped = min(max(rho, 1 - h["clip_eps_low"]), 1 + h["clip_eps_high"])
            term = -min(rho * adv[i], clipped * adv[i])
            d = rlp - lp
            seq.append(term + h["kl_coef"] * (math.exp(d) - d - 1))
        tokens += len(seq)
        total += sum(seq) if token_level else sum(seq) / len(seq)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "name,hyper",
    [
        ("online_grpo", {}),
        ("online_grpo", {"kl_coef": 0.04, "scale_std": False}),
        ("online_grpo", {"clip_eps_low": 0.1, "clip_eps_high": 0.3}),
        ("online_dapo", {}),
        ("online_dapo", {"kl_coef": 0.1}),
    ],
)
def test_online_random_against_loop_reference(name, hyper, seed):
    batch = random_online(seed)
    full = validate_hyper(name, None, hyper)
    ref = ref_online(batch, token_level=name == "online_dapo", h=full)
    loss, m = get_loss(name).fn(batch, normaliser=5.0, **full)
    assert ref != 0.0
    assert loss.item() == pytest.approx(ref / 5.0, rel=1e-5, abs=1e-7)
    assert 0.0 < m["clip_frac"] < 1.0  # the random ratios exercise both regimes


def test_online_errors():
    b = LossBatch(logprobs=torch.zeros(2, 3), mask=torch.ones(2, 3), rewards=torch.ones(2), group_ids=torch.zeros(2))
    with pytest.raises(WsgError, match="behaviour_logprobs"):
        get_loss("online_grpo").fn(b, normaliser=1)
    b = hand_batch()
    with pytest.raises(WsgError, match="ref_logprobs"):
        get_loss("online_dapo").fn(b, normaliser=1, kl_coef=0.1)
