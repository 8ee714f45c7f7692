"""Training data of an offline cell: tokenized rollouts, the seeded data
order, and length-bucketed micro-batches.

Every offline loss trains on the same `rollouts.parquet` (the seed paper's
central control, §2 Data); pair losses read `pairs.parquet`, whose rows point
back into the rollouts by (prompt_id, sample_idx). A `TrainSet` holds one
token sequence per rollout (prompt ids + completion ids, flat int32 arrays)
and the list of training *items*: rollout rows (sequence losses) or
(chosen, rejected) row pairs (pair losses). It is built and validated once,
by the driver, before any worker starts.

Batching keeps the optimizer's batch a pure function of (seed, step): step s
takes items [s·E, (s+1)·E) of a stream of per-epoch seeded permutations
(E = train.effective_batch). Inside that global batch, items are sorted by
length and cut into micro-batches, so little compute goes to padding; since
every loss is a sum over units divided by one normaliser per optimizer step
(train/losses.py), how a batch is split does not change its gradient. A
resume from any checkpoint therefore needs only the step number.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import rundir
from ..core.config import ExperimentConfig
from ..core.errors import WsgError
from ..core.layout import RunLayout
from .losses import get_loss, precompute_advantages, validate_hyper
from .losses_batch import is_positive

ROLLOUT_COLUMNS = ("prompt_id", "sample_idx", "prompt_text", "completion", "reward", "prompt_token_ids",
                   "completion_token_ids", "finish_reason")
PAIR_COLUMNS = ("prompt_id", "chosen_sample_idx", "rejected_sample_idx")


@dataclass
class TrainSet:
    """Tokenized rollouts plus the items one loss trains on.

    tokens/offsets: sequence i is tokens[offsets[i]:offsets[i+1]] (prompt then
    completion); n_prompt[i] of those are prompt tokens. items: [U] rollout
    rows, or [U, 2] (chosen, rejected) rows for pair losses. advantages: the
    group-relative advantages over each prompt's whole group (offline GRPO),
    so micro-batches need not hold whole groups.
    """

    loss: str
    tokens: np.ndarray
    offsets: np.ndarray
    n_prompt: np.ndarray
    rewards: np.ndarray
    group_ids: np.ndarray
    items: np.ndarray
    pad_id: int
    advantages: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.items.ndim == 2

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def item_lengths(self) -> np.ndarray:
        """Padded width an item needs: its length, or the longer of a pair."""
        lens = self.lengths
        return lens[self.items].max(axis=1) if self.paired else lens[self.items]


# --------------------------------------------------------------------------- building

def policy_is_teacher(cfg: ExperimentConfig) -> bool:
    """Stored token ids are the policy's own only when the policy sampled them."""
    return cfg.rollouts.backend == "vllm" and cfg.rollouts.teacher in (None, cfg.model.name)


def _require(table, cols, path):
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise WsgError(f"{path} lacks column(s) {missing}; regenerate it with `wsg rollouts`")


def _read(path: str, cols, run: str):
    if not rundir.exists(path):
        raise WsgError(f"{path} does not exist: run `wsg rollouts CONFIG --run {run}` first")
    table = rundir.read_table(path)
    _require(table, cols, path)
    return table, path


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _sequences(cfg: ExperimentConfig, table, tokenizer) -> tuple[list, list, str]:
    """(prompt ids, completion ids, how) per rollout row."""
    stored_p = table.column("prompt_token_ids").to_pylist()
    stored_c = table.column("completion_token_ids").to_pylist()
    if policy_is_teacher(cfg) and all(stored_p) and all(c is not None for c in stored_c):
        vocab = len(tokenizer)
        top = max((max(x) for x in stored_p + stored_c if x), default=0)
        if top >= vocab:
            raise WsgError(f"rollouts.parquet holds token id {top} but the policy tokenizer has {vocab} "
                           "tokens: the rollouts were sampled by another model; set rollouts.teacher")
        return stored_p, stored_c, "stored"
    # Another teacher: its token ids mean nothing to the policy. Re-tokenize the
    # exact prompt text and the completion separately (so the boundary is
    # known) and close finished completions with the policy's EOS.
    prompts = _tokenize(tokenizer, table.column("prompt_text").to_pylist())
    comps = _tokenize(tokenizer, table.column("completion").to_pylist())
    eos = tokenizer.eos_token_id
    for c, fin in zip(comps, table.column("finish_reason").to_pylist()):
        if fin == "stop" and eos is not None and (not c or c[-1] != eos):
            c.append(eos)
    return prompts, comps, "retokenized"


