"""Layer-bootstrap CIs of global_pairs (issue 13 item 3; docs/geometry.md
"Uncertainty"): against a straightforward loop over resamples on dense
float64 updates, determinism and metadata, and coverage on a synthetic model
whose true values are known."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from test_geometry import uneven, write_adapter
from wsg.analysis import geometry_bootstrap as gb
from wsg.analysis.geometry import read_metadata, run_geometry

SHAPES = {"q_proj": (20, 16), "v_proj": (8, 16), "o_proj": (16, 20)}
LAYERS = 6
N_BOOT, SEED = 300, 11


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Four adapters (one a zero update) with layer-to-layer variation, and
    their dense float64 dW per module."""
    root = tmp_path_factory.mktemp("boot")
    rng = np.random.default_rng(5)
    base = {(i, p): (uneven(rng, d_out, 4), uneven(rng, 4, d_in)) for i in range(LAYERS)
            for p, (d_out, d_in) in SHAPES.items()}
    facs = {"base": base, "zero": {k: (0 * b, a) for k, (b, a) in base.items()}}
    for name, noise in (("near", 0.3), ("far", 1.5)):
        # the perturbation grows with depth, so layers differ and the CIs are not trivial
        facs[name] = {(i, p): (b + noise * (1 + i) / LAYERS * uneven(rng, *b.shape), a) for (i, p), (b, a) in base.items()}
    folders, dws = {}, {}
    for name, fac in facs.items():
        folders[name] = write_adapter(str(root / name), fac, r=4, alpha=8, dtype="float64")
        dws[name] = {f"layers.{i}.{p}": 2.0 * b @ a for (i, p), (b, a) in fac.items()}
    return folders, dws


def _loop_cis(dws, top1, a, b, draws):
    """Per resample: gather the drawn layers' modules (with repetition) and
    compute each statistic from dense matrices; then the 2.5/97.5% quantiles."""
    stats = {k: [] for k in ("cosine", "orth_frac_b_off_a", "orth_frac_a_off_b", "median_top1_angle_deg")}
    by_layer = {i: [m for m in dws[a] if m.startswith(f"layers.{i}.")] for i in range(LAYERS)}
    for row in draws:
        mods = [m for layer in row for m in by_layer[layer]]
        ab = sum(np.sum(dws[a][m] * dws[b][m]) for m in mods)
        aa = sum(np.sum(dws[a][m] ** 2) for m in mods)
        bb = sum(np.sum(dws[b][m] ** 2) for m in mods)

        def resid(x, y):  # sum over modules of ||y - P_x y||^2
            tot = 0.0
            for m in mods:
                wx, wy = dws[x][m], dws[y][m]
                r = wy - np.sum(wx * wy) / np.sum(wx * wx) * wx if np.sum(wx * wx) > 0 else wy
                tot += np.sum(r * r)
            return tot

        stats["cosine"].append(ab / np.sqrt(aa * bb) if aa * bb > 0 else np.nan)
        stats["orth_frac_b_off_a"].append(np.sqrt(resid(a, b) / bb) if bb > 0 else np.nan)
        stats["orth_frac_a_off_b"].append(np.sqrt(resid(b, a) / aa) if aa > 0 else np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stats["median_top1_angle_deg"].append(np.nanmedian([top1[m] for m in mods]))
    out = {}
    for k, v in stats.items():
        v = np.array(v)
        v = v[~np.isnan(v)]
        out[k] = tuple(np.quantile(v, [0.025, 0.975])) if v.size else (np.nan, np.nan)
    return out


def test_cis_match_a_loop_over_resamples_on_dense_updates(grid, tmp_path):
    folders, dws = grid
    tables = run_geometry(folders, str(tmp_path / "g"), top_k=3, use_ray=False, progress=False,
                          n_boot=N_BOOT, boot_seed=SEED)
    # the documented draw: L layer indices with replacement per resample
    draws = np.random.default_rng(SEED).integers(0, LAYERS, size=(N_BOOT, LAYERS))
    mp = tables["module_pairs"].to_pylist()
    rows = tables["global_pairs"].to_pylist()
    assert len(rows) == 6
    widths = []
    for row in rows:
        a, b = row["adapter_a"], row["adapter_b"]
        top1 = {r["module"]: r["top1_angle_deg"] for r in mp if (r["adapter_a"], r["adapter_b"]) == (a, b)}
        ref = _loop_cis(dws, top1, a, b, draws)
        for metric, (lo, hi) in ref.items():
            got = (row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])
            np.testing.assert_allclose(got, (lo, hi), rtol=0, atol=1e-9, err_msg=f"{a} {b} {metric}")
            if not np.isnan(lo):
                assert lo <= hi
                widths.append(hi - lo)
        if "zero" not in (a, b):  # the point estimate lies in its interval here
            for metric in ref:
                assert row[f"{metric}_ci_low"] - 1e-12 <= row[metric] <= row[f"{metric}_ci_high"] + 1e-12
    assert max(widths) > 1e-3  # layers differ: the intervals are not degenerate
    zero = [r for r in rows if "zero" in (r["adapter_a"], r["adapter_b"])]
    assert all(np.isnan(r["cosine_ci_low"]) and np.isnan(r["median_top1_angle_deg_ci_high"]) for r in zero)


