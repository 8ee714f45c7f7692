"""Cell identity in every geometry table (issue 13 item 4): cell ids read by
core.cells.CellKey (both forms), CellRef/cell_refs, identity columns per row
(null for adapters given by path), the cache unaffected by identity, and
control cells in discovery and reference pairs."""
from __future__ import annotations

import os
import types

import numpy as np
import pyarrow as pa
import pytest
from test_geometry import random_factors, write_adapter
from wsg.analysis.adapters import (
    Adapter,
    CellRef,
    cell_refs,
    describe,
    list_adapters,
    reference_pairs,
)
from wsg.analysis.geometry import CACHE_VERSION, run_geometry
from wsg.analysis.geometry_tables import TABLES
from wsg.core import rundir
from wsg.core.layout import RunLayout

IDENT = ("loss", "init_seed", "data_seed", "lr", "step")


def test_describe_reads_both_cell_id_forms():
    d = describe("sft-s42-lr1e-04@12")
    assert (d["loss"], d["seed"], d["init_seed"], d["data_seed"], d["lr"], d["step"]) == ("sft", 42, 42, 42, 1e-4, 12)
    d = describe("rift-i43-d7-lr5e-07@3")
    assert (d["loss"], d["init_seed"], d["data_seed"], d["lr"], d["step"], d["cell_id"]) == \
        ("rift", 43, 7, 5e-7, 3, "rift-i43-d7-lr5e-07")
    d = describe("my_adapter")
    assert d["loss"] is None and d["init_seed"] is None and d["step"] == -1 and d["cell_id"] is None


def test_adapter_seeds_default_to_the_grid_seed_and_cell_refs():
    a = Adapter(name="sft-s42-lr1e-04@2", path="", uri="", step=2, cell_id="sft-s42-lr1e-04", loss="sft",
                seed=42, lr=1e-4)
    assert (a.init_seed, a.data_seed) == (42, 42)
    c = Adapter(name="sft-i43-d7-lr1e-04@2", path="", uri="", step=2, cell_id="sft-i43-d7-lr1e-04", loss="sft",
                lr=1e-4, init_seed=43, data_seed=7)
    assert c.seed == 43
    extra = Adapter(name="copy", path="", uri="", step=-1)
    nostep = Adapter(name="dpo-s1-lr1e-05", path="", uri="", step=-1, loss="dpo", seed=1, lr=1e-5)
    refs = cell_refs([a, c, extra, nostep])
    assert refs == {a.name: CellRef("sft", 42, 42, 1e-4, 2), c.name: CellRef("sft", 43, 7, 1e-4, 2),
                    nostep.name: CellRef("dpo", 1, 1, 1e-5, None)}
    with pytest.raises(Exception):
        refs[a.name].loss = "x"  # frozen


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ident")
    rng = np.random.default_rng(9)
    return {n: write_adapter(str(root / n), random_factors(rng, 4), r=4, alpha=8)
            for n in ("sft-s42-lr1e-04@4", "sft-i43-d7-lr1e-04@4", "dpo-s42-lr5e-07@4", "by_path")}


def _check_identity(tables, cells):
    for name, table in tables.items():
        assert table.schema.remove_metadata() == TABLES[name]
        for row in table.to_pylist():
            if name == "adapter_modules":
                ref = cells.get(row["adapter"])
                assert tuple(row[k] for k in IDENT) == (tuple(getattr(ref, k) for k in IDENT) if ref else (None,) * 5)
                continue
            for side in "ab":
                ref = cells.get(row[f"adapter_{side}"])
                got = tuple(row[f"{k}_{side}"] for k in IDENT)
                assert got == (tuple(getattr(ref, k) for k in IDENT) if ref else (None,) * 5), (name, row)