def build_train_set(cfg: ExperimentConfig, run: str, *, loss: str, tokenizer) -> TrainSet:
    """Read the run's rollouts (and pairs), tokenize for the policy, pick the
    items `loss` trains on, and refuse unusable input with a WsgError."""

    lcfg = cfg.loss_cfg(loss)
    spec = get_loss(loss, lcfg.variant)
    if spec.online:
        raise WsgError(f"{loss!r} is an online loss: it trains on its own samples, not on the rollouts")
    hyper = validate_hyper(loss, lcfg.variant, lcfg.hyper)
    table, path = _read(RunLayout.of(run).rollouts, ROLLOUT_COLUMNS, run)
    if table.num_rows == 0:
        raise WsgError(f"{path} has no rows: rerun `wsg rollouts` (did every prompt fail?)")

    prompts, comps, how = _sequences(cfg, table, tokenizer)
    rewards = _rewards(table, path)
    pids = table.column("prompt_id").to_pylist()
    uniq = {p: i for i, p in enumerate(dict.fromkeys(pids))}
    group_ids = np.array([uniq[p] for p in pids], dtype=np.int64)
    seqs, n_prompt, keep, n_trunc = _truncate(prompts, comps, cfg.train.max_seq_len, path)

    advantages = None
    if spec.advantage_fn is not None:
        # Over each prompt's whole group (all K samples), as seed §2 defines Â_i.
        advantages = precompute_advantages(spec, torch.from_numpy(rewards), torch.from_numpy(group_ids),
                                           lcfg.hyper).numpy().astype(np.float32)

    stats = {"rows": len(prompts), "dropped_too_long_or_empty": int((~keep).sum()),
             "truncated": int(n_trunc), "tokenization": how}
    if spec.paired:
        items = _pair_items(run, table, keep)
        stats["pairs"] = int(len(items))
    else:
        items = _row_items(spec, loss, hyper, rewards, keep, path)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainSet(loss=loss, tokens=tokens, offsets=offsets, n_prompt=n_prompt, rewards=rewards,
                    group_ids=group_ids, items=items, pad_id=int(pad or 0), advantages=advantages, stats=stats)


def _rewards(table, path: str) -> np.ndarray:
    rewards = np.asarray(table.column("reward").to_numpy(zero_copy_only=False), dtype=np.float32)
    if not np.isfinite(rewards).all():
        bad = int((~np.isfinite(rewards)).sum())
        raise WsgError(f"{path}: {bad} reward(s) are NaN/inf; rewards must be finite numbers (rerun `wsg rollouts`)")
    return rewards


def _truncate(prompts: list, comps: list, max_len: int, path: str) -> tuple[list, np.ndarray, np.ndarray, int]:
    """(sequences, prompt lengths, kept rows, number truncated): completions
    cut to train.max_seq_len; a row whose prompt leaves no room for one
    completion token (or with an empty prompt/completion) is dropped."""
    keep = np.zeros(len(prompts), dtype=bool)
    seqs, n_prompt, n_trunc = [], np.zeros(len(prompts), dtype=np.int32), 0
    for i, (p, c) in enumerate(zip(prompts, comps)):
        room = max_len - len(p)
        if room < 1 or not c or not p:
            seqs.append([])
            continue
        n_trunc += len(c) > room
        seqs.append(list(p) + list(c[:room]))
        n_prompt[i], keep[i] = len(p), True
    if not keep.any():
        raise WsgError(f"{path}: no rollout fits train.max_seq_len={max_len} with at least one completion "
                       f"token (longest prompt: {max(map(len, prompts))} tokens); raise train.max_seq_len")
    return seqs, n_prompt, keep, n_trunc


