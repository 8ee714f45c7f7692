"""Noise floors, convergence and run_findings (analysis/findings.py).

Adapters are random LoRA factors written as PEFT folders; the geometry tables
come from the real engine (analysis.geometry.run_geometry, in-process), and
every number checked here is recomputed from dense float64 ΔW = s·B·A.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest
from safetensors.numpy import save_file
from wsg.analysis.findings import (
    CONVERGENCE,
    NOISE_FLOORS,
    control_kind,
    converged_verdict,
    convergence,
    identify,
    noise_floors,
    ratio_ci,
)
from wsg.analysis.findings_run import run_findings
from wsg.core import rundir
from wsg.core.cells import AdapterRef
from wsg.core.layout import RunLayout

LAYERS, PROJS, D, R, ALPHA = 4, ("q_proj", "v_proj"), 12, 3, 6
SCALE = ALPHA / R


def write_adapter(folder: str, factors: dict) -> str:
    """A PEFT folder from {(layer, proj): (B d×r, A r×d)}."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"r": R, "lora_alpha": ALPHA, "peft_type": "LORA", "target_modules": list(PROJS)}, f)
    t = {}
    for (layer, proj), (b, a) in factors.items():
        key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
        t[f"{key}.lora_A.weight"] = a.astype(np.float32)
        t[f"{key}.lora_B.weight"] = b.astype(np.float32)
    save_file(t, os.path.join(folder, "adapter_model.safetensors"))
    rundir.mark_complete(folder)
    return folder


def random_factors(rng) -> dict:
    return {(layer, p): (rng.normal(size=(D, R)), rng.normal(size=(R, D))) for layer in range(LAYERS) for p in PROJS}


def dense(factors: dict) -> dict:
    """(layer, proj) -> float64 ΔW, from the float32 factors as stored."""
    return {k: SCALE * b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64)
            for k, (b, a) in factors.items()}


def dense_global(x: dict, y: dict) -> dict:
    """Global cosine, orthogonal fractions (y off x, x off y) and norms, dense."""
    ip = sum(float(np.sum(x[k] * y[k])) for k in x)
    nx, ny = (sum(float(np.sum(v[k] ** 2)) for k in v) for v in (x, y))
    res = lambda a, b: sum(float(np.sum((b[k] - (np.sum(a[k] * b[k]) / np.sum(a[k] ** 2)) * a[k]) ** 2))  # noqa: E731
                           for k in a)
    return {"cosine": ip / math.sqrt(nx * ny), "y_off_x": math.sqrt(res(x, y) / ny),
            "x_off_y": math.sqrt(res(y, x) / nx), "norm_x": math.sqrt(nx), "norm_y": math.sqrt(ny)}


def u1v1(x: dict, y: dict) -> tuple[float, float]:
    """Mean over modules of |u1·u1'| and |v1·v1'| from dense SVDs."""
    du, dv = [], []
    for k in x:
        ux, _, vx = np.linalg.svd(x[k])
        uy, _, vy = np.linalg.svd(y[k])
        du.append(abs(ux[:, 0] @ uy[:, 0]))
        dv.append(abs(vx[0] @ vy[0]))
    return float(np.mean(du)), float(np.mean(dv))


# Cells: the reference, its three one-factor controls, a cell differing in both
# seeds (not a floor), a second loss; two checkpoints each.
CELLS = ["sft-s42-lr1e-04", "sft-i43-d42-lr1e-04", "sft-i42-d7-lr1e-04", "sft-s42-lr1e-03", "sft-s43-lr1e-04",
         "rft-s42-lr1e-04"]