def test_identity_columns_in_every_table_and_null_for_paths(folders, tmp_path):
    cells = {n: CellRef(d["loss"], d["init_seed"], d["data_seed"], d["lr"], d["step"])
             for n in folders if (d := describe(n))["loss"]}
    assert len(cells) == 3
    tables = run_geometry(folders, str(tmp_path / "g"), top_k=2, use_ray=False, progress=False, cells=cells)
    for name in ("module_pairs", "layer_pairs", "global_pairs"):
        t = tables[name]
        assert t.schema.field("init_seed_a").type == pa.int64() and t.schema.field("lr_b").type == pa.float64()
    _check_identity(tables, cells)
    g = tables["global_pairs"].to_pylist()
    ctrl = [r for r in g if "sft-i43-d7-lr1e-04@4" in (r["adapter_a"], r["adapter_b"]) and
            "sft-s42-lr1e-04@4" in (r["adapter_a"], r["adapter_b"])][0]
    assert {ctrl["init_seed_a"], ctrl["init_seed_b"]} == {42, 43} and {ctrl["data_seed_a"], ctrl["data_seed_b"]} == {7, 42}
    assert sum(r["loss_a"] is None or r["loss_b"] is None for r in g) == 3  # the adapter given by path
    # without cells (`wsg geometry --adapter`), every identity column is null
    plain = run_geometry(folders, str(tmp_path / "g"), top_k=2, use_ray=False, progress=False)
    _check_identity(plain, {})


def test_identity_does_not_touch_the_cache(folders, tmp_path):
    out = str(tmp_path / "g")
    first = {n: CellRef("sft", 1, 1, 1e-4, 1) for n in folders}
    t1 = run_geometry(folders, out, top_k=2, use_ray=False, progress=False, cells=first)
    cache = os.path.join(out, ".cache", CACHE_VERSION)
    files = sorted(f for f in os.listdir(cache) if f.endswith(".parquet"))
    other = {n: CellRef("dpo", 2, 3, 5e-7, 9) for n in list(folders)[:2]}
    t2 = run_geometry(folders, out, top_k=2, use_ray=False, progress=False, cells=other)
    assert sorted(f for f in os.listdir(cache) if f.endswith(".parquet")) == files  # nothing recomputed
    _check_identity(t2, other)
    for name in t1:  # the numbers are the cached ones
        for col in ("cosine", "fro_norm", "orth_frac_b_off_a", "median_top1_angle_deg"):
            if col in t1[name].column_names:
                assert t1[name].column(col).equals(t2[name].column(col))


def _publish(run, cell, step, folder):
    dest = RunLayout.of(run).cell(cell).step(step)
    os.makedirs(dest)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(folder, f), "rb") as src, open(os.path.join(dest, f), "wb") as dst:
            dst.write(src.read())
    rundir.mark_complete(dest)


def test_control_cells_are_discovered_and_paired_with_matching_seeds(folders, tmp_path):
    run = str(tmp_path / "run")
    src = folders["by_path"]
    for cell in ("sft-s42-lr1e-04", "sft-i43-d42-lr1e-04", "sft-i42-d7-lr1e-04", "rft-s42-lr1e-04",
                 "rft-i42-d7-lr1e-04"):
        _publish(run, cell, 2, src)
    os.makedirs(os.path.join(run, "cells", "not-a-cell"))
    cfg = types.SimpleNamespace(analysis=types.SimpleNamespace(steps="all", extra_adapters={}))
    ads = list_adapters(cfg, run)
    by = {a.cell_id: a for a in ads}
    assert sorted(by) == ["rft-i42-d7-lr1e-04", "rft-s42-lr1e-04", "sft-i42-d7-lr1e-04", "sft-i43-d42-lr1e-04",
                          "sft-s42-lr1e-04"]
    assert (by["sft-i43-d42-lr1e-04"].init_seed, by["sft-i43-d42-lr1e-04"].data_seed) == (43, 42)
    refs = cell_refs(ads)
    assert refs["sft-i42-d7-lr1e-04@2"] == CellRef("sft", 42, 7, 1e-4, 2)
    pairs = reference_pairs(ads, "sft")
    # the primary reference is the plain cell (not a control); controls pair with it;
    # the other loss's control cell meets the reference control with the same seeds
    assert ("sft-s42-lr1e-04@2", "sft-i43-d42-lr1e-04@2") in pairs
    assert ("sft-s42-lr1e-04@2", "sft-i42-d7-lr1e-04@2") in pairs
    assert ("sft-s42-lr1e-04@2", "rft-s42-lr1e-04@2") in pairs
    assert ("sft-i42-d7-lr1e-04@2", "rft-i42-d7-lr1e-04@2") in pairs
    assert len(pairs) == 4