def _row_items(spec, loss: str, hyper: dict, rewards: np.ndarray, keep: np.ndarray, path: str) -> np.ndarray:
    """The rows a per-sequence loss trains on: every kept row, or only the
    positive ones for a loss on positive sequences (RFT)."""
    rows = np.flatnonzero(keep)
    if spec.unit == "positive_sequences":
        pos = is_positive(torch.from_numpy(rewards), hyper["positive_threshold"]).numpy()
        n_pos_all = int(pos.sum())
        rows = rows[pos[rows]]
        if rows.size == 0:
            raise WsgError(
                f"loss {loss}: {path} has no positive rollouts (reward ≥ {hyper['positive_threshold']}) "
                f"among {len(keep)} rows ({n_pos_all} before dropping rows over train.max_seq_len); "
                "RFT trains only on positives: sample more (rollouts.k), use easier prompts, or raise "
                "train.max_seq_len")
    return rows.astype(np.int64)


def _pair_items(run: str, rollouts, keep: np.ndarray) -> np.ndarray:
    pairs, path = _read(RunLayout.of(run).pairs, PAIR_COLUMNS, run)
    if pairs.num_rows == 0:
        raise WsgError(f"{path} has no (chosen, rejected) pairs: no prompt had both a correct and a wrong "
                       "sample; pair losses (dpo, ipo, simpo) need them: sample more (rollouts.k) or use "
                       "prompts of middling difficulty")
    row_of = {(p, int(s)): i for i, (p, s) in enumerate(zip(rollouts.column("prompt_id").to_pylist(),
                                                            rollouts.column("sample_idx").to_pylist()))}
    out = []
    for p, c, r in zip(pairs.column("prompt_id").to_pylist(), pairs.column("chosen_sample_idx").to_pylist(),
                       pairs.column("rejected_sample_idx").to_pylist()):
        if (p, int(c)) not in row_of or (p, int(r)) not in row_of:
            raise WsgError(f"{path}: pair (prompt {p!r}, samples {c}/{r}) has no matching rows in "
                           "rollouts.parquet; regenerate both with `wsg rollouts`")
        i, j = row_of[(p, int(c))], row_of[(p, int(r))]
        if keep[i] and keep[j]:
            out.append((i, j))
    if not out:
        raise WsgError(f"{path}: none of its {pairs.num_rows} pairs fits train.max_seq_len; raise it")
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- data order

def step_items(n_items: int, *, seed: int, step: int, per_step: int) -> np.ndarray:
    """Indices (into TrainSet.items) of optimizer step `step` (0-based): a
    window of the stream of per-epoch permutations seeded by (seed, epoch)."""
    start = step * per_step
    out, pos = [], start
    while pos < start + per_step:
        epoch, off = divmod(pos, n_items)
        perm = np.random.default_rng([seed, epoch]).permutation(n_items)
        take = min(n_items - off, start + per_step - pos)
        out.append(perm[off:off + take])
        pos += take
    return np.concatenate(out)


