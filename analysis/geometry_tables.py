"""The geometry tables (DESIGN.md "Geometry: definitions and table contract").

The engine produces two kinds of raw result, both keyed by adapter content
hash so they can be cached and reused under any adapter name:

- per adapter x module: the singular values of dW (everything per adapter
  follows from them: Frobenius norm, effective rank, numerical rank);
- per unordered pair x module: the inner product <dW_a, dW_b>_F, the principal
  angles, |<u1_a, u1_b>| and |<v1_a, v1_b>| (all symmetric in a, b).

This module turns them into the four contract tables: cosines and orthogonal
fractions are derived here from inner products and norms, and aggregated per
layer and globally by summing over modules (never by averaging cosines).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa

F64 = pa.float64()
LIST_F64 = pa.list_(pa.float64())

ADAPTER_MODULES = pa.schema([
    ("adapter", pa.string()), ("module", pa.string()), ("layer", pa.int32()), ("proj", pa.string()),
    ("fro_norm", F64), ("effective_rank", F64), ("singular_values", LIST_F64),
])
MODULE_PAIRS = pa.schema([
    ("adapter_a", pa.string()), ("adapter_b", pa.string()), ("module", pa.string()), ("layer", pa.int32()),
    ("proj", pa.string()), ("cosine", F64), ("principal_angles_deg", LIST_F64), ("top1_angle_deg", F64),
    ("worst_angle_deg", F64), ("u1_abs_dot", F64), ("v1_abs_dot", F64),
    ("orth_frac_b_off_a", F64), ("orth_frac_a_off_b", F64),
])
LAYER_PAIRS = pa.schema([
    ("adapter_a", pa.string()), ("adapter_b", pa.string()), ("layer", pa.int32()),
    ("cosine", F64), ("orth_frac_b_off_a", F64), ("orth_frac_a_off_b", F64),
])
GLOBAL_PAIRS = pa.schema([
    ("adapter_a", pa.string()), ("adapter_b", pa.string()), ("cosine", F64),
    ("orth_frac_b_off_a", F64), ("orth_frac_a_off_b", F64), ("median_top1_angle_deg", F64),
    ("median_worst_angle_deg", F64), ("mean_u1_abs_dot", F64), ("mean_v1_abs_dot", F64),
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


def _nanstat(fn, x: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(fn(x)) if x.size else float("nan")


def _orth_sq(inner, na2, nb2):
    """||b - P_a b||^2 with P_a the projection onto span{dW_a} (zero if dW_a = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = np.where(na2 > 0, inner * inner / np.where(na2 > 0, na2, 1.0), 0.0)
    return np.maximum(nb2 - proj, 0.0)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def assemble(*, names: dict[str, str], modules: list[tuple[str, int, str]],
             sigma: dict[tuple[str, str], np.ndarray], pairs: dict[tuple[str, str, str], tuple],
             meta: dict) -> dict[str, pa.Table]:
    """names: adapter name -> content hash; modules: (module, layer, proj) in
    table order; sigma[(hash, module)]: singular values; pairs[(h_a, h_b,
    module)] with h_a <= h_b: (inner, angles_deg, u1, v1)."""
    order = sorted(names)
    mod_names = [m for m, _, _ in modules]
    layers = np.array([layer for _, layer, _ in modules], dtype=np.int32)
    projs = [p for _, _, p in modules]
    nmod = len(modules)

    # norms[name] = ||dW||_F^2 per module (vector over modules)
    sq = {n: np.array([float(np.sum(sigma[(names[n], m)] ** 2)) for m in mod_names]) for n in order}
    rows = {k: [] for k in ADAPTER_MODULES.names}
    for n in order:
        for i, (m, layer, proj) in enumerate(modules):
            s = sigma[(names[n], m)]
            for k, v in zip(ADAPTER_MODULES.names, (n, m, layer, proj, float(np.sqrt(sq[n][i])),
                                                     effective_rank(s), [float(x) for x in s])):
                rows[k].append(v)
    out = {"adapter_modules": pa.table(rows, schema=ADAPTER_MODULES)}

    mp = {k: [] for k in MODULE_PAIRS.names}
    lp = {k: [] for k in LAYER_PAIRS.names}
    gp = {k: [] for k in GLOBAL_PAIRS.names}
    uniq_layers = sorted(set(layers.tolist()))
    for ia, a in enumerate(order):
        for b in order[ia + 1:]:
            ha, hb = names[a], names[b]
            key = (ha, hb) if ha <= hb else (hb, ha)
            raw = [pairs[(key[0], key[1], m)] for m in mod_names]
            inner = np.array([r[0] for r in raw])
            angles = [list(map(float, r[1])) for r in raw]
            u1 = np.array([r[2] for r in raw], dtype=np.float64)
            v1 = np.array([r[3] for r in raw], dtype=np.float64)
            na2, nb2 = sq[a], sq[b]
            cos = _ratio(inner, np.sqrt(na2 * nb2))
            ob2, oa2 = _orth_sq(inner, na2, nb2), _orth_sq(inner, nb2, na2)
            top1 = np.array([x[0] if x else np.nan for x in angles])
            worst = np.array([x[-1] if x else np.nan for x in angles])
            cols = (
                [a] * nmod, [b] * nmod, mod_names, layers, projs, cos, angles, top1, worst, u1, v1,
                np.sqrt(_ratio(ob2, nb2)), np.sqrt(_ratio(oa2, na2)),
            )
            for k, v in zip(MODULE_PAIRS.names, cols):
                mp[k].extend(list(v))
            for layer in uniq_layers:
                sel = layers == layer
                vals = (a, b, layer, float(_ratio(inner[sel].sum(), np.sqrt(na2[sel].sum() * nb2[sel].sum()))),
                        float(np.sqrt(_ratio(ob2[sel].sum(), nb2[sel].sum()))),
                        float(np.sqrt(_ratio(oa2[sel].sum(), na2[sel].sum()))))
                for k, v in zip(LAYER_PAIRS.names, vals):
                    lp[k].append(v)
            vals = (a, b, float(_ratio(inner.sum(), np.sqrt(na2.sum() * nb2.sum()))),
                    float(np.sqrt(_ratio(ob2.sum(), nb2.sum()))), float(np.sqrt(_ratio(oa2.sum(), na2.sum()))),
                    _nanstat(np.nanmedian, top1), _nanstat(np.nanmedian, worst),
                    _nanstat(np.nanmean, u1), _nanstat(np.nanmean, v1))
            for k, v in zip(GLOBAL_PAIRS.names, vals):
                gp[k].append(v)
    out["module_pairs"] = pa.table({k: pa.array(v, type=MODULE_PAIRS.field(k).type) for k, v in mp.items()},
                                   schema=MODULE_PAIRS)
    out["layer_pairs"] = pa.table(lp, schema=LAYER_PAIRS)
    out["global_pairs"] = pa.table(gp, schema=GLOBAL_PAIRS)
    return {k: t.replace_schema_metadata(meta) for k, t in out.items()}
