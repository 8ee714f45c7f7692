"""The geometry tables (docs/geometry.md, "Tables").

The engine produces two kinds of raw result, both keyed by adapter content
hash so they can be cached and reused under any adapter name:

- per adapter x module: the singular values of dW (everything per adapter
  follows from them: Frobenius norm, effective rank, numerical rank);
- per unordered pair x module: the inner product <dW_a, dW_b>_F, the principal
  angles, |<u1_a, u1_b>| and |<v1_a, v1_b>| (all symmetric in a, b).

This module turns them into the four contract tables: cosines and orthogonal
fractions are derived here from inner products and norms, and aggregated per
layer and globally by summing over modules (never by averaging cosines).
Every table carries the cell identity of its adapters (loss, seeds, lr,
step; null for adapters given by path) and global_pairs the layer-bootstrap
CIs (analysis/geometry_bootstrap.py). Identity is by adapter NAME, cached
results by content hash: renaming or re-attributing an adapter recomputes
nothing.
"""
from __future__ import annotations

import json
import warnings
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa

from ..core.cells import AdapterRef
from . import geometry_bootstrap as gb

F64 = pa.float64()
LIST_F64 = pa.list_(pa.float64())

# An adapter's identity (core.cells.AdapterRef: its cell's fields and the step), per adapter of a table row.
IDENTITY = (("loss", pa.string()), ("init_seed", pa.int64()), ("data_seed", pa.int64()), ("lr", F64),
            ("step", pa.int64()))
PAIR_IDENTITY = [(f"{k}_{side}", t) for k, t in IDENTITY for side in "ab"]
CI_METRICS = ("cosine", "orth_frac_b_off_a", "orth_frac_a_off_b", "median_top1_angle_deg")

ADAPTER_MODULES = pa.schema([
    ("adapter", pa.string()), *IDENTITY, ("module", pa.string()), ("layer", pa.int32()), ("proj", pa.string()),
    ("fro_norm", F64), ("effective_rank", F64), ("singular_values", LIST_F64),
])
MODULE_PAIRS = pa.schema([
    ("adapter_a", pa.string()), ("adapter_b", pa.string()), *PAIR_IDENTITY, ("module", pa.string()),
    ("layer", pa.int32()), ("proj", pa.string()), ("cosine", F64), ("principal_angles_deg", LIST_F64),
    ("top1_angle_deg", F64), ("worst_angle_deg", F64), ("u1_abs_dot", F64), ("v1_abs_dot", F64),
    ("orth_frac_b_off_a", F64), ("orth_frac_a_off_b", F64),
])
LAYER_PAIRS = pa.schema([
    ("adapter_a", pa.string()), ("adapter_b", pa.string()), *PAIR_IDENTITY, ("layer", pa.int32()),
    ("cosine", F64), ("orth_frac_b_off_a", F64), ("orth_frac_a_off_b", F64),
])
GLOBAL_PAIRS = pa.schema([
    ("adapter_a", pa.string()), ("adapter_b", pa.string()), *PAIR_IDENTITY, ("cosine", F64),
    ("orth_frac_b_off_a", F64), ("orth_frac_a_off_b", F64), ("median_top1_angle_deg", F64),
    ("median_worst_angle_deg", F64), ("mean_u1_abs_dot", F64), ("mean_v1_abs_dot", F64),
    *[(f"{m}_ci_{side}", F64) for m in CI_METRICS for side in ("low", "high")],
])
TABLES = {"adapter_modules": ADAPTER_MODULES, "module_pairs": MODULE_PAIRS,
          "layer_pairs": LAYER_PAIRS, "global_pairs": GLOBAL_PAIRS}

# Raw results (also the cache files' schemas). hash_a <= hash_b.
RAW_ADAPTERS = pa.schema([("hash", pa.string()), ("module", pa.string()), ("singular_values", LIST_F64)])
RAW_PAIRS = pa.schema([
    ("hash_a", pa.string()), ("hash_b", pa.string()), ("top_k", pa.int32()), ("module", pa.string()),
    ("inner", F64), ("principal_angles_deg", LIST_F64), ("u1_abs_dot", F64), ("v1_abs_dot", F64),
])