def micro_batches_per_rank(*, paired: bool, per_device_batch: int, grad_accum: int) -> tuple[int, int]:
    """(micro-batches per rank per step, units per micro-batch). A micro-batch
    holds at most per_device_batch sequences for every loss, so a pair loss
    (two sequences per unit) runs its per_device_batch pairs in two halves:
    the same memory per forward as a sequence loss; the optimizer still sees
    effective_batch pairs per step."""
    upm = max(1, per_device_batch // 2) if paired else per_device_batch
    return -(-(per_device_batch * grad_accum) // upm), upm


def plan_step(ts: TrainSet, *, seed: int, step: int, effective_batch: int, num_workers: int,
              per_device_batch: int, grad_accum: int) -> list[list[np.ndarray]]:
    """plan[rank][micro] = item indices of that micro-batch at `step`.

    The global batch is sorted by length (stable) and cut into
    num_workers × M chunks of near-equal size; chunk c goes to rank c mod W,
    so each rank holds the same number of micro-batches (DeepSpeed needs a
    fixed accumulation count) and neighbours in length share a forward."""
    idx = step_items(len(ts.items), seed=seed, step=step, per_step=effective_batch)
    order = np.argsort(ts.item_lengths()[idx], kind="stable")
    m, _ = micro_batches_per_rank(paired=ts.paired, per_device_batch=per_device_batch, grad_accum=grad_accum)
    chunks = np.array_split(idx[order], num_workers * m)
    return [[chunks[j * num_workers + r] for j in range(m)] for r in range(num_workers)]


def epoch_at(ts: TrainSet, *, step: int, effective_batch: int) -> float:
    """Fractional epoch after `step` optimizer steps."""
    return step * effective_batch / len(ts.items)


# --------------------------------------------------------------------------- the offline batch source

@dataclass
class StepBatch:
    """What a batch source gives one rank for one optimizer step: its
    micro-batches, an optional observer of the training forward
    (train/steps.py train_step) and the source's own metrics for the row."""

    micro_batches: list
    observer: object = None
    metrics: dict = field(default_factory=dict)


class RolloutSource:
    """Batches of an offline cell: step s trains on items [s·E, (s+1)·E) of
    the data seed's stream of permutations of the shared rollouts (or pairs),
    this rank's share of them. Stateless beyond the step number, so a resume
    needs nothing else."""

    def __init__(self, task, ts: TrainSet, *, rank: int, world: int):
        self.ts, self.rank, self.world = ts, rank, world
        self.t, self.seed = task.cfg.train, task.key.data_seed
        self.micro_per_step, self.units_per_micro = micro_batches_per_rank(
            paired=ts.paired, per_device_batch=self.t.per_device_batch, grad_accum=self.t.grad_accum)

    def begin(self) -> None:
        pass

    def ready(self, policy) -> None:
        pass

    def batch(self, step: int) -> StepBatch:
        t = self.t
        plan = plan_step(self.ts, seed=self.seed, step=step, effective_batch=t.effective_batch,
                         num_workers=self.world, per_device_batch=t.per_device_batch, grad_accum=t.grad_accum)
        return StepBatch([collate(self.ts, idx) for idx in plan[self.rank]],
                         metrics={"epoch": epoch_at(self.ts, step=step + 1, effective_batch=t.effective_batch)})

    def after_step(self, policy, step: int, *, last: bool) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- collation

#: Per-forward cost in token-equivalents when a micro-batch is split into
#: forwards of similar lengths (kernel launches, layer loops): splitting pays
#: when it saves more padded tokens than this.
FORWARD_OVERHEAD_TOKENS = 64


def split_by_length(sorted_lengths: np.ndarray, *, overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Contiguous [start, end) groups of ascending lengths minimising
    Σ_groups (rows × longest) + overhead × groups: padded tokens computed plus
    a per-forward cost (exact dynamic programme; n ≤ a micro-batch)."""
    n = len(sorted_lengths)
    best, cut = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        costs = [best[i] + (j - i) * sorted_lengths[j - 1] + overhead for i in range(j)]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    out, j = [], n
    while j > 0:
        out.append((int(cut[j]), j))
        j = int(cut[j])
    return out[::-1]


@dataclass
class Forward:
    """One forward pass: rows of similar length, right-padded to the longest.
    Local row r predicts token `targets` from position `cols`."""

    input_ids: torch.Tensor   # [g, L]
    rows: torch.Tensor        # [n] local row of each completion token
    cols: torch.Tensor        # [n] position whose hidden state predicts it
    targets: torch.Tensor     # [n] the token id

    def to(self, device) -> "Forward":
        return Forward(*(t.to(device) for t in (self.input_ids, self.rows, self.cols, self.targets)))


@dataclass
class MicroBatch:
    """One micro-batch (one backward). Its rows run as one or more forwards
    of similar lengths; the log-prob of completion token t of row b lands at
    [rows[k], tpos[k]] of a [B, T] tensor, k running over the forwards'
    completion tokens in order. The LM head runs on those positions only."""

    forwards: list[Forward]
    rows: torch.Tensor           # [N] batch row of each completion token
    tpos: torch.Tensor           # [N] index of the token within its completion
    mask: torch.Tensor           # [B, T] completion mask
    rewards: torch.Tensor        # [B]
    group_ids: torch.Tensor      # [B]
    advantages: torch.Tensor | None
    pair_index: torch.Tensor | None   # [P, 2] (chosen, rejected) rows
    n_tokens: int                # real (non-pad) tokens
    n_computed: int              # tokens the forwards compute, padding included
    behaviour_logprobs: torch.Tensor | None = None  # [B, T] sampler's log-probs (online losses)

    def to(self, device) -> "MicroBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["forwards"] = [f.to(device) for f in self.forwards]
        return MicroBatch(**moved)


def collate(ts: TrainSet, item_idx: np.ndarray, *, overhead: int = FORWARD_OVERHEAD_TOKENS) -> MicroBatch:
    """Tensors of the items `item_idx`. Pairs become rows [chosen..., rejected...]."""
    items = ts.items[item_idx]
    rows_ = np.concatenate([items[:, 0], items[:, 1]]) if ts.paired else items
    pair = None
    if ts.paired:
        p = len(items)
        pair = np.stack([np.arange(p), np.arange(p) + p], axis=1)
    return collate_sequences(
        [ts.tokens[ts.offsets[r]:ts.offsets[r + 1]] for r in rows_], ts.n_prompt[rows_], pad_id=ts.pad_id,
        rewards=ts.rewards[rows_], group_ids=ts.group_ids[rows_],
        advantages=None if ts.advantages is None else ts.advantages[rows_], pair_index=pair, overhead=overhead)


def collate_sequences(seqs: list, n_prompt, *, pad_id: int, rewards=None, group_ids=None, advantages=None,
                      pair_index=None, behaviour_logprobs: list | None = None,
                      overhead: int = FORWARD_OVERHEAD_TOKENS) -> MicroBatch:
    """A MicroBatch from token sequences (prompt ids + completion ids each,
    the first n_prompt[i] of sequence i being prompt). Online cells build
    their sampled completions into micro-batches with this;
    behaviour_logprobs[i] are the sampler's log-probs of sequence i's
    completion tokens."""
    b = len(seqs)
    lens = np.array([len(x) for x in seqs], dtype=np.int64)
    npr = np.asarray(n_prompt, dtype=np.int64)
    ncomp = lens - npr
    if b == 0 or (npr < 1).any() or (ncomp < 1).any():
        raise ValueError("every sequence needs >= 1 prompt token and >= 1 completion token")
    order = np.argsort(lens, kind="stable")
    forwards, all_rows, all_tpos, computed = [], [], [], 0
    for start, end in split_by_length(lens[order], overhead=overhead):
        sel = order[start:end]
        ids = np.full((len(sel), int(lens[sel].max())), pad_id, dtype=np.int64)
        for k, i in enumerate(sel):
            ids[k, :lens[i]] = seqs[i]
        local = np.repeat(np.arange(len(sel)), ncomp[sel])
        tp = np.concatenate([np.arange(n) for n in ncomp[sel]])
        cols = npr[sel][local] - 1 + tp
        forwards.append(Forward(torch.from_numpy(ids), torch.from_numpy(local), torch.from_numpy(cols),
                                torch.from_numpy(ids[local, cols + 1])))
        all_rows.append(sel[local])
        all_tpos.append(tp)
        computed += ids.size

    def tensor(x, default, dtype):
        return torch.as_tensor(np.asarray(default if x is None else x), dtype=dtype)

    behaviour = None
    if behaviour_logprobs is not None:
        behaviour = torch.zeros((b, int(ncomp.max())), dtype=torch.float32)
        for i, lp in enumerate(behaviour_logprobs):
            if len(lp) != ncomp[i]:
                raise ValueError(f"behaviour_logprobs[{i}] has {len(lp)} values for {ncomp[i]} completion tokens")
            behaviour[i, :ncomp[i]] = torch.as_tensor(np.asarray(lp, dtype=np.float32))

    return MicroBatch(
        forwards=forwards, rows=torch.from_numpy(np.concatenate(all_rows)),
        tpos=torch.from_numpy(np.concatenate(all_tpos)),
        mask=torch.from_numpy(np.arange(int(ncomp.max()))[None, :] < ncomp[:, None]),
        rewards=tensor(rewards, np.zeros(b), torch.float32), group_ids=tensor(group_ids, np.arange(b), torch.int64),
        advantages=None if advantages is None else tensor(advantages, None, torch.float32),
        pair_index=None if pair_index is None else tensor(pair_index, None, torch.int64),
        n_tokens=int(lens.sum()), n_computed=int(computed), behaviour_logprobs=behaviour)
