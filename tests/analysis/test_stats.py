"""analysis.stats against statsmodels (an independent implementation)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint
from wsg.analysis.stats import (
    ACCURACY_SCHEMA,
    MCNEMAR_SCHEMA,
    PREDICTIONS_SCHEMA,
    accuracy_table,
    mcnemar_exact,
    mcnemar_table,
    wilson_interval,
)
from wsg.core.errors import WsgError


def test_wilson_matches_statsmodels_on_random_inputs():
    rng = np.random.default_rng(0)
    cases = [(0, 1), (1, 1), (0, 30), (30, 30), (3, 30), (1153, 1319)]
    cases += [(int(k), int(n)) for n in rng.integers(1, 2000, 200) for k in [rng.integers(0, n + 1)]]
    for alpha in (0.05, 0.01, 0.1):
        for k, n in cases:
            lo, hi = wilson_interval(k, n, alpha=alpha)
            ref_lo, ref_hi = proportion_confint(k, n, alpha=alpha, method="wilson")
            assert lo == pytest.approx(ref_lo, abs=1e-12), (k, n, alpha)
            assert hi == pytest.approx(ref_hi, abs=1e-12), (k, n, alpha)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_errors():
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(WsgError, match="successes"):
        wilson_interval(5, 3)
    with pytest.raises(ValueError, match="alpha"):
        wilson_interval(1, 3, alpha=1.5)


def _sm_p(a, b):
    table = np.array(
        [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64
    )
    return sm_mcnemar(table, exact=True).pvalue


def test_mcnemar_matches_statsmodels_on_random_inputs():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 400))
        pa_, pb_ = rng.uniform(0.05, 0.95, 2)
        a = rng.random(n) < pa_
        # Correlate b with a some of the time, as real models are.
        b = np.where(rng.random(n) < rng.uniform(0, 0.9), a, rng.random(n) < pb_)
        res = mcnemar_exact(a, b)
        assert res["b01"] == int(np.sum(~a & b))
        assert res["b10"] == int(np.sum(a & ~b))
        assert res["n"] == n and res["a_correct"] == int(a.sum()) and res["b_correct"] == int(b.sum())
        assert res["p_value"] == pytest.approx(_sm_p(a, b), rel=1e-10, abs=1e-300)


def test_mcnemar_hand_example_and_no_discordance():
    # 1 vs 6 discordant pairs: p = 2 * (C(7,0)+C(7,1)) / 2^7 = 16/128.
    a = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    res = mcnemar_exact(a, b)
    assert (res["b01"], res["b10"]) == (6, 2)
    # 2 vs 6: p = 2 * (1 + 8 + 28) / 256
    assert res["p_value"] == pytest.approx(2 * 37 / 256)
    same = mcnemar_exact(a, a)
    assert same["b01"] == same["b10"] == 0 and same["p_value"] == 1.0


def test_mcnemar_length_mismatch_names_lengths():
    with pytest.raises(ValueError, match="5 and 4"):
        mcnemar_exact(np.ones(5, bool), np.ones(4, bool))


def _predictions(rng, models, datasets, n_items, drop=0.0):
    rows = {f.name: [] for f in PREDICTIONS_SCHEMA}
    for m, step in models:
        for d in datasets:
            p = rng.uniform(0.2, 0.9)
            for i in range(n_items[d]):
                if rng.random() < drop:
                    continue
                c = bool(rng.random() < p)
                rows["model"].append(m)
                rows["step"].append(step)
                rows["dataset"].append(d)
                rows["item_id"].append(f"{d}-{i}")
                rows["prompt"].append(f"q{i}")
                rows["gold"].append("4")
                rows["completion"].append("\\boxed{4}" if c else "\\boxed{5}")
                rows["extracted"].append("4" if c else "5")
                rows["correct"].append(c)
    return pa.table(rows, schema=PREDICTIONS_SCHEMA)


def test_accuracy_table_matches_direct_counts():
    rng = np.random.default_rng(2)
    models = [("base", -1), ("sft-s42-lr5e-06", 100), ("dpo-s42-lr5e-07", 100)]
    preds = _predictions(rng, models, ["gsm8k", "aime"], {"gsm8k": 57, "aime": 30}, drop=0.1)
    # Shuffle rows: the table must not depend on row order.
    preds = preds.take(rng.permutation(preds.num_rows))
    acc = accuracy_table(preds)
    assert acc.schema == ACCURACY_SCHEMA
    assert acc.num_rows == 6
    rows = preds.to_pylist()
    for r in acc.to_pylist():
        sel = [x["correct"] for x in rows if (x["model"], x["step"], x["dataset"]) == (r["model"], r["step"], r["dataset"])]
        assert r["n"] == len(sel) and r["correct"] == sum(sel)
        assert r["accuracy"] == pytest.approx(sum(sel) / len(sel))
        lo, hi = proportion_confint(sum(sel), len(sel), method="wilson")
        assert r["ci_low"] == pytest.approx(lo, abs=1e-12) and r["ci_high"] == pytest.approx(hi, abs=1e-12)
    keys = [(r["dataset"], r["model"], r["step"]) for r in acc.to_pylist()]
    assert keys == sorted(keys)


def test_mcnemar_table_pairs_inner_join_and_statsmodels():
    rng = np.random.default_rng(3)
    models = [("sft-s42-lr5e-06", 10), ("base", -1), ("rft-s42-lr5e-06", 10)]
    preds = _predictions(rng, models, ["gsm8k", "aime"], {"gsm8k": 80, "aime": 30}, drop=0.15)
    preds = preds.take(rng.permutation(preds.num_rows))
    tab = mcnemar_table(preds)
    assert tab.schema == MCNEMAR_SCHEMA
    assert tab.num_rows == 6  # 3 unordered pairs x 2 datasets
    rows = preds.to_pylist()
    for r in tab.to_pylist():
        assert r["model_a"] < r["model_b"]
        ia = {x["item_id"]: x["correct"] for x in rows if x["model"] == r["model_a"] and x["dataset"] == r["dataset"]}
        ib = {x["item_id"]: x["correct"] for x in rows if x["model"] == r["model_b"] and x["dataset"] == r["dataset"]}
        shared = sorted(set(ia) & set(ib))
        assert len(shared) < max(len(ia), len(ib))  # the drop made the join matter
        a = np.array([ia[i] for i in shared])
        b = np.array([ib[i] for i in shared])
        assert r["n"] == len(shared)
        assert (r["a_correct"], r["b_correct"]) == (int(a.sum()), int(b.sum()))
        assert (r["b01"], r["b10"]) == (int(np.sum(~a & b)), int(np.sum(a & ~b)))
        assert r["p_value"] == pytest.approx(_sm_p(a, b), rel=1e-10, abs=1e-300)


def test_mcnemar_table_refuses_multiple_steps_and_duplicates():
    rng = np.random.default_rng(4)
    preds = _predictions(rng, [("sft", 10), ("sft", 20), ("dpo", 10)], ["gsm8k"], {"gsm8k": 5})
    with pytest.raises(WsgError, match="several steps"):
        mcnemar_table(preds)
    # accuracy is per (model, step), so several steps are fine there
    assert accuracy_table(preds).num_rows == 3
    dup = pa.concat_tables([preds, preds.slice(0, 1)])
    with pytest.raises(ValueError, match="duplicated"):
        accuracy_table(dup)
    with pytest.raises(WsgError, match="correct"):
        accuracy_table(preds.drop_columns(["correct"]))
