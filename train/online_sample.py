"""The sampling side of an online cell, as pure functions over numbers: which
prompts a step draws, DAPO's reward shaping and dynamic sampling, and the
training batch built from the kept groups (docs/online.md).

Nothing here touches a model or an engine: `collect_groups` takes the
engine call as a function, so the refill logic is tested on plain numbers
(tests/train/test_online_sample.py) and driven by the real engine in train/online.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..core.errors import WsgError
from .data import TrainSet
from .losses_online import overlong_penalty

# --------------------------------------------------------------------------- prompt order

def stream_indices(n_items: int, *, seed: int, start: int, count: int) -> np.ndarray:
    """Items [start, start+count) of an endless stream of per-epoch
    permutations seeded by (seed, epoch): the prompts a cell draws are a pure
    function of (seed, cursor), so a resumed cell continues the same stream."""
    if n_items <= 0:
        raise WsgError("the online cell has no prompts: data.n_prompts must be > 0")
    out, pos, end = [], start, start + count
    while pos < end:
        epoch, off = divmod(pos, n_items)
        perm = np.random.default_rng([seed, epoch]).permutation(n_items)
        take = min(n_items - off, end - pos)
        out.append(perm[off:off + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- groups

@dataclass
class SampledGroup:
    """G completions of one prompt, as the engine returned them.

    completion_logprobs[i][t] is the behaviour policy's log-prob of token t of
    completion i (vLLM, logprobs=1): the denominator of the importance ratio.
    task_rewards: the verifier's reward (math-verify, binary).
    """

    prompt_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]]
    completion_logprobs: list[list[float]]
    finish_reasons: list[str]
    task_rewards: np.ndarray
    texts: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completion_token_ids], dtype=np.int64)

    @property
    def truncated(self) -> np.ndarray:
        return np.array([f == "length" for f in self.finish_reasons], dtype=bool)

    @property
    def informative(self) -> bool:
        """DAPO Eq. 11: 0 < #correct < G. A group whose rewards are all equal
        has zero group-relative advantage and so no gradient."""
        r = np.asarray(self.task_rewards, dtype=np.float64)
        return bool(r.size) and bool(np.ptp(r) > 0)


@dataclass
class CollectStats:
    rounds: int = 0                # engine calls made this step
    sampled_groups: int = 0
    uninformative_groups: int = 0  # all-equal rewards, among sampled
    dropped_groups: int = 0        # removed by dynamic sampling
    prompts_drawn: int = 0         # advance of the prompt cursor
    reward_sum: float = 0.0        # task rewards of every sampled completion, kept or not
    reward_count: int = 0

    @property
    def sampled_reward_mean(self) -> float:
        """Accuracy over everything sampled this step: the unbiased learning
        curve (DAPO's kept groups are informative ones by construction)."""
        return self.reward_sum / self.reward_count if self.reward_count else float("nan")

    @property
    def filtered_group_frac(self) -> float:
        return self.uninformative_groups / self.sampled_groups if self.sampled_groups else float("nan")


def collect_groups(
    sample_round: Callable[[int], list[SampledGroup]],
    *,
    prompts_per_step: int,
    dynamic: bool,
    max_resample_rounds: int,
) -> tuple[list[SampledGroup], CollectStats]:
    """The groups one step trains on.

    Without dynamic sampling (GRPO): one round of `prompts_per_step` prompts,
    every group kept (all-equal groups simply have zero advantage).
    With dynamic sampling (DAPO, Yu et al. 2025 §3.2): groups whose rewards
    are all equal are dropped and further rounds of `prompts_per_step` fresh
    prompts are sampled until `prompts_per_step` informative groups are
    collected, at most `max_resample_rounds` extra rounds; the batch is then
    cut to `prompts_per_step` groups, or left smaller when the cap is hit.
    `sample_round(n)` samples n fresh prompts and returns their groups."""
    if prompts_per_step <= 0:
        raise WsgError(f"online.prompts_per_step must be > 0, got {prompts_per_step}")
    stats, kept = CollectStats(), []
    for _ in range(1 + (max_resample_rounds if dynamic else 0)):
        groups = sample_round(prompts_per_step)
        stats.rounds += 1
        stats.prompts_drawn += prompts_per_step
        stats.sampled_groups += len(groups)
        for g in groups:
            stats.reward_sum += float(np.sum(g.task_rewards))
            stats.reward_count += len(g.task_rewards)
            if not g.informative:
                stats.uninformative_groups += 1
                if dynamic:
                    stats.dropped_groups += 1
                    continue
            kept.append(g)
        if not dynamic or len(kept) >= prompts_per_step:
            break
    if dynamic and len(kept) > prompts_per_step:
        kept = kept[:prompts_per_step]  # surplus informative groups of the last round are not used
    return kept, stats


# --------------------------------------------------------------------------- rewards

def shaped_rewards(
    task_rewards: np.ndarray, lengths: np.ndarray, *, max_tokens: int, buffer: int, penalty: float
) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025 Eq. 13) added to the
    task reward; buffer 0 or penalty 0 leaves the reward unchanged."""
    r = np.asarray(task_rewards, dtype=np.float64)
    if buffer <= 0 or penalty <= 0:
        return r.copy()
    pen = overlong_penalty(torch.as_tensor(lengths), max_len=max_tokens, buffer=min(buffer, max_tokens),
                           penalty=penalty)
    return r + pen.double().numpy()


# --------------------------------------------------------------------------- batch

@dataclass
class OnlineBatch:
    """The rows one optimizer step trains on.

    ts: sequences (prompt + completion) as a TrainSet whose items are the
    trained rows; behaviour: per row, the vLLM log-probs of its completion
    tokens; advantages are precomputed over each prompt's whole group (before
    overlong filtering), so micro-batches need not hold whole groups."""

    ts: TrainSet
    behaviour: list[np.ndarray]
    stats: dict


def build_batch(
    groups: list[SampledGroup],
    *,
    loss: str,
    advantage_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_tokens: int,
    overlong_buffer: int,
    overlong_penalty_value: float,
    overlong_filter: bool,
    pad_id: int,
) -> OnlineBatch:
    """Rewards → (optional) overlong shaping → group advantages → rows.

    overlong_filter (DAPO §3.4 "Overlong Filtering"): truncated completions
    (finish_reason "length") get no loss; their rewards still enter their
    group's mean. Rows with an empty completion carry no token and are left
    out."""
    seqs, n_prompt, rewards, task, gids, beh, keep = [], [], [], [], [], [], []
    for gi, g in enumerate(groups):
        lens, trunc = g.lengths, g.truncated
        if not (len(g.completion_token_ids) == len(g.completion_logprobs) == len(g.finish_reasons)
                == len(g.task_rewards)):
            raise WsgError(f"prompt {g.prompt_index}: the engine returned mismatched completions, logprobs, "
                           "finish reasons and rewards")
        r = shaped_rewards(g.task_rewards, lens, max_tokens=max_tokens, buffer=overlong_buffer,
                           penalty=overlong_penalty_value)
        for i, comp in enumerate(g.completion_token_ids):
            lp = np.asarray(g.completion_logprobs[i], dtype=np.float32)
            if lp.shape != (len(comp),):
                raise WsgError(f"prompt {g.prompt_index} sample {i}: {lp.shape[0]} behaviour log-probs for "
                               f"{len(comp)} tokens; sample with logprobs=1")
            seqs.append(list(g.prompt_token_ids) + list(comp))
            n_prompt.append(len(g.prompt_token_ids))
            rewards.append(r[i])
            task.append(float(g.task_rewards[i]))
            gids.append(gi)
            beh.append(lp)
            keep.append(len(comp) > 0 and not (overlong_filter and trunc[i]))
    rewards_a = np.asarray(rewards, dtype=np.float32)
    gids_a = np.asarray(gids, dtype=np.int64)
    adv = (advantage_fn(torch.from_numpy(rewards_a), torch.from_numpy(gids_a)).numpy().astype(np.float32)
           if len(rewards_a) else np.zeros(0, dtype=np.float32))
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    items = np.flatnonzero(np.asarray(keep, dtype=bool)).astype(np.int64)
    stats = _batch_stats(groups, items, rewards_a, task, lens, n_prompt, keep)
    ts = TrainSet(loss=loss, tokens=tokens, offsets=offsets, n_prompt=np.asarray(n_prompt, dtype=np.int32),
                  rewards=rewards_a, group_ids=gids_a, items=items, pad_id=int(pad_id), advantages=adv,
                  stats=stats)
    return OnlineBatch(ts=ts, behaviour=beh, stats=stats)


def _batch_stats(groups: list[SampledGroup], items: np.ndarray, rewards: np.ndarray, task: list[float],
                 lens: np.ndarray, n_prompt: list[int], keep: list[bool]) -> dict:
    """A batch's sample counts, rewards and completion lengths (lens: per row, prompt + completion)."""
    comp_lens = lens - np.asarray(n_prompt, dtype=np.int64) if len(lens) else lens
    trunc_all = np.concatenate([g.truncated for g in groups]) if groups else np.zeros(0, dtype=bool)
    return {
        "samples": len(lens),
        "trained_samples": int(items.size),
        "reward_mean": float(rewards.mean()) if len(rewards) else float("nan"),
        "task_reward_mean": float(np.mean(task)) if task else float("nan"),
        "response_len_mean": float(comp_lens.mean()) if len(comp_lens) else float("nan"),
        "response_len_max": int(comp_lens.max()) if len(comp_lens) else 0,
        "truncated_frac": float(trunc_all.mean()) if trunc_all.size else float("nan"),
        "overlong_filtered": int(sum(1 for k, t in zip(keep, trunc_all) if t and not k)),
    }


def micro_batches(ob: OnlineBatch, *, per_device_batch: int) -> list[np.ndarray]:
    """Item indices cut into micro-batches of ≤ per_device_batch rows, sorted
    by length so that neighbours in length share a forward (one normaliser
    per step makes the split irrelevant to the gradient, train/losses.py)."""
    n = len(ob.ts.items)
    if n == 0:
        return []
    order = np.argsort(ob.ts.item_lengths(), kind="stable")
    return np.array_split(order, -(-n // per_device_batch))


def behaviour_tensor(ob: OnlineBatch, item_idx: np.ndarray, width: int) -> torch.Tensor:
    """[B, width] behaviour log-probs of the rows `item_idx` (0 past the end:
    those positions are off the mask)."""
    rows = ob.ts.items[item_idx]
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for k, r in enumerate(rows):
        lp = ob.behaviour[r]
        out[k, :len(lp)] = torch.from_numpy(lp)
    return out