STEPS = (6, 12)
HORIZON = "sft-s42-lr1e-04-h9@9"


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    from wsg.analysis.geometry import run_geometry

    root = tmp_path_factory.mktemp("findings")
    rng = np.random.default_rng(0)
    facs, paths = {}, {}
    for cell in CELLS:
        f6 = random_factors(rng)
        # step 12 = step 6 plus a perturbation, so checkpoints of a cell are related
        f12 = {k: (b + 0.3 * rng.normal(size=b.shape), a) for k, (b, a) in f6.items()}
        for step, f in ((6, f6), (12, f12)):
            name = f"{cell}@{step}"
            facs[name] = f
            paths[name] = write_adapter(str(root / "run" / "cells" / cell / f"step_{step}"), f)
    paths["sft_copy"] = write_adapter(str(root / "extra"), facs["sft-s42-lr1e-04@12"])
    # A horizon control of the reference (0.75x schedule): its one final checkpoint,
    # near the reference's final ΔW, and no identity columns (analysis.adapters).
    facs[HORIZON] = {k: (b + 0.1 * rng.normal(size=b.shape), a) for k, (b, a) in facs["sft-s42-lr1e-04@12"].items()}
    paths[HORIZON] = write_adapter(str(root / "run" / "cells" / HORIZON.split("@")[0] / "step_9"), facs[HORIZON])
    # Identity columns as the geometry stage gives them (analysis.adapters.adapter_refs);
    # sft_copy, given by path, has none.
    cells = {}
    for name in paths:
        if "@" in name and name != HORIZON:
            cells[name] = AdapterRef.parse(name)
    tables = run_geometry(paths, str(root / "run" / "geometry"), top_k=3, use_ray=False, progress=False,
                          cells=cells)
    return root, tables, facs


def test_control_kind():
    a = identify("sft-s42-lr1e-04@6")
    assert control_kind(a, identify("sft-i43-d42-lr1e-04@6")) == "init_seed"
    assert control_kind(a, identify("sft-i42-d7-lr1e-04@6")) == "data_seed"
    assert control_kind(a, identify("sft-s42-lr1e-03@6")) == "lr"
    assert control_kind(a, identify("sft-s43-lr1e-04@6")) is None  # both seeds differ
    assert control_kind(a, identify("sft-s42-lr1e-04@12")) is None  # another step
    assert control_kind(a, identify("rft-s42-lr1e-04@6")) is None and identify("sft_copy") is None


@pytest.mark.parametrize("strip", [False, True], ids=["identity-columns", "names-only"])
def test_noise_floors_against_dense(geo, strip):
    _, tables, facs = geo
    gp = tables["global_pairs"]
    if strip:  # tables from before the identity columns: cells parsed from the names
        gp = gp.select([c for c in gp.column_names if not c.endswith(("_a", "_b")) or c.startswith("adapter_")
                        or c.startswith("orth_frac")])
    t = noise_floors(gp, tables["adapter_modules"])
    assert t.schema.equals(NOISE_FLOORS) and all(f.type == pa.float64() for f in t.schema if f.name.startswith("cos"))
    rows = t.to_pylist()
    got = {(r["control"], r["step"], r["adapter_a"], r["adapter_b"]) for r in rows}
    want = set()
    for step in STEPS:
        for kind, a, b in (("init_seed", "sft-i43-d42-lr1e-04", "sft-s42-lr1e-04"),
                           ("data_seed", "sft-i42-d7-lr1e-04", "sft-s42-lr1e-04"),
                           ("lr", "sft-s42-lr1e-03", "sft-s42-lr1e-04"),
                           ("data_seed", "sft-i43-d42-lr1e-04", "sft-s43-lr1e-04")):  # (43, 42) vs (43, 43)
            want.add((kind, step, f"{a}@{step}", f"{b}@{step}"))
    assert got == want
    for r in rows:
        assert r["loss"] == "sft"
        d = dense_global(dense(facs[r["adapter_a"]]), dense(facs[r["adapter_b"]]))
        assert r["cosine"] == pytest.approx(d["cosine"], abs=1e-6)
        assert r["orth_frac_b_off_a"] == pytest.approx(d["y_off_x"], abs=1e-6)
        assert r["orth_frac_a_off_b"] == pytest.approx(d["x_off_y"], abs=1e-6)
        assert (r["norm_a"], r["norm_b"]) == pytest.approx((d["norm_x"], d["norm_y"]), rel=1e-9)
        u1, v1 = u1v1(dense(facs[r["adapter_a"]]), dense(facs[r["adapter_b"]]))
        assert (r["mean_u1_abs_dot"], r["mean_v1_abs_dot"]) == pytest.approx((u1, v1), abs=1e-6)
        if r.get("cosine_ci_low") is not None:  # the geometry stage's bootstrap CIs, carried over
            assert r["cosine_ci_low"] <= r["cosine"] <= r["cosine_ci_high"]


