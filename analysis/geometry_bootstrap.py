"""Bootstrap confidence intervals of the global geometry metrics (issue 13
item 3; docs/geometry.md "Uncertainty").

The unit of resampling is the LAYER: a resample draws L layers with
replacement out of the L of the model, and every module of a drawn layer
comes with it (modules of one layer share its input and are not independent
draws). A statistic of the resample is the statistic of the multiset of drawn
modules: a global cosine is sum(inner) / sqrt(sum ||a||^2 sum ||b||^2) over
them, so with c_l the number of times layer l is drawn,

    cos* = sum_l c_l I_l / sqrt(sum_l c_l A_l * sum_l c_l B_l)

with I_l, A_l, B_l the layer's sums (the layer_pairs numbers), summed over
l in a fixed order for every pair x resample (ordered_dot). The median top-1 angle of a resample is
the weighted median of the per-module angles, module weight c_(its layer).

Intervals are percentile intervals (the 2.5% and 97.5% quantiles of the
resampled statistic, numpy's linear interpolation) over the resamples where
the statistic is defined. The resamples are drawn once, from the seed: the
same for every pair, so a pair's interval does not depend on which other
adapters are in the table.

Sums over layers and modules are never BLAS products: a GEMM's summation
order depends on its shape (one pair is a GEMV, several a GEMM; OpenBLAS picks
kernels by size and CPU), so a pair's bits changed with the number of other
pairs in the table. ordered_dot adds term by term, in index order, with
elementwise IEEE operations: a row's result depends on that row alone, on any
CPU.
"""
from __future__ import annotations

import json
import warnings

import numpy as np

N_RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
# Elements of a (pairs x resamples x modules) block in the weighted median.
_CHUNK = 1 << 22


def layer_draws(n_layers: int, n_boot: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_boot, n_layers) indices of the layers drawn by each resample."""
    return np.random.default_rng(seed).integers(0, n_layers, size=(n_boot, n_layers))


def layer_counts(n_layers: int, n_boot: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_boot, n_layers) float: how many times each layer is drawn."""
    draws = layer_draws(n_layers, n_boot, seed)
    counts = np.zeros((n_boot, n_layers))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts


def ordered_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w for x (rows, K), w (K, cols), each element summed over k = 0..K-1
    in that order, ((0 + x_0 w_0) + x_1 w_1) + ..., so a row's result does not
    depend on the other rows or on the CPU (no BLAS, no fused multiply-add)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[1]))
    # Blocks of rows small enough to stay in cache (elementwise: a row's bits
    # do not depend on the block it is in).
    step = max(1, _CHUNK // 64 // max(1, w.shape[1]))
    for s in range(0, x.shape[0], step):
        acc, term = out[s:s + step], np.empty((min(step, x.shape[0] - s), w.shape[1]))
        for k in range(x.shape[1]):
            acc += np.multiply(x[s:s + step, k:k + 1], w[k], out=term)
    return out


def ordered_row_sum(x: np.ndarray) -> np.ndarray:
    """Row sums of (rows, K) in index order (see ordered_dot)."""
    out = np.zeros(x.shape[0])
    for k in range(x.shape[1]):
        out += x[:, k]
    return out


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (low, high) quantiles of (pairs, resamples), NaN resamples
    left out; NaN where a row has none."""
    q = (1.0 - level) / 2.0
    if stats.size == 0:
        nan = np.full(stats.shape[0], np.nan)
        return nan, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        lo, hi = np.nanquantile(stats, [q, 1.0 - q], axis=1)
    return lo, hi


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def cosine_stats(inner: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(pairs, resamples) global cosine from (pairs, layers) layer sums."""
    i, a, b = (ordered_dot(x, counts.T) for x in (inner, sq_a, sq_b))
    return np.clip(_ratio(i, np.sqrt(a * b)), -1.0, 1.0)


def frac_stats(resid: np.ndarray, sq: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(pairs, resamples) orthogonal fraction sqrt(sum resid / sum ||b||^2)."""
    return np.minimum(np.sqrt(_ratio(ordered_dot(resid, counts.T), ordered_dot(sq, counts.T))), 1.0)


def median_stats(values: np.ndarray, module_layer: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(pairs, resamples) median of the per-module values (pairs, modules) over
    each resample's multiset of modules (NaN values left out, as nanmedian)."""
    n_pair, n_mod = values.shape
    n_boot = counts.shape[0]
    out = np.full((n_pair, n_boot), np.nan)
    if n_mod == 0:
        return out
    order = np.argsort(values, axis=1, kind="stable")  # NaN sort last
    v = np.take_along_axis(values, order, axis=1)
    w_mod = np.ascontiguousarray(counts[:, module_layer].T).astype(np.int32)  # (M, B): a module weighs as its layer
    step = max(1, _CHUNK // max(1, n_boot * n_mod))
    for s in range(0, n_pair, step):
        vs = v[s:s + step]
        # (P, M, B) weights in sorted order; NaN modules weigh 0
        w = w_mod[order[s:s + step]] * ~np.isnan(vs)[:, :, None]
        cw = np.cumsum(w, axis=1, dtype=np.int32)
        total = cw[:, -1, :]
        # 0-based positions of the middle element(s) in the sorted multiset
        lo, hi = (total - 1) // 2, total // 2
        i_lo = np.minimum((cw <= lo[:, None, :]).sum(1), n_mod - 1)
        i_hi = np.minimum((cw <= hi[:, None, :]).sum(1), n_mod - 1)
        vz = np.nan_to_num(vs)
        med = (np.take_along_axis(vz, i_lo, axis=1) + np.take_along_axis(vz, i_hi, axis=1)) / 2.0
        out[s:s + step] = np.where(total > 0, med, np.nan)
    return out


def global_cis(*, layer_sums: dict[str, np.ndarray], top1: np.ndarray, module_layer: np.ndarray,
               n_boot: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, np.ndarray]:
    """The global_pairs CI columns. layer_sums: (pairs, layers) arrays
    `inner`, `sq_a`, `sq_b`, `resid_b` (of b off a), `resid_a`; top1: (pairs,
    modules) top-1 angles; module_layer: each module's layer index (0..L-1)."""
    n_pair, n_layer = layer_sums["inner"].shape
    counts = layer_counts(n_layer, n_boot, seed) if n_layer else np.zeros((n_boot, 0))
    stats = {
        "cosine": cosine_stats(layer_sums["inner"], layer_sums["sq_a"], layer_sums["sq_b"], counts),
        "orth_frac_b_off_a": frac_stats(layer_sums["resid_b"], layer_sums["sq_b"], counts),
        "orth_frac_a_off_b": frac_stats(layer_sums["resid_a"], layer_sums["sq_a"], counts),
        "median_top1_angle_deg": median_stats(top1, module_layer, counts),
    }
    out = {}
    for name, s in stats.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = percentile_interval(s.reshape(n_pair, n_boot), level)
    return out


def metadata(n_boot: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """The b"wsg.bootstrap" entry of global_pairs' schema metadata."""
    return {b"wsg.bootstrap": json.dumps({"n_resamples": int(n_boot), "seed": int(seed), "unit": "layer",
                                          "level": float(level), "interval": "percentile",
                                          "columns": ["cosine", "orth_frac_b_off_a", "orth_frac_a_off_b",
                                                      "median_top1_angle_deg"]}).encode()}
