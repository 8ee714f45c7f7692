"""Cell identity in every geometry table (issue 13 item 4): cell ids read by
core.cells.CellKey (both forms), AdapterRef/adapter_refs, identity columns per row
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
    adapter_refs,
    cell_of,
    list_adapters,
    reference_pairs,
    step_of,
)
from wsg.analysis.geometry import CACHE_VERSION, run_geometry
from wsg.analysis.geometry_tables import TABLES
from wsg.core import rundir
from wsg.core.cells import AdapterRef, CellKey
from wsg.core.layout import RunLayout

IDENT = ("loss", "init_seed", "data_seed", "lr", "step")


def test_cell_of_reads_both_cell_id_forms():
    c = cell_of("sft-s42-lr1e-04@12")
    assert (c.loss, c.seed, c.init_seed, c.data_seed, c.lr, step_of("sft-s42-lr1e-04@12")) == \
        ("sft", 42, 42, 42, 1e-4, 12)
    c = cell_of("rift-i43-d7-lr5e-07@3")
    assert (c.loss, c.init_seed, c.data_seed, c.lr, c.id) == ("rift", 43, 7, 5e-7, "rift-i43-d7-lr5e-07")
    assert cell_of("my_adapter") is None and step_of("my_adapter") == -1


def test_adapter_refs():
    a = Adapter(name="sft-s42-lr1e-04@2", path="", uri="", step=2, cell=CellKey.of("sft", 42, 1e-4))
    c = Adapter(name="sft-i43-d7-lr1e-04@2", path="", uri="", step=2, cell=CellKey("sft", 43, 7, 1e-4))
    extra = Adapter(name="copy", path="", uri="", step=-1)
    nostep = Adapter(name="dpo-s1-lr1e-05", path="", uri="", step=-1, cell=CellKey.of("dpo", 1, 1e-5))
    horizon = Adapter(name="sft-s42-lr1e-04-h9@9", path="", uri="", step=9,
                      cell=CellKey.of("sft", 42, 1e-4, horizon=9))
    refs = adapter_refs([a, c, extra, nostep, horizon])
    assert refs == {a.name: AdapterRef(CellKey("sft", 42, 42, 1e-4), 2),
                    c.name: AdapterRef(CellKey("sft", 43, 7, 1e-4), 2),
                    nostep.name: AdapterRef(CellKey("dpo", 1, 1, 1e-5), None)}
    assert refs[nostep.name].name == "dpo-s1-lr1e-05"
    with pytest.raises(Exception):
        refs[a.name].step = 3  # frozen


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ident")
    rng = np.random.default_rng(9)
    return {n: write_adapter(str(root / n), random_factors(rng, 4), r=4, alpha=8)
            for n in ("sft-s42-lr1e-04@4", "sft-i43-d7-lr1e-04@4", "dpo-s42-lr5e-07@4", "by_path")}


def _columns(ref):
    """The identity columns an AdapterRef gives a row (nulls for none)."""
    if ref is None:
        return (None,) * 5
    return ref.cell.loss, ref.cell.init_seed, ref.cell.data_seed, ref.cell.lr, ref.step


def _check_identity(tables, cells):
    for name, table in tables.items():
        assert table.schema.remove_metadata() == TABLES[name]
        for row in table.to_pylist():
            if name == "adapter_modules":
                ref = cells.get(row["adapter"])
                assert tuple(row[k] for k in IDENT) == _columns(ref)
                continue
            for side in "ab":
                ref = cells.get(row[f"adapter_{side}"])
                got = tuple(row[f"{k}_{side}"] for k in IDENT)
                assert got == _columns(ref), (name, row)


def test_identity_columns_in_every_table_and_null_for_paths(folders, tmp_path):
    cells = {n: AdapterRef(c, step_of(n), n) for n in folders if (c := cell_of(n)) is not None}
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
    first = {n: AdapterRef(CellKey("sft", 1, 1, 1e-4), 1, n) for n in folders}
    t1 = run_geometry(folders, out, top_k=2, use_ray=False, progress=False, cells=first)
    cache = os.path.join(out, ".cache", CACHE_VERSION)
    files = sorted(f for f in os.listdir(cache) if f.endswith(".parquet"))
    other = {n: AdapterRef(CellKey("dpo", 2, 3, 5e-7), 9, n) for n in list(folders)[:2]}
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
    by = {a.cell.id: a for a in ads if a.cell is not None}
    assert sorted(by) == ["rft-i42-d7-lr1e-04", "rft-s42-lr1e-04", "sft-i42-d7-lr1e-04", "sft-i43-d42-lr1e-04",
                          "sft-s42-lr1e-04"]
    assert (by["sft-i43-d42-lr1e-04"].cell.init_seed, by["sft-i43-d42-lr1e-04"].cell.data_seed) == (43, 42)
    refs = adapter_refs(ads)
    assert refs["sft-i42-d7-lr1e-04@2"] == AdapterRef(CellKey("sft", 42, 7, 1e-4), 2)
    pairs = reference_pairs(ads, "sft")
    # the primary reference is the plain cell (not a control); controls pair with it;
    # the other loss's control cell meets the reference control with the same seeds
    assert ("sft-s42-lr1e-04@2", "sft-i43-d42-lr1e-04@2") in pairs
    assert ("sft-s42-lr1e-04@2", "sft-i42-d7-lr1e-04@2") in pairs
    assert ("sft-s42-lr1e-04@2", "rft-s42-lr1e-04@2") in pairs
    assert ("sft-i42-d7-lr1e-04@2", "rft-i42-d7-lr1e-04@2") in pairs
    assert len(pairs) == 4