def effective_rank(singular_values) -> float:
    """exp(-sum p log p), p_k = s_k / sum s (Roy & Vetterli 2007); NaN for dW = 0."""
    s = np.asarray(singular_values, dtype=np.float64)
    total = s.sum()
    if not total > 0:
        return float("nan")
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def metadata(*, tool_version: str, config_hash: str, top_k: int, adapters: dict[str, tuple[str, str]]) -> dict:
    """Schema metadata carried by every table: provenance of the numbers."""
    return {
        b"wsg.tool_version": tool_version.encode(),
        b"wsg.config_hash": (config_hash or "").encode(),
        b"wsg.top_k": str(int(top_k)).encode(),
        b"wsg.adapters": json.dumps({n: {"path": p, "content_hash": h} for n, (p, h) in sorted(adapters.items())},
                                    sort_keys=True).encode(),
    }


def _orth_sq(inner, na2, nb2):
    """||b - P_a b||^2 = ||b||^2 - <a,b>^2/||a||^2, P_a the projection onto
    span{dW_a} (zero if dW_a = 0). It cancels for near-colinear pairs: float64
    inner products (to ~1e-15) keep sqrt(residual / ||b||^2) to ~1e-8."""
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = np.where(na2 > 0, inner * inner / np.where(na2 > 0, na2, 1.0), 0.0)
    return np.maximum(nb2 - proj, 0.0)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _frac(resid, sq):
    """sqrt(residual / norm^2), clipped to [0, 1] against rounding."""
    return np.minimum(np.sqrt(_ratio(resid, sq)), 1.0)


def _cosine(inner, sq_a, sq_b):
    """Clipped to [-1, 1]: rounding can put a colinear pair at 1 + 1e-16."""
    return np.clip(_ratio(inner, np.sqrt(sq_a * sq_b)), -1.0, 1.0)


def _nan_reduce(fn, x: np.ndarray) -> np.ndarray:
    """Row-wise nanmedian/nanmean; NaN (silently) for an all-NaN row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(x, axis=1) if x.shape[1] else np.full(x.shape[0], np.nan)


def _ordered_nanmean(x: np.ndarray) -> np.ndarray:
    """Row-wise nanmean summed in index order (gb.ordered_row_sum): a pair's
    mean does not depend on the other pairs in the table."""
    live = ~np.isnan(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(live.any(1), gb.ordered_row_sum(np.where(live, x, 0.0)) / live.sum(1), np.nan)


def _lists(values: list) -> pa.Array:
    return pa.array(values, type=LIST_F64)


def _effective_ranks(spectra: list[np.ndarray]) -> np.ndarray:
    """effective_rank of many spectra at once (zero-padded: 0 log 0 = 0)."""
    width = max((len(s) for s in spectra), default=0)
    s = np.zeros((len(spectra), width))
    for i, x in enumerate(spectra):
        s[i, :len(x)] = x
    # Sums in index order: the zero padding (set by the largest rank in the
    # table) then adds exact zeros and cannot regroup a pairwise sum.
    total = gb.ordered_row_sum(s)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = s / total
        ent = -gb.ordered_row_sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0))
    return np.where(total[:, 0] > 0, np.exp(ent), np.nan)


def _identity(order: list[str], cells: Optional[Mapping[str, AdapterRef]]) -> dict[str, list]:
    """Per adapter (in `order`): the identity columns, None where unknown."""
    refs = [(cells or {}).get(n) for n in order]
    return {k: [None if r is None else r.step if k == "step" else getattr(r.cell, k) for r in refs]
            for k, _ in IDENTITY}


def _repeat(values: list, idx: np.ndarray, times: int) -> list:
    """values[idx], each repeated `times` (row order of the pair tables)."""
    return [values[i] for i in idx for _ in range(times)]


def _table(cols: dict, schema: pa.Schema) -> pa.Table:
    return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v, type=schema.field(k).type)
                     for k, v in cols.items()}, schema=schema)


def assemble(*, names: dict[str, str], modules: list[tuple[str, int, str]],
             sigma: dict[tuple[str, str], np.ndarray], pairs: dict[tuple[str, str, str], tuple],
             meta: dict, cells: Optional[Mapping] = None, n_boot: int = gb.N_RESAMPLES,
             boot_seed: int = gb.SEED) -> dict[str, pa.Table]:
    """names: adapter name -> content hash; modules: (module, layer, proj) in
    table order; sigma[(hash, module)]: singular values; pairs[(h_a, h_b,
    module)] with h_a <= h_b: (inner, angles_deg, u1, v1); cells: adapter
    name -> core.cells.AdapterRef (absent names get null identity). Vectorised over
    pairs x modules (a 48-adapter grid has 1128 pairs x 144 modules)."""
    order = sorted(names)
    mods = _Modules(modules)
    spectra = [[sigma[(names[n], m)] for m in mods.names] for n in order]
    sq = np.array([[float(np.sum(s * s)) for s in row] for row in spectra]).reshape(len(order), mods.n)
    ident = _identity(order, cells)
    out = {"adapter_modules": _adapter_modules(order, mods, spectra, sq, ident)}
    pp = _PairProducts(order, names, mods, pairs, sq, ident)
    out["module_pairs"] = _module_pairs(pp, mods)
    out.update(_layer_and_global_pairs(pp, mods, n_boot=n_boot, boot_seed=boot_seed))
    out = {k: t.replace_schema_metadata(meta) for k, t in out.items()}
    out["global_pairs"] = out["global_pairs"].replace_schema_metadata({**meta, **gb.metadata(n_boot, boot_seed)})
    return out


class _Modules:
    """The tables' modules, in table order, as arrays."""

    def __init__(self, modules: list[tuple[str, int, str]]):
        self.n = len(modules)
        self.names = np.array([m for m, _, _ in modules], dtype=object)
        self.layers = np.array([layer for _, layer, _ in modules], dtype=np.int32)
        self.projs = np.array([p for _, _, p in modules], dtype=object)


