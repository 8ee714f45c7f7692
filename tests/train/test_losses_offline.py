"""Offline losses against hand-worked cases and independent per-row Python
loop references on random logprobs (log_softmax of random logits)."""
from __future__ import annotations

import math

import pytest
import torch
from wsg.core.errors import WsgError
from wsg.train.losses import get_loss, validate_hyper
from wsg.train.losses_batch import LossBatch

NAN = float("nan")


def hand_batch(**extra) -> LossBatch:
    # Row lengths 2, 3, 1; padding holds NaN, which must never leak.
    lp = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -0.5, -1.0], [-3.0, NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return LossBatch(logprobs=lp, mask=mask, **extra)


def hand_rewards() -> dict:
    return {"rewards": torch.tensor([1.0, 0.0, 1.0]), "group_ids": torch.tensor([0, 0, 1])}


# ℓ = [3, 2, 3] for the hand batch.
E = math.exp


@pytest.mark.parametrize(
    "name,variant,hyper,normaliser,expected",
    [
        ("sft", None, {}, 3, (3 + 2 + 3) / 3),
        ("rft", None, {}, 2, (3 + 3) / 2),
        ("dft", None, {}, 6, (E(-1) * 1 + E(-2) * 2 + 2 * E(-0.5) * 0.5 + E(-1) * 1 + E(-3) * 3) / 6),
        ("rift", None, {}, 3, (3 + 3 + 0.2 * (2 * E(-0.5) + E(-1))) / 3),
        ("rift", None, {"negative_level": "sequence"}, 3, (3 + 3 + 0.2 * E(-2.0)) / 3),
        ("rift", None, {"pos_reward": 2.0, "neg_reward": -1.0}, 3, (6 + 6 + (2 * E(-0.5) + E(-1))) / 3),
        ("rift", "seed_linear", {}, 3, (0.5 * 3 + 1.0 * 2 + 0.5 * 3) / 3),
        # group 0 rewards (1, 0): mean 0.5 → Â = 0.6, −0.4; group 1 (1): Â = 0.1
        ("offline_grpo", None, {}, 3, (0.6 * 3 - 0.4 * 2 + 0.1 * 3) / 3),
        # krafton: group 0 mixed → Â = 0.5, −0.5; group 1 all correct → Â = 0 + 0.1
        (
            "offline_grpo",
            "krafton",
            {},
            3,
            (-0.5 * (E(-1) + E(-2)) + 0.5 * (2 * E(-0.5) + E(-1)) - 0.1 * E(-3)) / 3,
        ),
    ],
)
def test_hand_worked(name, variant, hyper, normaliser, expected):
    spec = get_loss(name, variant)
    loss, metrics = spec.fn(hand_batch(**hand_rewards()), normaliser=normaliser, **validate_hyper(name, variant, hyper))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


def test_hand_worked_gradients():
    # d/dlp of the hand cases, written out per token.
    b = hand_batch(**hand_rewards())
    loss, _ = get_loss("dft").fn(b, normaliser=6)
    loss.backward()
    g = b.logprobs.grad
    # −sg(π)·lp → gradient −π_t / N on every completion token, 0 on padding.
    assert g[0, 0].item() == pytest.approx(-E(-1) / 6) and g[0, 2].item() == 0.0
    assert g[1, 1].item() == pytest.approx(-E(-0.5) / 6)

    b = hand_batch(**hand_rewards())
    get_loss("rift").fn(b, normaliser=3)[0].backward()
    # positive row: −1/N per token; negative row: |r⁻|·π_t/N (bounded by |r⁻|/N)
    assert b.logprobs.grad[0, 1].item() == pytest.approx(-1 / 3)
    assert b.logprobs.grad[1, 2].item() == pytest.approx(0.2 * E(-1) / 3)

    b = hand_batch(**hand_rewards())
    get_loss("offline_grpo", "krafton").fn(b, normaliser=3)[0].backward()
    # −Â·π_t → gradient −Â·π_t/N (probability-weighted)
    assert b.logprobs.grad[1, 0].item() == pytest.approx(0.5 * E(-0.5) / 3)
    assert b.logprobs.grad[2, 0].item() == pytest.approx(-0.1 * E(-3) / 3)


def pair_hand_batch() -> LossBatch:
    # rows: chosen (2 tokens, s=−1.5, ref −2.0), rejected (1 token, s=−3, ref −2.5)
    lp = torch.tensor([[-1.0, -0.5], [-3.0, NAN]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.8], [-2.5, NAN]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    return LossBatch(logprobs=lp, mask=mask, ref_logprobs=ref, pair_index=torch.tensor([[0, 1]]))


def test_pairs_hand_worked():
    b = pair_hand_batch()
    # h = (−1.5 + 2.0) − (−3 + 2.5) = 1.0
    loss, m = get_loss("dpo").fn(b, normaliser=1)
    assert loss.item() == pytest.approx(math.log1p(E(-0.1)))
    assert m["reward_margin_mean"] == pytest.approx(0.1) and m["reward_accuracy"] == 1.0
    # IPO, per-token log-ratios: 0.5/2 − (−0.5)/1 = 0.75; (0.75 − 1/(2·0.1))²
    loss, _ = get_loss("ipo").fn(pair_hand_batch(), normaliser=1)
    assert loss.item() == pytest.approx((0.75 - 5.0) ** 2)
    # SimPO: 2·(−0.75 − (−3)) − 1 = 3.5
    loss, _ = get_loss("simpo").fn(pair_hand_batch(), normaliser=1)
    assert loss.item() == pytest.approx(math.log1p(E(-3.5)))


# ---------------------------------------------------------------------------
# Random inputs vs per-row Python loops.


def random_batch(seed: int, b: int = 12, t: int = 9, v: int = 11) -> LossBatch:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2.0
    tokens = torch.randint(v, (b, t), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    groups = torch.arange(b) // 4  # three prompts, four completions each
    rewards = (torch.rand(b, generator=g) < 0.6).float()
    rewards[4:8] = 1.0  # one all-correct group exercises the krafton bias
    ref = lp + 0.3 * torch.randn(b, t, generator=g)
    pairs = torch.tensor([[0, 1], [5, 2], [9, 10], [3, 11]])
    return LossBatch(
        logprobs=lp, mask=mask, rewards=rewards, group_ids=groups, ref_logprobs=ref, pair_index=pairs
    )


def rows(batch: LossBatch):
    """Per row: the completion-token log-probs as Python floats."""
    out = []
    for i in range(batch.logprobs.shape[0]):
        out.append([float(batch.logprobs[i, j]) for j in range(batch.mask.shape[1]) if bool(batch.mask[i, j])])
    return out


def groups_mean(batch: LossBatch) -> list[float]:
    r, g = batch.rewards.tolist(), batch.group_ids.tolist()
    return [sum(r[k] for k in range(len(r)) if g[k] == g[i]) / g.count(g[i]) for i in range(len(r))]


def ref_offline(name: str, batch: LossBatch, hyper: dict) -> float:
    rs, r, g = rows(batch), batch.rewards.tolist(), batch.group_ids.tolist()
    total = 0.0
    if name == "sft":
        total = sum(-sum(x) for x in rs)
    elif name == "rft":
        total = sum(-sum(x) for x, ri in zip(rs, r) if ri >= 0.5)
    elif name == "dft":
        total = sum(-math.exp(v) * v for x in rs for v in x)
    elif name == "rift":
        for x, ri in zip(rs, r):
            if ri >= 0.5:
                total += -hyper["pos_reward"] * sum(x)
            elif hyper["negative_level"] == "token":
                total += -hyper["neg_reward"] * sum(math.exp(v) for v in x)
            else:
                total += -hyper["neg_reward"] * math.exp(sum(x))
    elif name == "rift/seed_linear":
        total = sum((1 - ri * hyper["lam"]) * -sum(x) for x, ri in zip(rs, r))
    elif name == "offline_grpo":
        means = groups_mean(batch)
        total = sum((ri - mu + hyper["bias"]) * -sum(x) for x, ri, mu in zip(rs, r, means))
    elif name == "offline_grpo/krafton":
        means = groups_mean(batch)
        for i, (x, ri, mu) in enumerate(zip(rs, r, means)):
            all_pos = all(r[k] >= 0.5 for k in range(len(r)) if g[k] == g[i])
            adv = ri - mu + (hyper["bias"] if all_pos else 0.0)
            total += sum(-adv * math.exp(v) for v in x)
    return total


def ref_pairs(name: str, batch: LossBatch, hyper: dict) -> float:
    rs = rows(batch)
    refs = [
        [float(batch.ref_logprobs[i, j]) for j in range(batch.mask.shape[1]) if bool(batch.mask[i, j])]
        for i in range(len(rs))
    ]
    total = 0.0
    for w, l in batch.pair_index.tolist():
        if name == "dpo":
            h = (sum(rs[w]) - sum(refs[w])) - (sum(rs[l]) - sum(refs[l]))
            total += math.log1p(math.exp(-hyper["beta"] * h))
        elif name == "ipo":
            h = (sum(rs[w]) - sum(refs[w])) / len(rs[w]) - (sum(rs[l]) - sum(refs[l])) / len(rs[l])
            total += (h - 1 / (2 * hyper["beta"])) ** 2
        elif name == "simpo":
            z = hyper["beta"] * (sum(rs[w]) / len(rs[w]) - sum(rs[l]) / len(rs[l])) - hyper["gamma"]
            total += math.log1p(math.exp(-z))
    return total


CASES = [
    ("sft", None, {}),
    ("rft", None, {}),
    ("dft", None, {}),
    ("rift", None, {}),
    ("rift", None, {"negative_level": "sequence", "neg_reward": -0.5}),
    ("rift", "seed_linear", {"lam": 0.3}),
    ("offline_grpo", None, {}),
    ("offline_grpo", None, {"bias": 0.0}),
    ("offline_grpo", "krafton", {"bias": 0.2}),
    ("dpo", None, {}),
    ("dpo", None, {"beta": 0.5}),
    ("ipo", None, {}),
    ("ipo", None, {"beta": 0.05}),
    ("simpo", None, {}),
    ("simpo", None, {"beta": 2.5, "gamma": 0.3}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,variant,hyper", CASES)
def test_random_against_loop_reference(name, variant, hyper, seed):
    batch = random_batch(seed)
    full = validate_hyper(name, variant, hyper)
    label = name if variant is None else f"{name}/{variant}"
    ref = ref_pairs(label, batch, full) if name in ("dpo", "ipo", "simpo") else ref_offline(label, batch, full)
    loss, _ = get_loss(name, variant).fn(batch, normaliser=7.0, **full)
    assert ref != 0.0
    assert loss.item() == pytest.approx(ref / 7.0, rel=1e-5, abs=1e-7)


def test_bf16_logprobs_computed_in_float32():
    b = random_batch(3)
    b16 = LossBatch(logprobs=b.logprobs.bfloat16(), mask=b.mask)
    loss, _ = get_loss("sft").fn(b16, normaliser=1)
    assert loss.dtype == torch.float32
    ref = sum(-sum(float(v) for v in x) for x in rows(b16))
    assert loss.item() == pytest.approx(ref, rel=1e-6)


def test_dpo_metrics():
    b = random_batch(4)
    _, m = get_loss("dpo").fn(b, normaliser=4, beta=0.1)
    rs = rows(b)
    refs = [[float(b.ref_logprobs[i, j]) for j in range(9) if bool(b.mask[i, j])] for i in range(12)]
    cr = [0.1 * (sum(rs[w]) - sum(refs[w])) for w, _ in b.pair_index.tolist()]
    rr = [0.1 * (sum(rs[l]) - sum(refs[l])) for _, l in b.pair_index.tolist()]
    assert m["rewards_chosen"] == pytest.approx(sum(cr) / 4, rel=1e-5)
    assert m["reward_margin_mean"] == pytest.approx((sum(cr) - sum(rr)) / 4, rel=1e-5)
    assert m["reward_accuracy"] == pytest.approx(sum(c > r for c, r in zip(cr, rr)) / 4)


def test_offline_errors_name_the_problem():
    b = LossBatch(logprobs=torch.zeros(2, 3), mask=torch.ones(2, 3))
    with pytest.raises(WsgError, match="rewards"):
        get_loss("rft").fn(b, normaliser=1)
    with pytest.raises(WsgError, match="pair_index"):
        get_loss("dpo").fn(b, normaliser=1)
    with pytest.raises(WsgError, match="normaliser"):
        get_loss("sft").fn(b, normaliser=0)
    with pytest.raises(WsgError, match="neg_reward"):
        get_loss("rift").fn(hand_batch(**hand_rewards()), normaliser=1, neg_reward=0.3)
