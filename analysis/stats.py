"""Accuracy statistics: Wilson intervals and exact McNemar tests (docs/design.md
"Functional analyses and evaluation"; seed paper §3.1, Fig. 3).

The seed paper reports greedy pass@1 with Wilson 95% CIs and compares methods
pairwise with the exact (binomial) McNemar test on the same items. Everything
here is float64 and pure: tables in, tables out.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats as sps

from ..core.errors import WsgError

# One row per (model, item): what the evaluation stage writes to
# <run>/eval/predictions.parquet. `model` is a cell id or "base"; `step` is the
# adapter's training step (-1 for the base model).
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("step", pa.int32()),
        ("dataset", pa.string()),
        ("item_id", pa.string()),
        ("prompt", pa.string()),
        ("gold", pa.string()),
        ("completion", pa.string()),
        ("extracted", pa.string()),
        ("correct", pa.bool_()),
    ]
)

# One row per (model, step, dataset): <run>/eval/accuracy.parquet.
ACCURACY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("step", pa.int32()),
        ("dataset", pa.string()),
        ("n", pa.int64()),
        ("correct", pa.int64()),
        ("accuracy", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
    ]
)

# One row per unordered model pair (model_a < model_b by name) and dataset:
# <run>/eval/mcnemar.parquet. b01 = items a got wrong and b right; b10 = the
# reverse. n counts the items both models were scored on.
MCNEMAR_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("n", pa.int64()),
        ("a_correct", pa.int64()),
        ("b_correct", pa.int64()),
        ("b01", pa.int64()),
        ("b10", pa.int64()),
        ("p_value", pa.float64()),
    ]
)

# The columns the table builders actually read; the rest of
# PREDICTIONS_SCHEMA (texts) is carried for inspection only.
_REQUIRED = ("model", "step", "dataset", "item_id", "correct")


class StatsInputError(WsgError, ValueError):
    """Bad input to a statistic (a ValueError for library callers, a
    WsgError so the CLI prints it without a traceback)."""


def wilson_interval(successes: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927).

    centre = (p̂ + z²/2n) / (1 + z²/n), half = z/(1 + z²/n) · sqrt(p̂(1−p̂)/n + z²/4n²)
    with z the 1 − alpha/2 normal quantile. Unlike the Wald interval it stays
    inside [0, 1] and is sensible at p̂ ∈ {0, 1}, which matters for small sets
    such as AIME (n = 30).
    """
    if n <= 0:
        raise StatsInputError(
            f"wilson_interval needs n >= 1 items, got n={n}: an accuracy over no items "
            "has no interval; check that the dataset has predictions"
        )
    if not 0 <= successes <= n:
        raise StatsInputError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise StatsInputError(f"wilson_interval needs 0 < alpha < 1, got alpha={alpha}")
    z = float(sps.norm.ppf(1.0 - alpha / 2.0))
    p = successes / n
    z2n = z * z / n
    denom = 1.0 + z2n
    centre = (p + z2n / 2.0) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    # Analytically lo = 0 at k = 0 and hi = 1 at k = n; set them exactly
    # rather than keep the round-off, and clip round-off elsewhere.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def _exact_mcnemar_p(b01: int, b10: int) -> float:
    """Two-sided exact McNemar p: the discordant pairs are Binomial(b01+b10, 1/2)
    under H0, so p = min(1, 2·P[X ≤ min(b01, b10)]) (symmetric null, so this
    equals the binomial test's two-sided p). No discordant pairs → p = 1."""
    m = b01 + b10
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * sps.binom.cdf(min(b01, b10), m, 0.5)))


def mcnemar_exact(a_correct, b_correct) -> dict:
    """Exact McNemar test of two models scored on the same items, in order.

    Returns {"n", "a_correct", "b_correct", "b01", "b10", "p_value"} where
    b01 = #(a wrong, b right) and b10 = #(a right, b wrong).
    """
    a = np.asarray(a_correct)
    b = np.asarray(b_correct)
    if a.ndim != 1 or b.ndim != 1:
        raise StatsInputError(f"mcnemar_exact needs 1-D arrays, got shapes {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise StatsInputError(
            f"mcnemar_exact needs the same items for both models: got {a.shape[0]} and "
            f"{b.shape[0]} outcomes; align them by item id first"
        )
    for name, arr in (("a_correct", a), ("b_correct", b)):
        if arr.dtype != np.bool_ and not np.isin(arr, (0, 1)).all():
            raise StatsInputError(f"mcnemar_exact: {name} must be boolean (or 0/1), got dtype {arr.dtype}")
    a = a.astype(bool)
    b = b.astype(bool)
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    return {
        "n": int(a.shape[0]),
        "a_correct": int(np.count_nonzero(a)),
        "b_correct": int(np.count_nonzero(b)),
        "b01": b01,
        "b10": b10,
        "p_value": _exact_mcnemar_p(b01, b10),
    }