def _adapter_modules(order: list[str], mods: _Modules, spectra: list, sq: np.ndarray, ident: dict) -> pa.Table:
    n_ad, n_mod = len(order), mods.n
    return _table({
        "adapter": np.repeat(np.array(order, dtype=object), n_mod),
        **{k: _repeat(v, np.arange(n_ad), n_mod) for k, v in ident.items()}, "module": np.tile(mods.names, n_ad),
        "layer": np.tile(mods.layers, n_ad), "proj": np.tile(mods.projs, n_ad), "fro_norm": np.sqrt(sq).ravel(),
        "effective_rank": _effective_ranks([s for row in spectra for s in row]),
        "singular_values": _lists([s.tolist() for row in spectra for s in row]),
    }, ADAPTER_MODULES)


class _PairProducts:
    """Per unordered pair (a < b in name order) x module: the raw products
    and what follows from them and the norms (squared norms, residuals)."""

    def __init__(self, order: list[str], names: dict[str, str], mods: _Modules, pairs: dict, sq: np.ndarray,
                 ident: dict):
        ia, ib = np.triu_indices(len(order), k=1)
        n_pair = len(ia)
        inner, u1, v1 = (np.empty((n_pair, mods.n)) for _ in range(3))
        angles = []
        for p, (x, y) in enumerate(zip(ia, ib)):
            ha, hb = names[order[x]], names[order[y]]
            key = (ha, hb) if ha <= hb else (hb, ha)
            for k, m in enumerate(mods.names):
                raw = pairs[(key[0], key[1], m)]
                inner[p, k], u1[p, k], v1[p, k] = raw[0], raw[2], raw[3]
                angles.append(raw[1])
        self.ia, self.ib, self.n_pair, self.ident = ia, ib, n_pair, ident
        self.inner, self.u1, self.v1, self.angles = inner, u1, v1, angles
        self.top1 = np.array([x[0] if len(x) else np.nan for x in angles]).reshape(n_pair, mods.n)
        self.worst = np.array([x[-1] if len(x) else np.nan for x in angles]).reshape(n_pair, mods.n)
        self.na2, self.nb2 = sq[ia], sq[ib]
        # residual of b off a, a off b
        self.ob2, self.oa2 = _orth_sq(inner, self.na2, self.nb2), _orth_sq(inner, self.nb2, self.na2)
        self.a_names, self.b_names = np.array(order, dtype=object)[ia], np.array(order, dtype=object)[ib]

    def ident_cols(self, times: int) -> dict:
        """The identity columns of both sides, each pair's repeated `times`."""
        return {f"{k}_{side}": _repeat(v, idx, times) for k, v in self.ident.items()
                for side, idx in (("a", self.ia), ("b", self.ib))}


