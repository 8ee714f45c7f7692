"""The rollouts stage's tables (docs/design.md) and the DPO pairing rule.

`<run>/rollouts/rollouts.parquet`: one row per (prompt, sample).
`<run>/rollouts/pairs.parquet`: (chosen, rejected) completions of one prompt,
only for prompts with at least one correct and one wrong sample, at most
`rollouts.max_pairs_per_prompt` pairs each.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import pyarrow as pa

ROLLOUTS_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("problem", pa.string(), nullable=False),
    # The chat-templated prompt exactly as fed to the teacher.
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("gold", pa.string(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
    # Sampled tokens' logprobs under the teacher (null when the teacher does
    # not return them in the policy's tokens, e.g. an API endpoint).
    pa.field("completion_logprobs", pa.list_(pa.float32()), nullable=True),
    pa.field("n_prompt_tokens", pa.int32(), nullable=False),
    pa.field("n_completion_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("temperature", pa.float64(), nullable=False),
    pa.field("top_p", pa.float64(), nullable=False),
    pa.field("max_tokens", pa.int32(), nullable=False),
])

PAIRS_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("chosen_sample_idx", pa.int32(), nullable=False),
    pa.field("rejected_sample_idx", pa.int32(), nullable=False),
])


def _build(rows: Sequence[dict], sch: pa.Schema, what: str, metadata: dict | None) -> pa.Table:
    names = set(sch.names)
    for i, r in enumerate(rows):
        missing = names - r.keys()
        if missing:
            raise ValueError(f"{what} row {i} lacks column(s) {sorted(missing)}")
    t = pa.Table.from_pylist(list(rows), schema=sch)
    for f in sch:
        if not f.nullable and t.column(f.name).null_count:
            raise ValueError(f"{what}: column {f.name!r} has nulls but is not nullable")
    return t.replace_schema_metadata(_meta(metadata)) if metadata else t


def rollouts_table(rows: Sequence[dict], metadata: dict | None = None) -> pa.Table:
    """Rows (dicts with the schema's keys) -> a table with ROLLOUTS_SCHEMA."""
    return _build(rows, ROLLOUTS_SCHEMA, "rollouts", metadata)


def pairs_table(rows: Sequence[dict], metadata: dict | None = None) -> pa.Table:
    return _build(rows, PAIRS_SCHEMA, "pairs", metadata)


def _meta(d: dict) -> dict[bytes, bytes]:
    return {str(k).encode(): str(v).encode() for k, v in d.items()}


def check_table(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Raise ValueError naming the first column whose name/type differs."""
    got = {f.name: f.type for f in table.schema}
    for f in schema:
        if f.name not in got:
            raise ValueError(f"{what}: column {f.name!r} is missing")
        if got[f.name] != f.type:
            raise ValueError(f"{what}: column {f.name!r} has type {got[f.name]}, expected {f.type}")


def select_pairs(correct: Sequence[int], wrong: Sequence[int], cap: int) -> list[tuple[int, int]]:
    """Up to `cap` distinct (chosen, rejected) sample-index pairs.

    Greedy and deterministic: each next pair is the unused one whose two
    samples have been used least so far (ties by index), so a prompt with
    2 correct and 2 wrong samples and cap 2 yields two disjoint pairs rather
    than one correct answer reused against both wrong ones."""
    used: dict[int, int] = defaultdict(int)
    cand = [(c, w) for c in correct for w in wrong]
    out: list[tuple[int, int]] = []
    while cand and len(out) < cap:
        best = min(cand, key=lambda p: (used[p[0]] + used[p[1]], p))
        cand.remove(best)
        out.append(best)
        used[best[0]] += 1
        used[best[1]] += 1
    return out


def make_pairs(rows: Iterable[dict], *, max_pairs_per_prompt: int) -> list[dict]:
    """Pair rows (rollouts rows as dicts) of the same prompt: reward 1 chosen,
    reward 0 rejected; prompts in first-seen order."""
    if max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")
    by_prompt: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], {})[int(r["sample_idx"])] = r
    pairs = []
    for pid, samples in by_prompt.items():
        correct = sorted(i for i, r in samples.items() if r["reward"] >= 0.5)
        wrong = sorted(i for i, r in samples.items() if r["reward"] < 0.5)
        for c, w in select_pairs(correct, wrong, max_pairs_per_prompt):
            pairs.append({"prompt_id": pid, "prompt_text": samples[c]["prompt_text"],
                          "chosen": samples[c]["completion"], "rejected": samples[w]["completion"],
                          "chosen_sample_idx": c, "rejected_sample_idx": w})
    return pairs


def reward_summary(rows: Sequence[dict]) -> dict:
    """Sample accuracy and the share of prompts with both outcomes."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by[r["prompt_id"]].append(float(r["reward"]))
    n = sum(len(v) for v in by.values())
    mixed = sum(1 for v in by.values() if 0 < sum(x >= 0.5 for x in v) < len(v))
    return {
        "n_prompts": len(by), "n_samples": n,
        "reward_mean": (sum(sum(v) for v in by.values()) / n) if n else 0.0,
        "frac_prompts_mixed": (mixed / len(by)) if by else 0.0,
        "frac_prompts_all_correct": (sum(1 for v in by.values() if min(v) >= 0.5) / len(by)) if by else 0.0,
    }