def _check_predictions(predictions: pa.Table) -> None:
    missing = [c for c in _REQUIRED if c not in predictions.column_names]
    if missing:
        raise StatsInputError(
            f"predictions table lacks column(s) {missing}; it must follow PREDICTIONS_SCHEMA "
            f"({', '.join(PREDICTIONS_SCHEMA.names)})"
        )
    if not pa.types.is_boolean(predictions.schema.field("correct").type):
        raise StatsInputError(
            f"predictions column 'correct' must be bool, got {predictions.schema.field('correct').type}"
        )
    if predictions.column("correct").null_count:
        raise StatsInputError("predictions column 'correct' has nulls; every item must be scored")
    keys = pa.table({c: predictions.column(c) for c in ("model", "step", "dataset", "item_id")})
    counts = keys.group_by(["model", "step", "dataset", "item_id"]).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dup.num_rows:
        r = dup.slice(0, 1).to_pylist()[0]
        raise StatsInputError(
            f"predictions has {dup.num_rows} duplicated (model, step, dataset, item_id) key(s), e.g. "
            f"model={r['model']!r} step={r['step']} dataset={r['dataset']!r} item_id={r['item_id']!r} "
            f"({r['count_all']} rows); keep one prediction per item"
        )


def accuracy_table(predictions: pa.Table, *, alpha: float = 0.05) -> pa.Table:
    """Per (model, step, dataset): n, #correct, accuracy and its Wilson CI."""
    _check_predictions(predictions)
    sub = pa.table(
        {
            "model": predictions.column("model"),
            "step": predictions.column("step").cast(pa.int32()),
            "dataset": predictions.column("dataset"),
            "correct": predictions.column("correct").cast(pa.int64()),
        }
    )
    agg = sub.group_by(["model", "step", "dataset"]).aggregate([("correct", "sum"), ("correct", "count")])
    agg = agg.sort_by([("dataset", "ascending"), ("model", "ascending"), ("step", "ascending")])
    n = agg.column("correct_count").to_numpy().astype(np.int64)
    k = agg.column("correct_sum").to_numpy().astype(np.int64)
    cis = [wilson_interval(int(ki), int(ni), alpha=alpha) for ki, ni in zip(k, n)]
    return pa.table(
        {
            "model": agg.column("model"),
            "step": agg.column("step"),
            "dataset": agg.column("dataset"),
            "n": pa.array(n, pa.int64()),
            "correct": pa.array(k, pa.int64()),
            "accuracy": pa.array(k / n, pa.float64()),
            "ci_low": pa.array([c[0] for c in cis], pa.float64()),
            "ci_high": pa.array([c[1] for c in cis], pa.float64()),
        },
        schema=ACCURACY_SCHEMA,
    )


def mcnemar_table(predictions: pa.Table) -> pa.Table:
    """Exact McNemar for every unordered model pair (a < b by name) per dataset,
    over the items both were scored on (inner join on item_id).

    Each model must appear with a single step per dataset (the pair columns
    carry no step); filter the predictions to one checkpoint per model first.
    Pairs with no shared items are left out.
    """
    _check_predictions(predictions)
    rows = {f.name: [] for f in MCNEMAR_SCHEMA}
    models_col = predictions.column("model").to_pylist()
    steps_col = predictions.column("step").to_pylist()
    datasets_col = predictions.column("dataset").to_pylist()
    items_col = predictions.column("item_id").to_pylist()
    correct_col = predictions.column("correct").to_pylist()

    # dataset -> model -> {item_id: correct}; and the steps seen per model.
    by_ds: dict[str, dict[str, dict]] = {}
    steps: dict[tuple[str, str], set] = {}
    for m, s, d, i, c in zip(models_col, steps_col, datasets_col, items_col, correct_col):
        by_ds.setdefault(d, {}).setdefault(m, {})[i] = c
        steps.setdefault((d, m), set()).add(s)
    for (d, m), ss in sorted(steps.items()):
        if len(ss) > 1:
            raise StatsInputError(
                f"mcnemar_table: model {m!r} has predictions at several steps {sorted(ss)} on dataset "
                f"{d!r}; filter the predictions to one step per model before pairing"
            )

    for d in sorted(by_ds):
        models = sorted(by_ds[d])
        for ma, mb in combinations(models, 2):
            pa_, pb_ = by_ds[d][ma], by_ds[d][mb]
            shared = sorted(set(pa_) & set(pb_), key=str)
            if not shared:
                continue
            res = mcnemar_exact(
                np.fromiter((pa_[i] for i in shared), bool, len(shared)),
                np.fromiter((pb_[i] for i in shared), bool, len(shared)),
            )
            rows["dataset"].append(d)
            rows["model_a"].append(ma)
            rows["model_b"].append(mb)
            for key in ("n", "a_correct", "b_correct", "b01", "b10", "p_value"):
                rows[key].append(res[key])
    return pa.table(rows, schema=MCNEMAR_SCHEMA)