def test_convergence_against_dense(geo):
    _, tables, facs = geo
    t = convergence(tables["adapter_modules"], tables["global_pairs"])
    assert t.schema.equals(CONVERGENCE)
    rows = {(r["cell"], r["step"]): r for r in t.to_pylist()}
    # The extra adapter given by path is not a cell; the horizon control only feeds the settle rule.
    assert {c for c, _ in rows} == set(CELLS)
    for cell in CELLS:
        w6, w12 = dense(facs[f"{cell}@6"]), dense(facs[f"{cell}@12"])
        d = dense_global(w6, w12)
        first, last = rows[(cell, 6)], rows[(cell, 12)]
        assert first["norm"] == pytest.approx(d["norm_x"], rel=1e-9) and last["norm"] == pytest.approx(d["norm_y"], rel=1e-9)
        assert first["cos_final"] == pytest.approx(d["cosine"], abs=1e-6) and last["cos_final"] == 1.0
        assert last["cos_prev"] == pytest.approx(d["cosine"], abs=1e-6) and first["cos_prev"] is None
        assert last["norm_ratio_prev"] == pytest.approx(d["norm_y"] / d["norm_x"], rel=1e-9)
        assert first["norm_frac_final"] == pytest.approx(d["norm_x"] / d["norm_y"], rel=1e-9)
        # Two checkpoints 6 and 12: comparison checkpoint 6 (<= 80% of 12).
        ok = d["cosine"] >= 0.99 and d["norm_y"] / d["norm_x"] - 1 <= 0.10
        assert last["converged"] is ok and first["converged"] is ok and "step 6, step 12" in last["criterion"]
    # Seed partner: the same loss and LR at another init seed, same data seed first.
    r = rows[("sft-s42-lr1e-04", 12)]
    assert r["seed_partner"] == "sft-i43-d42-lr1e-04@12"
    u1, v1 = u1v1(dense(facs["sft-s42-lr1e-04@12"]), dense(facs["sft-i43-d42-lr1e-04@12"]))
    assert (r["seed_u1"], r["seed_v1"]) == pytest.approx((u1, v1), abs=1e-6)
    assert rows[("sft-s43-lr1e-04", 12)]["seed_partner"] == "sft-i42-d7-lr1e-04@12"  # no (42, 43) cell
    assert rows[("rft-s42-lr1e-04", 12)]["seed_partner"] is None and rows[("rft-s42-lr1e-04", 12)]["seed_u1"] is None


def test_converged_verdict_criterion():
    cos = lambda v: {s: v for s in (4, 8, 12)}  # noqa: E731
    ok, why = converged_verdict([12], {12: 1.0}, {12: 1.0})
    assert not ok and "not assessable" in why
    ok, why = converged_verdict([11, 12], {11: 1.0, 12: 1.0}, {11: 1.0, 12: 1.0})
    assert not ok and "no checkpoint at <= 80%" in why
    # Settled: direction within cos 0.995, +5% norm, growth slowing (4 -> 8: x2; 8 -> 12: +5%).
    ok, why = converged_verdict([4, 8, 12], {4: 0.5, 8: 1.0, 12: 1.05}, cos(0.995))
    assert ok and why.startswith("converged")
    assert not converged_verdict([4, 8, 12], {4: 0.5, 8: 1.0, 12: 1.05}, cos(0.98))[0]  # still rotating
    assert not converged_verdict([4, 8, 12], {4: 0.5, 8: 1.0, 12: 1.15}, cos(0.995))[0]  # still growing
    # Growth speeding up: +1% over (4, 8], +8% over (8, 12].
    ok, why = converged_verdict([4, 8, 12], {4: 0.99, 8: 1.0, 12: 1.08}, cos(0.995))
    assert not ok and "log-norm growth per step" in why
    # Two checkpoints: slowing cannot be checked, the two other conditions decide.
    ok, why = converged_verdict([6, 12], {6: 1.0, 12: 1.05}, {6: 0.995, 12: 1.0})
    assert ok and "slowing not checkable" in why
    # The comparison checkpoint is the last one at <= 80% of the final step (8, not 11).
    ok, why = converged_verdict([4, 8, 11, 12], {4: 0.5, 8: 1.0, 11: 1.0, 12: 1.05},
                                {4: 0.9, 8: 0.995, 11: 0.5, 12: 1.0})
    assert ok and "step 8, step 12" in why


