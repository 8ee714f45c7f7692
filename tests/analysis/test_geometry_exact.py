"""Exactness (issue 13 item 8): every column of the four geometry tables agrees
with a float64 DENSE reference within 1e-6 absolute, on random adapters of
ranks 2 to 16 (uneven spectra, rsLoRA scale, a zero update, near copies with
sub-degree angles, gauge copies B R, R^-1 A).

The reference materialises dW = s B A in float64 from the factors as stored,
takes numpy's SVD, scipy's subspace_angles and explicit residuals
dW_b - <a,b>/||a||^2 dW_a; no code of analysis/geometry*.py is used for it.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from test_geometry import uneven, write_adapter
from wsg.analysis.geometry import run_geometry

SHAPES = {"q_proj": (64, 48), "k_proj": (32, 48), "v_proj": (32, 48), "o_proj": (48, 64)}
LAYERS = 3
TOL = 1e-6


def _factors(rng, r, decades=2.0, decades_a=None):
    da = decades if decades_a is None else decades_a
    return {(i, p): (uneven(rng, d_out, r, decades), uneven(rng, r, d_in, da) / 3)
            for i in range(LAYERS) for p, (d_out, d_in) in SHAPES.items()}


def _gauge(rng, fac):
    """(B R, R^-1 A) with a random R of condition number 10: the same dW."""
    out = {}
    for key, (b, a) in fac.items():
        g = uneven(rng, b.shape[1], b.shape[1], decades=1.0)
        out[key] = (b @ g, np.linalg.solve(g, a))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (folder, {module: dense float64 dW}); the dense dW from the stored bytes."""
    root = tmp_path_factory.mktemp("exact")
    rng = np.random.default_rng(2024)
    # float32-representable, so that the float64 gauge copy is exactly the stored r8's update
    f8 = {k: tuple(x.astype(np.float32).astype(np.float64) for x in ba) for k, ba in _factors(rng, 8).items()}
    f4 = _factors(rng, 4)
    zero = {k: (np.zeros_like(b), a) for k, (b, a) in _factors(rng, 4).items()}
    tiny = {k: (b + 2e-5 * uneven(rng, *b.shape), a) for k, (b, a) in f8.items()}  # angles well under 1 degree
    specs = {  # name: (factors, r, alpha, rslora, stored dtype)
        "r2": (_factors(rng, 2), 2, 4, False, "float32"),
        "r4": (f4, 4, 8, False, "float32"),
        "r4rs": (_factors(rng, 4, decades=3.0), 4, 16, True, "float32"),
        "r8": (f8, 8, 16, False, "float32"),
        "r8near": ({k: (b + 0.3 * uneven(rng, *b.shape), a + 0.1 * uneven(rng, *a.shape))
                    for k, (b, a) in f8.items()}, 8, 16, False, "float32"),
        "r8tiny": (tiny, 8, 16, False, "float32"),
        "r8gauge64": (_gauge(rng, f8), 8, 16, False, "float64"),  # exactly the same update
        "r8gauge32": (_gauge(rng, f8), 8, 16, False, "float32"),  # the same up to float32 storage
        "r16": (_factors(rng, 16), 16, 32, False, "float32"),
        # an ill-conditioned B (cond 1e5, as a B grown from peft's zero init can be)
        "r8ill": (_factors(rng, 8, decades=5.0, decades_a=0.5), 8, 16, False, "float32"),
        "zero": (zero, 4, 8, False, "float32"),
    }
    out = {}
    for name, (fac, r, alpha, rsl, dtype) in specs.items():
        folder = write_adapter(str(root / name), fac, r=r, alpha=alpha, rslora=rsl, dtype=dtype)
        s = alpha / np.sqrt(r) if rsl else alpha / r
        stored = {k: tuple(np.asarray(x, dtype).astype(np.float64) for x in ba) for k, ba in fac.items()}
        out[name] = (folder, {f"layers.{i}.{p}": s * b @ a for (i, p), (b, a) in stored.items()})
    # the float64 gauge copy stores the same dW to float64 rounding (the premise of the test)
    assert max(np.abs(out["r8"][1][m] - out["r8gauge64"][1][m]).max() for m in out["r8"][1]) < 1e-15
    return out


def _num_rank(s):
    return int(np.sum(s > 1e-7 * s[0])) if s[0] > 0 else 0


