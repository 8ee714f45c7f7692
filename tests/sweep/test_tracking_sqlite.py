"""MLflow's local SQLite store (sqlite:///<folder>/mlflow.db) as wsg's tracker,
read back with MlflowClient; URIs that cannot work are refused at config load
or reported at run start with the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from wsg.core.cells import CellKey
from wsg.core.errors import ConfigError
from wsg.core.tracking import (
    MlflowCfg,
    TrackingPaths,
    mlflow_preflight,
    open_groups,
    track_run,
)
from wsg.sweep.config import parse_config

REPO = Path(__file__).resolve().parents[2]

_CELL = """
import json, sys
from wsg.core.cells import CellKey
from wsg.sweep.config import parse_config
from wsg.core.tracking import TrackingPaths, cell_params, open_cell
a = json.loads(sys.argv[1])
cfg = parse_config(a["cfg"])
k = CellKey.parse(a["cell"])
tr = open_cell(cfg.tracking, experiment=cfg.name, run=a["run"], key=k, params=cell_params(cfg, k),
               paths=TrackingPaths(**a["paths"]))
assert tr.active == ["mlflow"], tr.active
for row in a["rows"]:
    tr.log(row)
tr.close({"state": "complete", "step": len(a["rows"]), "final": {"loss": a["rows"][-1]["loss"]}})
"""


def _cfg(uri: str) -> dict:
    return {"name": "trk-sqlite", "model": {"name": "tiny-qwen3"}, "grid": {"losses": ["sft", "dpo"]},
            "tracking": {"mlflow": {"uri": uri}}}


def test_uris_that_cannot_work_are_refused_at_load(tmp_path, monkeypatch):
    for uri in ("./mlruns", "file:///tmp/mlruns", "mlruns"):
        with pytest.raises(ConfigError, match="file store.*sqlite:///<folder>/mlflow.db"):
            parse_config(_cfg(uri))
    with pytest.raises(ConfigError, match="in-memory SQLite"):
        parse_config(_cfg("sqlite://"))
    # A relative SQLite path is made absolute: cells run in other working directories.
    monkeypatch.chdir(tmp_path)
    assert parse_config(_cfg("sqlite:///sub/mlflow.db")).tracking.mlflow.uri == f"sqlite:///{tmp_path}/sub/mlflow.db"
    assert MlflowCfg(uri="http://127.0.0.1:5000").uri == "http://127.0.0.1:5000"
    # Without SQLAlchemy (mlflow-skinny alone) the error names what to install, at its pin.
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError, match=r"needs SQLAlchemy and alembic \(sqlalchemy is not installed\): "
                                          r"pip install SQLAlchemy==2\.1\.9 alembic==1\.20\.1"):
        parse_config(_cfg(f"sqlite:///{tmp_path}/mlflow.db"))


def test_preflight_reports_what_cannot_work(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "mlflow.db").write_text("not a database")
    got = mlflow_preflight(MlflowCfg(uri=f"sqlite:///{tmp_path}/ro/mlflow.db"))
    assert got and "cannot be opened" in got and str(tmp_path / "ro" / "mlflow.db") in got
    port = __import__("_cluster").free_port()  # nothing listens there
    got = mlflow_preflight(MlflowCfg(uri=f"http://127.0.0.1:{port}"))
    assert got and "does not answer" in got and "sqlite:///<folder>/mlflow.db" in got
    uri = f"sqlite:///{tmp_path}/new/folder/mlflow.db"
    assert mlflow_preflight(MlflowCfg(uri=uri)) is None  # made, folder and tables
    assert (tmp_path / "new" / "folder" / "mlflow.db").stat().st_size > 0


def test_sqlite_store_cells_in_parallel_processes_read_back(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    raw = _cfg(uri)
    cfg = parse_config(raw)
    run = str(tmp_path / "trk-run")
    assert mlflow_preflight(cfg.tracking.mlflow) is None
    open_groups(cfg, run=run, groups=["dpo", "sft"])
    keys = [CellKey(loss, s, s, lr) for loss, lr in (("sft", 1e-4), ("dpo", 1e-5)) for s in (42, 43)]
    rows = {k.id: [{"step": s, "loss": 1.0 / (s + sum(map(ord, k.id)) % 89), "grad_norm": 0.1 * s}
                   for s in range(1, 5)] for k in keys}
    # Four cells, four processes writing to the one SQLite file at once (as a grid's Ray workers do),
    # each in a working directory of its own.
    procs = []
    for k in keys:
        paths = {"state": f"{run}/cells/{k.id}/tracking.json", "tensorboard": f"{run}/tb/{k.id}",
                 "wandb": f"{run}/wandb"}
        cwd = tmp_path / "cwd" / k.id
        cwd.mkdir(parents=True)
        arg = json.dumps({"cfg": raw, "cell": k.id, "run": run, "paths": paths, "rows": rows[k.id]})
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CELL), arg], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        assert "failed while" not in out, out  # no tracker switched itself off
    (tmp_path / "acc.txt").write_text("accuracy table")
    took = track_run(cfg.tracking, experiment=cfg.name, run=run, params={"config_name": cfg.name},
                     artifacts={"accuracy.txt": str(tmp_path / "acc.txt")},
                     paths=TrackingPaths(f"{run}/tracking/run.json", f"{run}/tb/_run", f"{run}/wandb"))
    assert took == ["mlflow"]

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("trk-sqlite")
    # Artifacts next to the store, not in ./mlruns of whichever process made the experiment.
    assert exp.artifact_location == f"file://{tmp_path}/store/mlartifacts"
    assert not any((tmp_path / "cwd" / k.id / "mlruns").exists() for k in keys)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags["wsg.role"], []).append(r)
    assert [r.info.run_name for r in by_role["run"]] == ["trk-run"] and len(by_role["loss"]) == 2
    root = by_role["run"][0]
    losses = {r.data.tags["wsg.loss"]: r.info.run_id for r in by_role["loss"]}
    assert sorted(r.info.run_name for r in by_role["cell"]) == sorted(k.id for k in keys)
    for r in by_role["cell"]:
        k = CellKey.parse(r.info.run_name)
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == losses[k.loss]
        assert float(r.data.params["lr"]) == k.lr and r.data.params["loss"] == k.loss
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "loss"))
        assert hist == [(row["step"], row["loss"]) for row in rows[k.id]]
    assert root.info.status == "FINISHED"
    got = c.download_artifacts(root.info.run_id, "accuracy.txt", str(tmp_path / "dl"))
    assert Path(got).read_text() == "accuracy table"
    print(f"\nMLflow runs read back from {uri}:")
    for r in sorted(runs, key=lambda r: (r.data.tags["wsg.role"] != "run", r.data.tags["wsg.role"], r.info.run_name)):
        print(f"  {r.info.run_name:20s} {r.data.tags['wsg.role']:5s} {r.info.status:9s} "
              f"loss={r.data.metrics.get('loss', float('nan')):+.4f}")


def test_run_start_reports_a_broken_store_once_and_runs_without_it(tmp_path):
    """`check_tracking` (wsg run / wsg train at start): one line on the terminal naming the fix;
    MLflow is dropped from the run's config, so no cell logs the same failure again."""
    bad = tmp_path / "bad.db"
    bad.write_text("not a database")
    code = textwrap.dedent(f"""
        from wsg.sweep.config import parse_config
        from wsg.core.console import RunConsole
        from wsg.sweep.pipeline import check_tracking
        cfg = parse_config({{"name": "t", "model": {{"name": "tiny-qwen3"}}, "tracking": {{"mlflow":
                             {{"uri": "sqlite:///{bad}"}}, "tensorboard": True}}}})
        with RunConsole({str(tmp_path / 'logs')!r}):
            out = check_tracking(cfg)
        print(out.tracking.mlflow, out.tracking.tensorboard)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "None True"
    assert len(lines) == 2 and lines[0].startswith(f"wsg: tracking: the MLflow store sqlite:///{bad} cannot be "
                                                   "opened") and "MLflow tracking is off for this run" in lines[0]
