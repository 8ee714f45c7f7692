"""`wsg.open_run` (analysis/results.py) on a real tiny run, local and on moto's S3 server.

The run is test_report's: real tiny-qwen3 PEFT adapters, geometry, functional and
findings tables from their stages, eval tables from analysis.stats. Every
DataFrame is checked against the Parquet file read directly with pyarrow.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal
from test_report import full_run  # noqa: F401  (the module-scoped run fixture)
from wsg.core import rundir
from wsg.core.config import config_hash

PRESENT = {"claims": "geometry/claims.parquet", "noise_floors": "geometry/noise_floors.parquet",
           "convergence": "geometry/convergence.parquet", "global_pairs": "geometry/global_pairs.parquet",
           "layer_pairs": "geometry/layer_pairs.parquet", "module_pairs": "geometry/module_pairs.parquet",
           "adapter_modules": "geometry/adapter_modules.parquet", "accuracy": "eval/accuracy.parquet",
           "mcnemar": "eval/mcnemar.parquet", "lmc": "analysis/lmc.parquet", "cka": "analysis/cka.parquet",
           "logit_lens": "analysis/logit_lens.parquet"}
CELLS = {"sft-s42-lr1e-04", "sft-s7-lr1e-04", "rft-s42-lr1e-04", "dpo-s42-lr1e-05", "sft-s42-lr1e-03"}


@pytest.fixture(scope="module")
def run_copy(full_run, tmp_path_factory):  # noqa: F811
    """The run plus what the fixture lacks: a stage marker, one cell's spec, metrics and completion, one
    failed cell."""
    cfg, src, _ = full_run
    run = str(tmp_path_factory.mktemp("results") / "run")
    shutil.copytree(src, run)
    rundir.mark_complete(os.path.join(run, "stages", "geometry"), {"summary": {}})
    cell = os.path.join(run, "cells", "dpo-s42-lr1e-05")
    rundir.write_json(os.path.join(cell, "cell.json"), {"loss": "dpo", "variant": "sigmoid", "id": "dpo-s42-lr1e-05"})
    rundir.write_table(os.path.join(cell, "metrics.parquet"),
                       pa.table({"step": [1, 2], "loss": [0.69, 0.61], "lr": [1e-5, 1e-5]}))
    rundir.mark_complete(cell)
    rundir.write_text(os.path.join(run, "cells", "rft-s42-lr1e-04", "FAILED"), "boom: out of memory\nmore\n")
    return cfg, run


def _check(r, run: str, cfg, read) -> None:
    """Every attribute of Run `r` against the files of `run` (read(rel) -> pyarrow table)."""
    from wsg.analysis.results import MissingTable

    assert set(r.tables()) == set(PRESENT)
    for name, rel in PRESENT.items():
        got = getattr(r, name)
        assert len(got) > 0, name
        assert_frame_equal(got, read(rel).to_pandas())
    claims = r.claims
    assert len(claims) >= 19 and set(claims["verdict"]) <= {"holds", "fails", "inconclusive", "unsettled", "not_measured"}
    for name, rel, writer in (("predictions", "eval/predictions.parquet", "eval stage"),
                              ("rollouts", "rollouts/rollouts.parquet", "rollouts stage"),
                              ("pairs", "rollouts/pairs.parquet", "rollouts stage")):
        with pytest.raises(MissingTable, match=rf"{rel} is absent from .*{writer}"):
            getattr(r, name)
    assert r.config == cfg and r.config_hash == config_hash(cfg)

    cells = r.cells.set_index("cell_id")
    assert set(cells.index) == CELLS
    # The fixture leaves an incomplete step_3 (no _COMPLETE marker) in sft-s42-lr1e-04: not an adapter.
    assert all(s == [1, 2] for s in cells["steps"])
    assert cells.loc["dpo-s42-lr1e-05", "state"] == "done" and cells.loc["dpo-s42-lr1e-05", "variant"] == "sigmoid"
    assert cells.loc["rft-s42-lr1e-04", "state"] == "failed: boom: out of memory"
    assert cells.loc["sft-s7-lr1e-04", "state"] == "incomplete (2 checkpoint(s) written)"
    assert cells.loc["sft-s7-lr1e-04", "final_adapter"] == rundir.join(run, "cells", "sft-s7-lr1e-04", "step_2")
    ads = r.adapters
    assert len(ads) == 10 and set(ads["name"]) == {f"{c}@{s}" for c in CELLS for s in (1, 2)}
    for p in ads["path"]:
        assert read(rundir.join(p, "adapter_config.json")[len(run) + 1:], raw=True)
    assert set(ads["name"]) <= set(r.adapter_modules["adapter"])  # the names join the analysis tables
    assert r.adapter("sft-s42-lr1e-04") == rundir.join(run, "cells", "sft-s42-lr1e-04", "step_2")
    with pytest.raises(Exception, match=r"no complete checkpoint at step 3; it has \[1, 2\]"):
        r.adapter("sft-s42-lr1e-04", 3)

    m = r.metrics()
    assert list(m["cell_id"]) == ["dpo-s42-lr1e-05"] * 2 and list(m["loss"]) == [0.69, 0.61]
    with pytest.raises(MissingTable, match="cells/sft-s7-lr1e-04/metrics.parquet is absent"):
        r.metrics("sft-s7-lr1e-04")

    st = r.status
    assert st.stages == {"rollouts": False, "grid": False, "eval": False, "functional": False, "geometry": True}
    assert st.cells == cells["state"].to_dict() and not st.report and not st.complete
    assert "geometry    complete" in str(st)


def test_open_run_local(run_copy):
    import wsg

    cfg, run = run_copy

    def read(rel, raw=False):
        path = os.path.join(run, rel)
        return open(path, "rb").read() if raw else pq.read_table(path)

    r = wsg.open_run(run)
    assert r.path == run and "claims" in repr(r)
    _check(r, run, cfg, read)
    # Relative paths are made absolute, as the CLI does.
    rel = os.path.relpath(run)
    assert wsg.open_run(rel).path == run


def test_open_run_s3(run_copy, s3_bucket):
    import pyarrow.fs as pafs

    import wsg

    cfg, local = run_copy
    s3 = s3_bucket
    uri = "s3://wsg/runs/tiny"
    pafs.copy_files(local, uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.fs())

    def read(rel, raw=False):
        return s3.read(f"{uri}/{rel}") if raw else pq.read_table(f"wsg/runs/tiny/{rel}", filesystem=s3.fs())

    r = wsg.open_run(uri)
    assert r.path == uri
    _check(r, uri, cfg, read)


def test_not_a_run(tmp_path):
    from wsg.core.errors import WsgError

    import wsg

    with pytest.raises(WsgError, match="does not exist"):
        wsg.open_run(str(tmp_path / "nope"))
    with pytest.raises(WsgError, match="no config.yaml"):
        wsg.open_run(str(tmp_path))


def test_import_wsg_stays_light():
    """`import wsg` and `wsg.open_run` pull in neither torch nor Ray (notebooks start fast)."""
    code = ("import sys, wsg; wsg.open_run; import wsg.sweep.cli; "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