def test_ratio_ci_coverage():
    """Layer bootstrap of sqrt(Σ num / Σ den) over 36 layers: ~95% coverage of
    sqrt(E num / E den) on a synthetic population (and of a plain mean)."""
    rng = np.random.default_rng(7)
    hits_root = hits_mean = 0
    reps = 400
    for k in range(reps):
        den = rng.gamma(4.0, 0.25, size=36)                 # E = 1
        num = den * rng.gamma(9.0, 1 / 9.0, size=36) * 4.0  # E = 4 -> sqrt = 2
        v, lo, hi = ratio_ci(num, den, n_boot=1000, seed=k)
        hits_root += lo <= 2.0 <= hi
        x = rng.normal(0.5, 0.2, size=36)
        m, lo, hi = ratio_ci(x, np.ones(36), root=False, n_boot=1000, seed=k)
        assert m == pytest.approx(x.mean())
        hits_mean += lo <= 0.5 <= hi
    assert 0.90 <= hits_root / reps <= 0.985 and 0.90 <= hits_mean / reps <= 0.985
    assert v == pytest.approx(math.sqrt(num.sum() / den.sum()))


def test_run_findings_writes_tables(geo):
    from wsg.core.config import dump_config
    from wsg.sweep.config import parse_config

    root, _, _ = geo
    run = str(root / "run")
    cfg = parse_config({"name": "t", "grid": {"losses": ["sft", "rft"], "seeds": [42], "lrs": [1e-4]}})
    rundir.write_text(RunLayout.of(run).config, dump_config(cfg))
    summary = run_findings(cfg, run)
    lay = RunLayout.of(run)
    assert summary["cells"] == len(CELLS) and summary["noise_floor_pairs"] == 8  # the horizon is no floor
    assert sum(summary["claims"].values()) >= 19
    for name in ("noise_floors", "convergence", "claims"):
        t = rundir.read_table(lay.geometry_table(name))
        md = t.schema.metadata
        assert json.loads(md[b"wsg.bootstrap"])["n_resamples"] == 2000 and b"wsg.claims_rule" in md
        assert all(f.type in (pa.float64(), pa.int64(), pa.string(), pa.bool_(), pa.list_(pa.string()))
                   for f in t.schema)
    claims = {r["claim"]: r for r in rundir.read_table(lay.geometry_table("claims")).to_pylist()}
    # sft at two init seeds is here; its cosine is measured (random factors: near 0).
    assert claims["seed.cosine"]["verdict"] != "not_measured" and claims["seed.cosine"]["step"] == 12
    assert claims["dpo.cosine"]["verdict"] == "not_measured" and "dpo" in claims["dpo.cosine"]["note"]
    # The settle rule reads the horizon control's final ΔW against the reference's,
    # and the data-order control at the claim's step, as dense computations give them.
    _, _, facs = geo
    ref = dense(facs["sft-s42-lr1e-04@12"])
    s = claims["seed.cosine"]
    assert s["horizon_agreement"] == pytest.approx(dense_global(dense(facs[HORIZON]), ref)["cosine"], rel=1e-5)
    assert s["order_agreement"] == pytest.approx(
        dense_global(dense(facs["sft-i42-d7-lr1e-04@12"]), ref)["cosine"], rel=1e-5, abs=1e-6)
    # Random factors: two data orders disagree, so nothing is settled.
    assert s["verdict"] == "unsettled" and s["settled"] is False


def test_run_findings_needs_geometry(tmp_path):
    from wsg.core.errors import WsgError
    from wsg.sweep.config import parse_config

    with pytest.raises(WsgError, match="geometry stage first"):
        run_findings(parse_config({"name": "t"}), str(tmp_path))
