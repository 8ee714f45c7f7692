"""The loss registry and the one-normaliser contract: splitting a global
batch into micro-batches and ranks gives exactly the full batch's gradient."""
from __future__ import annotations

import pytest
import torch
from wsg.core.errors import WsgError
from wsg.train.losses import (
    LOSSES,
    check_batch,
    count_units,
    get_loss,
    normaliser_for,
    normaliser_from_count,
    precompute_advantages,
    validate_hyper,
)
from wsg.train.losses_batch import LossBatch

B, T, V = 16, 7, 9  # four prompts × four completions


def make_batch(logits: torch.Tensor, seed: int = 0) -> LossBatch:
    """A full batch whose logprobs are a function of the `logits` leaf."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    noise = torch.randn(2, B, T, generator=g)
    rewards = (torch.rand(B, generator=g) < 0.6).float()
    rewards[4:8] = 1.0  # an all-correct group
    rewards[0], rewards[1] = 1.0, 0.0
    # one (chosen, rejected) pair inside each group
    pairs = torch.tensor([[0, 1], [6, 5], [9, 8], [12, 15]])
    return LossBatch(
        logprobs=lp,
        mask=torch.arange(T)[None, :] < lengths[:, None],
        rewards=rewards,
        group_ids=torch.arange(B) // 4,
        ref_logprobs=lp.detach() + 0.3 * noise[0],
        behaviour_logprobs=lp.detach() + 0.3 * noise[1],
        pair_index=pairs,
    )


def all_specs():
    out = []
    for name, spec in LOSSES.items():
        out.append((name, None))
        out.extend((name, v) for v in spec.variants)
    return out


def hyper_for(name):
    return {"kl_coef": 0.05} if name in ("online_grpo", "online_dapo") else {}


def grad_of(pieces, spec, hyper, logits0, normaliser):
    """Sum of per-piece backward passes, each piece (row list) rebuilt from
    the same leaf as the trainer's micro-batches would be."""
    logits = logits0.clone().requires_grad_(True)
    total = 0.0
    for rows in pieces:
        mb = make_batch(logits).select(rows)
        check_batch(spec, mb, hyper)
        loss, _ = spec.fn(mb, normaliser=normaliser, **hyper)
        loss.backward()
        total += loss.item()
    return logits.grad, total


# Micro-batches holding whole groups (and pairs), of uneven sizes, across
# two "ranks": rank 0 runs [g0] then [g1, g2]; rank 1 runs [g3].
RANKS = [[list(range(0, 4)), list(range(4, 12))], [list(range(12, 16))]]


@pytest.mark.parametrize("name,variant", all_specs())
def test_micro_batches_and_ranks_give_the_full_gradient(name, variant):
    spec = get_loss(name, variant)
    hyper = validate_hyper(name, variant, hyper_for(name))
    logits0 = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1)) * 2.0
    full = make_batch(logits0)
    pieces = [rows for rank in RANKS for rows in rank]
    # the trainer sums unit counts over all micro-batches of all ranks
    normaliser = normaliser_from_count(sum(count_units(spec, full.select(r), hyper) for r in pieces))
    assert normaliser == normaliser_for(spec, [full], hyper)
    g_full, l_full = grad_of([list(range(B))], spec, hyper, logits0, normaliser)
    # each rank accumulates its micro-batches; the all-reduce sums the ranks
    rank_grads = [grad_of(rank, spec, hyper, logits0, normaliser)[0] for rank in RANKS]
    g_split = torch.stack(rank_grads).sum(0)
    assert g_full.abs().sum() > 0
    torch.testing.assert_close(g_split, g_full, rtol=1e-5, atol=1e-7)
    _, l_split = grad_of(pieces, spec, hyper, logits0, normaliser)
    assert l_split == pytest.approx(l_full, rel=1e-5, abs=1e-7)


def test_per_micro_batch_normalisers_would_not_match():
    """The check above has teeth: normalising each micro-batch by its own
    token count (the classic accumulation bug) changes the gradient."""
    spec = get_loss("online_dapo")
    hyper = validate_hyper("online_dapo")
    logits0 = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))
    g_full, _ = grad_of([list(range(B))], spec, hyper, logits0, count_units(spec, make_batch(logits0), hyper))
    logits = logits0.clone().requires_grad_(True)
    for rows in [list(range(0, 4)), list(range(4, 16))]:
        mb = make_batch(logits).select(rows)
        spec.fn(mb, normaliser=count_units(spec, mb, hyper), **hyper)[0].backward()
    assert not torch.allclose(logits.grad / 2, g_full, rtol=1e-3)