def test_deterministic_for_a_seed_and_recorded(grid, tmp_path):
    folders, _ = grid
    pick = {k: folders[k] for k in ("base", "near", "far")}
    t1 = run_geometry(pick, str(tmp_path / "a"), top_k=3, use_ray=False, progress=False, n_boot=200, boot_seed=4)
    t2 = run_geometry(pick, str(tmp_path / "b"), top_k=3, use_ray=False, progress=False, n_boot=200, boot_seed=4)
    t3 = run_geometry(pick, str(tmp_path / "a"), top_k=3, use_ray=False, progress=False, n_boot=200, boot_seed=5)
    ci = [c for c in t1["global_pairs"].column_names if "_ci_" in c]
    assert len(ci) == 8
    assert all(t1["global_pairs"].column(c).equals(t2["global_pairs"].column(c)) for c in ci)
    assert not all(t1["global_pairs"].column(c).equals(t3["global_pairs"].column(c)) for c in ci)
    md = read_metadata(t1["global_pairs"])["bootstrap"]
    assert md["n_resamples"] == 200 and md["seed"] == 4 and md["unit"] == "layer" and md["level"] == 0.95
    assert json.loads(t3["global_pairs"].schema.metadata[b"wsg.bootstrap"])["seed"] == 5
    # a pair's interval does not depend on the other adapters in the table
    two = run_geometry({k: folders[k] for k in ("base", "near")}, str(tmp_path / "c"), top_k=3, use_ray=False,
                       progress=False, n_boot=200, boot_seed=4)
    row = [r for r in t1["global_pairs"].to_pylist() if (r["adapter_a"], r["adapter_b"]) == ("base", "near")][0]
    assert all(two["global_pairs"].to_pylist()[0][c] == row[c] for c in ci)


def test_weighted_median_equals_nanmedian_of_the_multiset():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(7, 12))
    vals[2, [1, 5]] = np.nan
    vals[4] = np.nan
    module_layer = np.repeat(np.arange(4), 3)
    draws = gb.layer_draws(4, 50, seed=2)
    counts = gb.layer_counts(4, 50, seed=2)
    got = gb.median_stats(vals, module_layer, counts)
    for p in range(7):
        for b in range(50):
            multiset = [vals[p, m] for layer in draws[b] for m in np.flatnonzero(module_layer == layer)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                want = np.nanmedian(multiset)
            assert (np.isnan(want) and np.isnan(got[p, b])) or got[p, b] == pytest.approx(want, abs=1e-12)


def test_percentile_interval_covers_the_true_value_at_its_nominal_rate():
    """R replications, each of L layers drawn i.i.d. from a known model: per
    module x ~ N(0, s^2 I_d), y = rho x + sqrt(1 - rho^2) z, so the global
    cosine (a ratio of expected sums) is rho and the orthogonal fractions are
    sqrt((1 - rho^2)(d - 1)/d); top-1 angles 20 + layer effect + noise, both
    symmetric, so their population median is 20. Each replication's 95%
    interval should cover the truth ~95% of the time."""
    rng = np.random.default_rng(1)
    reps, n_layer, n_mod, d, rho = 1000, 100, 4, 64, 0.6
    s = np.exp(rng.normal(0, 0.3, size=(reps, n_layer, n_mod)))[..., None]  # uneven module scales
    x = rng.normal(size=(reps, n_layer, n_mod, d)) * s
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.normal(size=x.shape) * s
    inner, sa, sb = (x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1)
    sums = {"inner": inner, "sq_a": sa, "sq_b": sb, "resid_b": sb - inner ** 2 / sa, "resid_a": sa - inner ** 2 / sb}
    top1 = 20 + rng.normal(0, 2, size=(reps, n_layer, 1)) + rng.normal(0, 3, size=(reps, n_layer, n_mod))
    cis = gb.global_cis(layer_sums={k: v.sum(2) for k, v in sums.items()}, top1=top1.reshape(reps, -1),
                        module_layer=np.repeat(np.arange(n_layer), n_mod), n_boot=1000, seed=3)
    truth = {"cosine": rho, "orth_frac_b_off_a": np.sqrt((1 - rho ** 2) * (d - 1) / d),
             "orth_frac_a_off_b": np.sqrt((1 - rho ** 2) * (d - 1) / d), "median_top1_angle_deg": 20.0}
    # 3.5 binomial standard deviations of the coverage of R replications
    tol = 3.5 * np.sqrt(0.95 * 0.05 / reps)
    for name, t in truth.items():
        lo, hi = cis[f"{name}_ci_low"], cis[f"{name}_ci_high"]
        cover = np.mean((lo <= t) & (t <= hi))
        assert abs(cover - 0.95) <= tol, (name, cover, tol)
        # and the intervals are informative: a value two median half-widths off is rarely covered
        off = t + np.median(hi - lo)
        assert np.mean((lo <= off) & (off <= hi)) < 0.5, name