def _module_pairs(pp: _PairProducts, mods: _Modules) -> pa.Table:
    n_mod, n_pair = mods.n, pp.n_pair
    return _table({
        "adapter_a": np.repeat(pp.a_names, n_mod), "adapter_b": np.repeat(pp.b_names, n_mod),
        **pp.ident_cols(n_mod), "module": np.tile(mods.names, n_pair), "layer": np.tile(mods.layers, n_pair),
        "proj": np.tile(mods.projs, n_pair), "cosine": _cosine(pp.inner, pp.na2, pp.nb2).ravel(),
        "principal_angles_deg": _lists(pp.angles), "top1_angle_deg": pp.top1.ravel(),
        "worst_angle_deg": pp.worst.ravel(), "u1_abs_dot": pp.u1.ravel(), "v1_abs_dot": pp.v1.ravel(),
        "orth_frac_b_off_a": _frac(pp.ob2, pp.nb2).ravel(), "orth_frac_a_off_b": _frac(pp.oa2, pp.na2).ravel(),
    }, MODULE_PAIRS)


def _layer_and_global_pairs(pp: _PairProducts, mods: _Modules, *, n_boot: int, boot_seed: int
                            ) -> dict[str, pa.Table]:
    # Layer aggregates: sums over the layer's modules (one-hot module -> layer),
    # in module order per pair (gb.ordered_dot: a BLAS product's bits would
    # depend on how many pairs the table holds).
    uniq = np.unique(mods.layers)
    onehot = (mods.layers[:, None] == uniq[None, :]).astype(np.float64)
    li, la2, lb2, lob2, loa2 = (gb.ordered_dot(x, onehot) for x in (pp.inner, pp.na2, pp.nb2, pp.ob2, pp.oa2))
    layer = _table({
        "adapter_a": np.repeat(pp.a_names, len(uniq)), "adapter_b": np.repeat(pp.b_names, len(uniq)),
        **pp.ident_cols(len(uniq)), "layer": np.tile(uniq, pp.n_pair).astype(np.int32),
        "cosine": _cosine(li, la2, lb2).ravel(),
        "orth_frac_b_off_a": _frac(lob2, lb2).ravel(), "orth_frac_a_off_b": _frac(loa2, la2).ravel(),
    }, LAYER_PAIRS)
    gi, ga2, gb2 = (gb.ordered_row_sum(x) for x in (pp.inner, pp.na2, pp.nb2))
    # Uncertainty: resample layers (with all their modules) from the layer sums.
    cis = gb.global_cis(layer_sums={"inner": li, "sq_a": la2, "sq_b": lb2, "resid_b": lob2, "resid_a": loa2},
                        top1=pp.top1, module_layer=np.searchsorted(uniq, mods.layers), n_boot=n_boot,
                        seed=boot_seed)
    glob = _table({
        "adapter_a": pp.a_names, "adapter_b": pp.b_names, **pp.ident_cols(1), "cosine": _cosine(gi, ga2, gb2),
        "orth_frac_b_off_a": _frac(gb.ordered_row_sum(pp.ob2), gb2),
        "orth_frac_a_off_b": _frac(gb.ordered_row_sum(pp.oa2), ga2),
        "median_top1_angle_deg": _nan_reduce(np.nanmedian, pp.top1),
        "median_worst_angle_deg": _nan_reduce(np.nanmedian, pp.worst),
        "mean_u1_abs_dot": _ordered_nanmean(pp.u1), "mean_v1_abs_dot": _ordered_nanmean(pp.v1), **cis,
    }, GLOBAL_PAIRS)
    return {"layer_pairs": layer, "global_pairs": glob}