@pytest.mark.parametrize(
    "name,variant", [("offline_grpo", None), ("offline_grpo", "krafton"), ("online_grpo", None), ("online_dapo", None)]
)
def test_precomputed_advantages_allow_splitting_groups(name, variant):
    spec = get_loss(name, variant)
    hyper = validate_hyper(name, variant, {})
    logits0 = torch.randn(B, T, V, generator=torch.Generator().manual_seed(2))
    full = make_batch(logits0)
    adv = precompute_advantages(spec, full.rewards, full.group_ids, hyper)
    n = normaliser_for(spec, [full], hyper)

    def run(pieces):
        logits = logits0.clone().requires_grad_(True)
        for rows in pieces:
            b = make_batch(logits)
            b.advantages = adv
            mb = b.select(rows)
            mb.rewards, mb.group_ids = None, None  # the loss must not need them now
            check_batch(spec, mb, hyper)
            spec.fn(mb, normaliser=n, **hyper)[0].backward()
        return logits.grad

    g_full = run([list(range(B))])
    g_split = run([[0, 1, 2, 5, 6], [3, 4, 7, 8, 9, 10], [11, 12, 13, 14, 15]])  # cuts through groups
    torch.testing.assert_close(g_split, g_full, rtol=1e-5, atol=1e-7)
    # and precomputed advantages equal what the loss computes itself
    lp_loss = spec.fn(make_batch(logits0), normaliser=n, **hyper)[0]
    b = make_batch(logits0)
    b.advantages = adv
    assert spec.fn(b, normaliser=n, **hyper)[0].item() == pytest.approx(lp_loss.item(), rel=1e-6)


def test_count_units_by_unit():
    b = make_batch(torch.randn(B, T, V))
    assert count_units(get_loss("sft"), b) == B
    assert count_units(get_loss("dft"), b) == int(b.mask.sum())
    assert count_units(get_loss("online_dapo"), b) == int(b.mask.sum())
    assert count_units(get_loss("dpo"), b) == 4
    assert count_units(get_loss("rft"), b) == int((b.rewards >= 0.5).sum())
    assert count_units(get_loss("rft"), b, {"positive_threshold": 2.0}) == 0
    assert normaliser_from_count(0) == 1.0


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(WsgError) as e:
        get_loss("ppo")
    for name in LOSSES:
        assert name in str(e.value)
    with pytest.raises(WsgError, match="krafton"):
        get_loss("offline_grpo", "nope")
    with pytest.raises(WsgError, match="no variants"):
        get_loss("sft", "x")


def test_validate_hyper():
    assert validate_hyper("dpo") == {"beta": 0.1}
    assert validate_hyper("dpo", None, {"beta": 1}) == {"beta": 1.0}
    assert validate_hyper("rift", "seed_linear", {"lam": 0.2}) == {"lam": 0.2}
    with pytest.raises(WsgError) as e:
        validate_hyper("dpo", None, {"betta": 0.2})
    assert "betta" in str(e.value) and "beta" in str(e.value)
    with pytest.raises(WsgError, match="scale_std"):
        validate_hyper("online_grpo", None, {"scale_std": 1.0})
    with pytest.raises(WsgError, match="beta"):
        validate_hyper("dpo", None, {"beta": "0.1"})


def test_registry_declares_what_each_loss_reads():
    assert get_loss("dpo").needs == {"pair_index", "ref_logprobs"}
    assert get_loss("simpo").needs == {"pair_index"}
    assert get_loss("online_dapo").online and not get_loss("dpo").online
    b = make_batch(torch.randn(B, T, V))
    bare = LossBatch(logprobs=b.logprobs, mask=b.mask, rewards=b.rewards)
    with pytest.raises(WsgError, match="group_ids"):
        check_batch(get_loss("offline_grpo"), bare)
    with pytest.raises(WsgError, match="ref_logprobs"):
        check_batch(get_loss("online_grpo"), LossBatch(**{**b.__dict__, "ref_logprobs": None}), {"kl_coef": 0.1})
    check_batch(get_loss("online_grpo"), LossBatch(**{**b.__dict__, "ref_logprobs": None}))


def test_select_keeps_pairs_whole():
    b = make_batch(torch.randn(B, T, V))
    sub = b.select([5, 6, 7, 4])
    assert sub.pair_index.tolist() == [[1, 0]]  # (6, 5) re-indexed
    with pytest.raises(WsgError, match="pair"):
        b.select([0, 2, 3])


def test_batch_shape_errors():
    with pytest.raises(WsgError, match="mask"):
        LossBatch(logprobs=torch.zeros(2, 3), mask=torch.ones(2, 4))
    with pytest.raises(WsgError, match="rewards"):
        LossBatch(logprobs=torch.zeros(2, 3), mask=torch.ones(2, 3), rewards=torch.ones(3))
    with pytest.raises(WsgError, match="pair_index"):
        LossBatch(logprobs=torch.zeros(2, 3), mask=torch.ones(2, 3), pair_index=torch.tensor([[0, 2]]))
