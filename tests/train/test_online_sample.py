"""The sampling side of online cells (train/online_sample.py) on random
inputs, each checked against an independent loop computation: the prompt
stream, DAPO's dynamic sampling, overlong shaping and filtering, group
advantages, and the token-level objective over micro-batches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from wsg.train.data import collate
from wsg.train.losses import (
    LossBatch,
    count_units,
    get_loss,
    normaliser_from_count,
    precompute_advantages,
)
from wsg.train.online_sample import (
    SampledGroup,
    behaviour_tensor,
    build_batch,
    collect_groups,
    micro_batches,
    shaped_rewards,
    stream_indices,
)


def random_group(rng, idx: int, *, g: int, max_tokens: int, p_correct: float) -> SampledGroup:
    prompt = rng.integers(5, 50, size=int(rng.integers(2, 6))).tolist()
    comps, lps, fins = [], [], []
    for _ in range(g):
        n = int(rng.integers(1, max_tokens + 1))
        comps.append(rng.integers(5, 50, size=n).tolist())
        lps.append((-rng.exponential(1.0, size=n)).tolist())
        fins.append("length" if n == max_tokens else "stop")
    rewards = (rng.random(g) < p_correct).astype(np.float64)
    return SampledGroup(prompt_index=idx, prompt_token_ids=prompt, completion_token_ids=comps,
                        completion_logprobs=lps, finish_reasons=fins, task_rewards=rewards)


# --------------------------------------------------------------------------- prompt stream

@pytest.mark.parametrize("n_items,seed", [(7, 0), (16, 3)])
def test_stream_is_a_sequence_of_epoch_permutations(n_items, seed):
    total = 3 * n_items + 2
    stream = stream_indices(n_items, seed=seed, start=0, count=total)
    for e in range(3):
        epoch = stream[e * n_items:(e + 1) * n_items]
        assert sorted(epoch.tolist()) == list(range(n_items))
        want = np.random.default_rng([seed, e]).permutation(n_items)
        assert epoch.tolist() == want.tolist()
    # windows compose: any split of the stream gives the same prompts (resume)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, total), size=4, replace=False))
    parts, pos = [], 0
    for c in list(cuts) + [total]:
        parts.append(stream_indices(n_items, seed=seed, start=pos, count=int(c - pos)))
        pos = int(c)
    assert np.concatenate(parts).tolist() == stream.tolist()


# --------------------------------------------------------------------------- overlong shaping

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shaped_rewards_match_dapo_eq13(seed):
    rng = np.random.default_rng(seed)
    max_tokens, buffer, penalty = 64, 16, 0.7
    lengths = rng.integers(1, max_tokens + 1, size=40)
    task = (rng.random(40) < 0.4).astype(float)
    got = shaped_rewards(task, lengths, max_tokens=max_tokens, buffer=buffer, penalty=penalty)
    for r, n, v in zip(task, lengths, got):
        # Yu et al. 2025 Eq. 13 with L_max = max_tokens, L_cache = buffer
        if n <= max_tokens - buffer:
            pen = 0.0
        elif n <= max_tokens:
            pen = ((max_tokens - buffer) - n) / buffer * penalty
        else:
            pen = -penalty
        assert v == pytest.approx(r + pen, abs=1e-6)
    assert shaped_rewards(task, lengths, max_tokens=max_tokens, buffer=0, penalty=1.0).tolist() == task.tolist()


# --------------------------------------------------------------------------- dynamic sampling

def _rounds_sampler(rng, *, g: int, p_correct: float):
    made = []

    def sample(n: int):
        out = [random_group(rng, len(made) + i, g=g, max_tokens=8, p_correct=p_correct) for i in range(n)]
        made.extend(out)
        return out

    return sample, made


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p_correct", [0.08, 0.3, 0.9])
def test_dynamic_sampling_against_reference(seed, p_correct):
    rng = np.random.default_rng(seed)
    per_step, cap = 4, 3
    sample, made = _rounds_sampler(rng, g=4, p_correct=p_correct)
    kept, st = collect_groups(sample, prompts_per_step=per_step, dynamic=True, max_resample_rounds=cap)
    # Reference: rounds of per_step groups until per_step informative ones
    # (0 < #correct < G) are seen or 1 + cap rounds ran; keep the first per_step.
    informative = [0 < int(gr.task_rewards.sum()) < 4 for gr in made]
    rounds, seen = 0, 0
    while rounds < 1 + cap:
        rounds += 1
        seen = sum(informative[: rounds * per_step])
        if seen >= per_step:
            break
    assert st.rounds == rounds and len(made) == rounds * per_step
    want = [gr for gr, ok in zip(made, informative) if ok][:per_step]
    assert [id(k) for k in kept] == [id(w) for w in want]
    assert st.dropped_groups == informative.count(False) == st.uninformative_groups
    assert st.filtered_group_frac == pytest.approx(informative.count(False) / len(made))
    assert st.prompts_drawn == rounds * per_step
    assert st.sampled_reward_mean == pytest.approx(np.mean([gr.task_rewards for gr in made]))


@pytest.mark.parametrize("seed", range(3))
def test_grpo_keeps_every_group_in_one_round(seed):
    rng = np.random.default_rng(seed)
    sample, made = _rounds_sampler(rng, g=4, p_correct=0.2)
    kept, st = collect_groups(sample, prompts_per_step=5, dynamic=False, max_resample_rounds=4)
    assert kept == made and st.rounds == 1 and st.dropped_groups == 0
    flat = [np.ptp(gr.task_rewards) == 0 for gr in made]
    assert st.filtered_group_frac == pytest.approx(sum(flat) / 5)


# --------------------------------------------------------------------------- batch + objective

def _reference_dapo(groups, current, *, max_tokens, buffer, penalty, eps_low, eps_high, std_eps, filt):
    """DAPO's objective by loops: shaped rewards, group mean/std (Bessel),
    truncated rows dropped, PPO clip per token, mean over all kept tokens."""
    total, n_tok = 0.0, 0
    for gi, g in enumerate(groups):
        r = []
        for i, c in enumerate(g.completion_token_ids):
            n = len(c)
            pen = 0.0 if n <= max_tokens - buffer else ((max_tokens - buffer) - n) / buffer * penalty
            r.append(float(g.task_rewards[i]) + pen)
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        for i, c in enumerate(g.completion_token_ids):
            if filt and g.finish_reasons[i] == "length":
                continue
            a = (r[i] - mean) / (std + std_eps)
            for t in range(len(c)):
                ratio = math.exp(current[(gi, i)][t] - g.completion_logprobs[i][t])
                clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
                total += -min(ratio * a, clipped * a)
                n_tok += 1
    return total / max(n_tok, 1), n_tok


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("filt", [True, False])
def test_batch_and_dapo_objective_against_loops(seed, filt):
    rng = np.random.default_rng(seed)
    max_tokens, buffer, penalty = 12, 4, 1.0
    groups = [random_group(rng, i, g=4, max_tokens=max_tokens, p_correct=0.5) for i in range(5)]
    spec = get_loss("online_dapo")
    hyper = {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "kl_coef": 0.0, "scale_std": True, "std_eps": 1e-4}
    ob = build_batch(groups, loss="online_dapo", pad_id=0, max_tokens=max_tokens,
                     advantage_fn=lambda r, g: precompute_advantages(spec, r, g, hyper),
                     overlong_buffer=buffer, overlong_penalty_value=penalty, overlong_filter=filt)
    rows = [(gi, i) for gi, g in enumerate(groups) for i in range(len(g.completion_token_ids))]
    truncated = [groups[gi].finish_reasons[i] == "length" for gi, i in rows]
    assert ob.ts.items.tolist() == [k for k, tr in enumerate(truncated) if not (filt and tr)]
    for k, (gi, i) in enumerate(rows):  # sequences are prompt then completion
        seq = ob.ts.tokens[ob.ts.offsets[k]:ob.ts.offsets[k + 1]].tolist()
        assert seq == groups[gi].prompt_token_ids + groups[gi].completion_token_ids[i]
    # the current policy's log-probs: behaviour plus noise, so ratios clip
    current = {(gi, i): (np.asarray(groups[gi].completion_logprobs[i]) + rng.normal(0, 0.3, size=len(
        groups[gi].completion_token_ids[i]))).tolist() for gi, i in rows}
    mbs = [(collate(ob.ts, idx), idx) for idx in micro_batches(ob, per_device_batch=3)]
    covered = np.sort(np.concatenate([ob.ts.items[idx] for _, idx in mbs]))
    assert covered.tolist() == sorted(ob.ts.items.tolist()) and all(len(idx) <= 3 for _, idx in mbs)

    def batch_of(mb, idx):
        lp = torch.zeros(mb.mask.shape)
        for b, r in enumerate(ob.ts.items[idx]):
            cur = current[rows[r]]
            lp[b, :len(cur)] = torch.tensor(cur)
        return LossBatch(logprobs=lp, mask=mb.mask, rewards=mb.rewards, group_ids=mb.group_ids,
                         behaviour_logprobs=behaviour_tensor(ob, idx, mb.mask.shape[1]), advantages=mb.advantages)

    batches = [batch_of(mb, idx) for mb, idx in mbs]
    norm = normaliser_from_count(sum(count_units(spec, b, hyper) for b in batches))
    got = sum(float(spec.fn(b, normaliser=norm, **hyper)[0]) for b in batches)
    want, n_tok = _reference_dapo(groups, current, max_tokens=max_tokens, buffer=buffer, penalty=penalty,
                                  eps_low=0.2, eps_high=0.28, std_eps=1e-4, filt=filt)
    assert norm == max(n_tok, 1)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_grpo_advantages_without_std_are_mean_centred(seed):
    rng = np.random.default_rng(seed)
    groups = [random_group(rng, i, g=6, max_tokens=10, p_correct=0.4) for i in range(4)]
    spec = get_loss("online_grpo")
    hyper = {"scale_std": False}
    ob = build_batch(groups, loss="online_grpo", pad_id=0, max_tokens=10,
                     advantage_fn=lambda r, g: precompute_advantages(spec, r, g, hyper),
                     overlong_buffer=0, overlong_penalty_value=1.0, overlong_filter=False)
    want = np.concatenate([g.task_rewards - g.task_rewards.mean() for g in groups])
    assert ob.ts.advantages == pytest.approx(want, abs=1e-6)
    assert ob.stats["task_reward_mean"] == pytest.approx(np.mean([g.task_rewards for g in groups]))
    assert len(ob.ts.items) == sum(len(g.completion_token_ids) for g in groups)


def test_behaviour_tensor_lines_up_with_the_completion_mask():
    rng = np.random.default_rng(5)
    groups = [random_group(rng, i, g=3, max_tokens=9, p_correct=0.5) for i in range(3)]
    ob = build_batch(groups, loss="online_grpo", pad_id=0, max_tokens=9, advantage_fn=lambda r, g: r * 0,
                     overlong_buffer=0, overlong_penalty_value=1.0, overlong_filter=False)
    idx = np.arange(len(ob.ts.items))
    mb = collate(ob.ts, idx)
    beh = behaviour_tensor(ob, idx, mb.mask.shape[1])
    flat = [lp for g in groups for lp in g.completion_logprobs]
    for b in range(len(idx)):
        n = int(mb.mask[b].sum())
        assert n == len(flat[b])
        assert beh[b, :n].tolist() == pytest.approx(flat[b])
        assert (beh[b, n:] == 0).all()
        # the target tokens of the mask are the completion tokens, in order
        targets = torch.cat([f.targets for f in mb.forwards])  # in the order of mb.rows
        got = targets[mb.rows == b].tolist()
        gi, i = divmod(b, 3)
        assert got == groups[gi].completion_token_ids[i]
