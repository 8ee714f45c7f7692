"""Rollouts/pairs tables and the DPO pairing rule (rollouts/schema.py)."""
import itertools
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from wsg.rollouts import schema
from wsg.rollouts.schema import make_pairs, reward_summary, select_pairs


def _row(pid, j, reward, rng):
    n_p, n_c = rng.randint(3, 9), rng.randint(1, 12)
    return {
        "prompt_id": pid, "sample_idx": j, "problem": f"problem {pid}", "prompt_text": f"<t>{pid}</t>",
        "completion": f"{pid}/{j}: \\boxed{{{rng.randint(0, 9)}}}", "gold": "4", "reward": float(reward),
        "prompt_token_ids": [rng.randint(0, 999) for _ in range(n_p)],
        "completion_token_ids": [rng.randint(0, 999) for _ in range(n_c)],
        "completion_logprobs": [-rng.random() for _ in range(n_c)] if j % 3 else None,
        "n_prompt_tokens": n_p, "n_completion_tokens": n_c, "finish_reason": rng.choice(["stop", "length"]),
        "teacher": "t", "temperature": 1.0, "top_p": 1.0, "max_tokens": 12,
    }


def _random_rows(seed, n_prompts=30, k=4):
    rng = random.Random(seed)
    return [_row(f"p{i}", j, rng.random() < 0.35, rng) for i in range(n_prompts) for j in range(k)]


def test_tables_round_trip_through_parquet_with_the_declared_types(tmp_path):
    rows = _random_rows(0)
    t = schema.rollouts_table(rows, {"spec_hash": "abc"})
    pq.write_table(t, tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.schema.equals(schema.ROLLOUTS_SCHEMA, check_metadata=False)
    assert back.schema.metadata[b"spec_hash"] == b"abc"
    got = back.to_pylist()
    assert [r["completion_token_ids"] for r in got] == [r["completion_token_ids"] for r in rows]
    assert got[0]["completion_logprobs"] is None  # nullable (sample 0 has none)
    # float32 storage of logprobs: equal to float32 rounding of the input.
    import numpy as np

    lp = rows[1]["completion_logprobs"]
    np.testing.assert_array_equal(np.float32(lp), np.float32(got[1]["completion_logprobs"]))
    schema.check_table(back, schema.ROLLOUTS_SCHEMA, "r")


def test_check_table_names_the_bad_column():
    t = pa.table({"prompt_id": ["a"], "sample_idx": pa.array([0], pa.int64())})
    with pytest.raises(ValueError, match="'sample_idx' has type int64"):
        schema.check_table(t, pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32())]), "x")
    with pytest.raises(ValueError, match="'reward' is missing"):
        two = pa.schema([schema.ROLLOUTS_SCHEMA.field(n) for n in ("prompt_id", "reward")])
        schema.check_table(t, two, "x")


def test_rows_missing_a_field_are_refused():
    row = _row("p", 0, 1.0, random.Random(0))
    del row["gold"]
    with pytest.raises(ValueError, match="lacks column.*gold"):
        schema.rollouts_table([row])
    row = _row("p", 0, 1.0, random.Random(0))
    row["completion"] = None
    with pytest.raises(ValueError, match="'completion' has nulls"):
        schema.rollouts_table([row])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("cap", [1, 2, 3, 16])
def test_pairs_against_brute_force(seed, cap):
    rows = _random_rows(seed)
    pairs = make_pairs(rows, max_pairs_per_prompt=cap)
    by = {(r["prompt_id"], r["sample_idx"]): r for r in rows}
    # Independent count: for each prompt, min(cap, #correct x #wrong).
    want = 0
    for pid in sorted({r["prompt_id"] for r in rows}):
        rs = [r for r in rows if r["prompt_id"] == pid]
        nc = sum(r["reward"] == 1.0 for r in rs)
        want += min(cap, nc * (len(rs) - nc))
    assert len(pairs) == want
    seen = set()
    for p in pairs:
        c, w = by[(p["prompt_id"], p["chosen_sample_idx"])], by[(p["prompt_id"], p["rejected_sample_idx"])]
        assert c["reward"] == 1.0 and w["reward"] == 0.0
        assert p["chosen"] == c["completion"] and p["rejected"] == w["completion"]
        assert p["prompt_text"] == c["prompt_text"]
        key = (p["prompt_id"], p["chosen_sample_idx"], p["rejected_sample_idx"])
        assert key not in seen
        seen.add(key)
    t = schema.pairs_table(pairs)
    assert t.schema.equals(schema.PAIRS_SCHEMA) and t.num_rows == want


def test_select_pairs_spreads_samples_before_reusing_them():
    assert select_pairs([0, 2], [1, 3], 2) == [(0, 1), (2, 3)]
    assert select_pairs([1], [0, 2, 3], 2) == [(1, 0), (1, 2)]
    assert select_pairs([], [0, 1], 3) == [] and select_pairs([0, 1], [], 3) == []
    # With cap >= all combinations every (correct, wrong) pair appears once.
    got = select_pairs([0, 1, 2], [3, 4], 99)
    assert sorted(got) == sorted(itertools.product([0, 1, 2], [3, 4]))
    # Disjoint as long as both sides have unused samples.
    got = select_pairs([0, 1, 2, 3], [4, 5, 6], 3)
    assert len({c for c, _ in got}) == 3 and len({w for _, w in got}) == 3


def test_reward_summary_against_hand_count():
    rows = [{"prompt_id": "a", "reward": r} for r in (1, 0, 0, 0)] + \
           [{"prompt_id": "b", "reward": r} for r in (1, 1, 1, 1)] + \
           [{"prompt_id": "c", "reward": r} for r in (0, 0, 0, 0)] + \
           [{"prompt_id": "d", "reward": r} for r in (0, 1, 1, 0)]
    s = reward_summary(rows)
    assert s["n_prompts"] == 4 and s["n_samples"] == 16
    assert s["reward_mean"] == pytest.approx(7 / 16)
    assert s["frac_prompts_mixed"] == pytest.approx(2 / 4)
    assert s["frac_prompts_all_correct"] == pytest.approx(1 / 4)
