"""The teacher as a recorded factor (rollouts/teacher.py): its identity, the
text-variety metrics (a hand-worked example and an independent computation
on random inputs), and the profile in the scripted rollouts stage's summary,
the claims table's metadata, the report's first line and tracked params."""
import json

import numpy as np
import pytest
from wsg.rollouts.teacher import (
    describe,
    jaccard,
    teacher_identity,
    teacher_profile,
    text_variety,
)
from wsg.sweep.config import parse_config


def _rows(spec):
    """spec: prompt -> [(text, token ids)]."""
    return [{"prompt_id": p, "completion": t, "completion_token_ids": ids, "reward": 0.0}
            for p, samples in spec.items() for t, ids in samples]


def test_variety_by_hand():
    rows = _rows({"p1": [("a", [1, 2, 3]), ("a", [1, 2, 3]), ("b", [3, 4])],
                  "p2": [("x", [5]), ("y", [6]), ("", [])]})
    v = text_variety(rows)
    # p1: distinct 2; pairs J = 1, 1/4 ({3} of {1,2,3,4}), 1/4 -> 0.5.
    # p2: distinct 3; J(5,6) = 0, J(5,{}) = 0, J(6,{}) = 0 -> 0.
    assert v["teacher_distinct_per_prompt"] == pytest.approx(2.5)
    assert v["teacher_distinct_frac"] == pytest.approx(5 / 6)
    assert v["teacher_token_jaccard"] == pytest.approx(0.25)
    assert jaccard([], []) == 1.0 and jaccard([1, 1, 2], [2]) == 0.5


def test_variety_against_an_incidence_matrix_on_random_inputs():
    rng = np.random.default_rng(7)
    vocab, k = 30, 5
    rows, expect_j, expect_d = [], [], []
    for p in range(40):
        samples = []
        for _ in range(k):
            ids = rng.integers(0, vocab, size=int(rng.integers(0, 12))).tolist()
            samples.append((" ".join(map(str, ids)), ids))
        if p % 3 == 0:  # some repeated completions
            samples[1] = samples[0]
        rows += _rows({f"p{p}": samples})
        # Independent: token-set incidence matrix B (K x V); |A∩B| = B B^T.
        B = np.zeros((k, vocab), bool)
        for i, (_, ids) in enumerate(samples):
            B[i, ids] = True
        inter = B.astype(int) @ B.T.astype(int)
        size = B.sum(1)
        union = size[:, None] + size[None, :] - inter
        iu = np.triu_indices(k, 1)
        jac = np.where(union[iu] == 0, 1.0, inter[iu] / np.maximum(union[iu], 1))
        expect_j.append(jac.mean())
        expect_d.append(len({s[0] for s in samples}))
    v = text_variety(rows)
    assert v["teacher_token_jaccard"] == pytest.approx(float(np.mean(expect_j)), rel=1e-12)
    assert v["teacher_distinct_per_prompt"] == pytest.approx(float(np.mean(expect_d)), rel=1e-12)
    # Order of rows does not matter.
    perm = rng.permutation(len(rows))
    assert text_variety([rows[i] for i in perm]) == pytest.approx(v)


def _cfg(**ro):
    return parse_config({"name": "t", "model": {"name": "tiny-qwen3", "max_model_len": 512},
                         "data": {"source": "synthetic", "n_prompts": 8, "seed": 0},
                         "rollouts": {"k": 4, "shard_size": 8, **ro}})


def test_identity_of_each_backend():
    s = teacher_identity(_cfg(backend="scripted", scripted_error_rate=0.15))
    assert (s["teacher_kind"], s["teacher_error_rate"], s["teacher_is_policy"]) == ("scripted", 0.15, False)
    v = teacher_identity(_cfg())
    assert (v["teacher_kind"], v["teacher"], v["teacher_is_policy"], v["teacher_error_rate"]) == (
        "vllm", "tiny-qwen3", True, None)
    e = teacher_identity(_cfg(backend="openai", endpoint={"base_url": "http://127.0.0.1:9/v1", "model": "m"}))
    assert (e["teacher_kind"], e["teacher"], e["teacher_endpoint"]) == ("endpoint", "openai:m", "http://127.0.0.1:9/v1")


def test_scripted_text_is_less_varied_than_random_text():
    from wsg.rollouts.datasets import load_problems
    from wsg.rollouts.scripted import scripted_samples

    cfg = _cfg(backend="scripted", scripted_error_rate=0.5)
    probs = load_problems(cfg.data)
    comps = scripted_samples(probs, k=4, error_rate=0.5, seed=0)
    rng = np.random.default_rng(0)
    scripted, noise = [], []
    for p, cs in zip(probs, comps):
        for c in cs:
            scripted.append({"prompt_id": p.id, "completion": c, "completion_token_ids": c.split(),
                             "reward": float(f"{{{p.answer}}}" in c)})
            ids = rng.integers(0, 5000, 20).tolist()
            noise.append({"prompt_id": p.id, "completion": str(ids), "completion_token_ids": ids, "reward": 0.0})
    prof = teacher_profile(cfg, scripted)
    assert prof["teacher_token_jaccard"] > 0.5 > text_variety(noise)["teacher_token_jaccard"]
    assert prof["teacher_accuracy"] == pytest.approx(np.mean([r["reward"] for r in scripted]))
    assert "scripted teacher" in describe(prof) and "error rate 0.5" in describe(prof)
    assert describe(None).startswith("Teacher: unknown")


def test_scripted_stage_records_the_profile_and_params_carry_it(ray_module, tmp_path):
    from wsg.core import rundir
    from wsg.core.cells import CellKey
    from wsg.core.layout import RunLayout
    from wsg.core.tracking import cell_params, run_params
    from wsg.rollouts.stage import run_rollouts
    from wsg.rollouts.teacher import read_teacher_profile

    cfg = _cfg(backend="scripted", scripted_error_rate=0.25)
    run = str(tmp_path / "run")
    s = run_rollouts(cfg, run, progress=False)
    prof = s["teacher_profile"]
    rows = rundir.read_table(RunLayout.of(run).rollouts).to_pylist()
    assert prof == pytest.approx(teacher_profile(cfg, rows))
    assert prof["teacher_accuracy"] == pytest.approx(s["reward_mean"])
    assert prof["teacher_frac_prompts_mixed"] == pytest.approx(s["frac_prompts_mixed"])
    assert read_teacher_profile(cfg, run) == prof
    json.dumps(prof)  # JSON-safe for the marker and the claims metadata
    p = run_params(cfg, prof)
    assert p["teacher_kind"] == "scripted" and p["teacher_error_rate"] == 0.25
    assert p["teacher_token_jaccard"] == prof["teacher_token_jaccard"]
    c = cell_params(cfg, CellKey("sft", 1, 1, 1e-4))
    assert c["teacher"] == "scripted:error_rate=0.25" and "teacher_endpoint" not in c
    from wsg.analysis.report import _teacher_line

    line = _teacher_line(run)  # no claims table yet: read from the rollouts' marker
    assert "scripted teacher" in line and f"{100 * prof['teacher_accuracy']:.0f}% of samples correct" in line