def _reference(dws, top_k):
    """Every table column from dense float64 dW."""
    names = sorted(dws)
    mods = sorted(dws[names[0]], key=lambda m: (int(m.split(".")[1]), m.split(".")[2]))
    svd = {(n, m): np.linalg.svd(dws[n][m], full_matrices=False) for n in names for m in mods}
    ref = {"adapter_modules": {}, "module_pairs": {}, "layer_pairs": {}, "global_pairs": {}}
    for n in names:
        for m in mods:
            s = svd[(n, m)][1]
            p = s[s > 0] / s.sum() if s.sum() > 0 else None
            ref["adapter_modules"][(n, m)] = {"fro_norm": np.sqrt(np.sum(dws[n][m] ** 2)), "singular_values": s,
                                              "effective_rank": np.exp(-np.sum(p * np.log(p))) if p is not None
                                              else np.nan}

    def off(wa, wb):  # ||b - P_a b||^2, P_a of a zero a is 0
        saa = np.sum(wa * wa)
        res = wb - np.sum(wa * wb) / saa * wa if saa > 0 else wb
        return np.sum(res * res)

    def frac(num, den):
        return np.sqrt(num / den) if den > 0 else np.nan

    def cos(x, y):
        d = np.sqrt(np.sum(x * x) * np.sum(y * y))
        return np.sum(x * y) / d if d > 0 else np.nan

    for ia, a in enumerate(names):
        for b in names[ia + 1:]:
            rows = []
            for m in mods:
                (ua, sa, vha), (ub, sb, vhb) = svd[(a, m)], svd[(b, m)]
                k = min(top_k, _num_rank(sa), _num_rank(sb))
                ang = np.sort(np.degrees(scipy.linalg.subspace_angles(ua[:, :k], ub[:, :k]))) if k else np.array([])
                wa, wb = dws[a][m], dws[b][m]
                live = k > 0
                row = {"cosine": cos(wa, wb), "principal_angles_deg": ang,
                       "top1_angle_deg": ang[0] if live else np.nan, "worst_angle_deg": ang[-1] if live else np.nan,
                       "u1_abs_dot": abs(ua[:, 0] @ ub[:, 0]) if live else np.nan,
                       "v1_abs_dot": abs(vha[0] @ vhb[0]) if live else np.nan,
                       "orth_frac_b_off_a": frac(off(wa, wb), np.sum(wb * wb)),
                       "orth_frac_a_off_b": frac(off(wb, wa), np.sum(wa * wa))}
                ref["module_pairs"][(a, b, m)] = row
                rows.append(row)
            for layer in range(LAYERS):
                sel = [m for m in mods if m.startswith(f"layers.{layer}.")]
                ref["layer_pairs"][(a, b, layer)] = _agg(dws, a, b, sel, off, frac, cos)
            g = _agg(dws, a, b, mods, off, frac, cos)
            with warnings.catch_warnings():  # all-NaN rows (the zero update) give NaN, as in the tables
                warnings.simplefilter("ignore", RuntimeWarning)
                g.update({"median_top1_angle_deg": np.nanmedian([r["top1_angle_deg"] for r in rows]),
                          "median_worst_angle_deg": np.nanmedian([r["worst_angle_deg"] for r in rows]),
                          "mean_u1_abs_dot": np.nanmean([r["u1_abs_dot"] for r in rows]),
                          "mean_v1_abs_dot": np.nanmean([r["v1_abs_dot"] for r in rows])})
            ref["global_pairs"][(a, b)] = g
    return ref


def _agg(dws, a, b, sel, off, frac, cos):
    va = np.concatenate([dws[a][m].ravel() for m in sel])
    vb = np.concatenate([dws[b][m].ravel() for m in sel])
    return {"cosine": cos(va, vb),
            "orth_frac_b_off_a": frac(sum(off(dws[a][m], dws[b][m]) for m in sel), vb @ vb),
            "orth_frac_a_off_b": frac(sum(off(dws[b][m], dws[a][m]) for m in sel), va @ va)}


KEYS = {"adapter_modules": ("adapter", "module"), "module_pairs": ("adapter_a", "adapter_b", "module"),
        "layer_pairs": ("adapter_a", "adapter_b", "layer"), "global_pairs": ("adapter_a", "adapter_b")}


def _max_errors(tables, ref):
    """{table.column: max |table - reference|}; NaN where and only where the reference is NaN."""
    err = {}
    for name, keys in KEYS.items():
        rows = tables[name].to_pylist()
        assert len(rows) == len(ref[name])
        for row in rows:
            want = ref[name][tuple(row[k] for k in keys)]
            for col, w in want.items():
                got = np.asarray(row[col], np.float64)
                w = np.asarray(w, np.float64)
                if col == "singular_values":
                    w = w[:got.size]
                assert got.shape == w.shape, (name, col, row)
                assert np.array_equal(np.isnan(got), np.isnan(w)), (name, col, row, w)
                d = np.abs(got - w)[~np.isnan(w)]
                err[f"{name}.{col}"] = max(err.get(f"{name}.{col}", 0.0), float(d.max()) if d.size else 0.0)
    return err


@pytest.mark.parametrize("top_k", [3, 10])
def test_every_column_matches_dense_float64(adapters, tmp_path, top_k):
    folders = {n: f for n, (f, _) in adapters.items()}
    tables = run_geometry(folders, str(tmp_path / "geo"), top_k=top_k, use_ray=False, progress=False)
    err = _max_errors(tables, _reference({n: d for n, (_, d) in adapters.items()}, top_k))
    print(f"\nmax |error| vs dense float64, top_k={top_k}:")
    for col, e in sorted(err.items()):
        print(f"  {col:45s} {e:.2e}")
    assert len(err) == 3 + 8 + 3 + 7  # every float column of the four tables was compared
    bad = {c: e for c, e in err.items() if not e <= TOL}
    assert not bad, bad


def test_gauge_copy_is_orthogonal_to_nothing(adapters, tmp_path):
    """An update against (B R, R^-1 A) of itself: cosine 1, orthogonal
    fractions <= 1e-6 both ways, per module, layer and globally."""
    folders = {n: adapters[n][0] for n in ("r8", "r8gauge64", "r8gauge32")}
    tables = run_geometry(folders, str(tmp_path / "g"), top_k=8, use_ray=False, progress=False)
    for name in ("module_pairs", "layer_pairs", "global_pairs"):
        rows = tables[name].to_pylist()
        assert rows
        for r in rows:
            assert r["cosine"] == pytest.approx(1.0, abs=1e-12)
            assert 0.0 <= r["orth_frac_b_off_a"] <= TOL and 0.0 <= r["orth_frac_a_off_b"] <= TOL, (name, r)
    for r in tables["module_pairs"].to_pylist():
        if {r["adapter_a"], r["adapter_b"]} == {"r8", "r8gauge64"}:  # exact copy: zero angles, to 1e-6 degree
            assert len(r["principal_angles_deg"]) == 8 and max(r["principal_angles_deg"]) <= TOL
            assert r["u1_abs_dot"] == pytest.approx(1.0, abs=1e-12)
