"""core.tracking against the real trackers: an MLflow tracking server started
on loopback here (read back with MlflowClient), TensorBoard event files (read
back with TensorBoard's EventAccumulator) and W&B in offline mode (its .wandb
log read back with wandb's own reader, `wandb leet inspect --json`)."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from wsg.core.cells import CellKey
from wsg.core.config import config_hash
from wsg.core.errors import ConfigError
from wsg.core.tracking import (
    NULL,
    TrackingCfg,
    TrackingPaths,
    cell_params,
    open_cell,
    open_groups,
    run_params,
    track_run,
)
from wsg.sweep.config import parse_config

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real MLflow server (sqlite store, proxied artifacts) on loopback; the
    whole process group it started is ended by its pid at the end."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    logf = open(d / "server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")],
        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        # Generous: on a loaded 2-core box the server has taken over 2 minutes to start.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (d / "server.log").read_text()[-3000:])
            try:
                if urllib.request.urlopen(uri + "/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("mlflow server did not come up:\n" + (d / "server.log").read_text()[-3000:])
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        logf.close()


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path, monkeypatch):
    """W&B's own caches and settings go into the test's folder."""
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _cfg():
    return parse_config({"name": "trk", "model": {"name": "tiny-qwen3"}, "grid": {"losses": ["sft", "dpo"]},
                         "losses": {"dpo": {"hyper": {"beta": 0.2}}}, "analysis": {"reference_loss": "sft"}})


def _paths(run: Path, name: str) -> TrackingPaths:
    # The lead's RunLayout names these; any folder of the run serves the tests.
    return TrackingPaths(state=str(run / "cells" / name / "tracking.json"),
                         tensorboard=str(run / "tracking" / "tensorboard" / name),
                         wandb=str(run / "tracking" / "wandb"))


def _rows(seed: int, steps: range) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"step": s, "loss": float(rng.normal()), "grad_norm": float(rng.gamma(2.0)),
             "lr": float(rng.uniform(1e-6, 1e-4)), "tokens": float(rng.integers(100, 500))} for s in steps]


def _inspect(path: Path) -> list[dict]:
    """Records of a .wandb transaction log, through wandb's own reader."""
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(path)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _wandb_history(records: list[dict]) -> dict[int, dict]:
    return {int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"}


# ------------------------------------------------------------------ config

def test_config_section_validates():
    assert not TrackingCfg().enabled
    t = TrackingCfg.model_validate({"mlflow": {"uri": "http://127.0.0.1:5000"}, "tensorboard": True,
                                    "wandb": {"project": "p", "mode": "offline"}})
    assert t.enabled and t.mlflow.experiment is None and t.wandb.mode == "offline"
    for bad in ({"mlflow": {"uri": " "}}, {"wandb": {"project": "p", "mode": "shared"}}, {"tensorbord": True},
                {"mlflow": {"url": "http://x"}}):
        with pytest.raises(Exception):
            TrackingCfg.model_validate(bad)
    with pytest.raises(ConfigError):  # the config itself still refuses unknown keys
        parse_config({"trackin": {}})


def test_disabled_tracking_imports_no_tracker(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from wsg.core.cells import CellKey
        from wsg.core.tracking import NULL, TrackingCfg, TrackingPaths, open_cell, track_run
        p = TrackingPaths({str(tmp_path / 's.json')!r}, {str(tmp_path / 'tb')!r}, {str(tmp_path / 'wb')!r})
        t = open_cell(TrackingCfg(), experiment="e", run={str(tmp_path)!r}, key=CellKey("sft", 1, 1, 1e-4),
                      params={{}}, paths=p)
        t.log({{"step": 1, "loss": 0.5}}); t.close({{}})
        assert t is NULL and track_run(None, experiment="e", run="r", params={{}}, artifacts={{}}, paths=p) == []
        print(sorted(m for m in ("mlflow", "wandb", "tensorboard", "torch") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "tb").exists()


# ------------------------------------------------------------------ MLflow

def test_mlflow_cells_grouped_by_loss_with_params_metrics_summary(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking = TrackingCfg.model_validate({"mlflow": {"uri": mlflow_uri, "experiment": "trk-grid"}})
    cfg = _cfg().model_copy(update={"tracking": tracking})
    run = tmp_path / "trk-run"
    keys = [CellKey(loss, s, s, lr) for loss, lr in (("sft", 1e-4), ("dpo", 1e-5)) for s in (42, 43)]
    rows = {k.id: _rows(sum(map(ord, k.id)), range(1, 6)) for k in keys}
    # The grid's driver makes the root and loss runs once before its cells
    # start (in parallel cells could not agree on them: CI saw a loss run
    # filed under a root that a slower cell then deleted).
    open_groups(cfg, run=str(run), groups=["dpo", "sft"])

    def one(k: CellKey) -> str:  # cells start in parallel, as on Ray
        tr = open_cell(tracking, experiment=cfg.name, run=str(run), key=k, params=cell_params(cfg, k),
                       paths=_paths(run, k.id))
        assert tr.active == ["mlflow"]
        for r in rows[k.id]:
            tr.log(r)
        tr.close({"state": "complete", "step": 5, "wall_s": 1.5, "final": {"loss": rows[k.id][-1]["loss"]}})
        return json.loads((run / "cells" / k.id / "tracking.json").read_text())["mlflow"]["run_id"]

    with ThreadPoolExecutor(4) as pool:
        ids = dict(zip([k.id for k in keys], pool.map(one, keys)))

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("trk-grid")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags["wsg.role"], []).append(r)
    # One root for the wsg run, one run per loss under it, the cells under their loss.
    assert [r.info.run_name for r in by_role["run"]] == ["trk-run"]
    root = by_role["run"][0].info.run_id
    parents = {r.data.tags["wsg.loss"]: r for r in by_role["loss"]}
    assert sorted(parents) == ["dpo", "sft"] and len(by_role["loss"]) == 2
    assert all(p.data.tags["mlflow.parentRunId"] == root for p in parents.values())
    assert all(p.data.tags["wsg.config_hash"] == config_hash(cfg) for p in [*parents.values(), by_role["run"][0]])
    assert len(by_role["cell"]) == 4
    # The cells found their parents: none made a duplicate it had to delete.
    from mlflow.entities import ViewType
    assert c.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY) == []
    for k in keys:
        r = c.get_run(ids[k.id])
        assert r.info.run_name == k.id and r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parents[k.loss].info.run_id
        assert r.data.tags["wsg.state"] == "complete"
        p = r.data.params
        assert (p["loss"], p["init_seed"], p["data_seed"], float(p["lr"])) == (k.loss, str(k.init_seed),
                                                                             str(k.data_seed), k.lr)
        assert p["config_hash"] == config_hash(cfg) and p["variant"] == "None"
        assert ("hyper.beta" in p) == (k.loss == "dpo") and p.get("hyper.beta", "0.2") == "0.2"
        for key in ("loss", "grad_norm", "lr", "tokens"):
            hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, key))
            assert hist == [(row["step"], row[key]) for row in rows[k.id]]
        assert r.data.metrics["summary.wall_s"] == 1.5
        assert r.data.metrics["summary.final.loss"] == rows[k.id][-1]["loss"]
        summ = json.loads(Path(c.download_artifacts(r.info.run_id, "summary.json", str(tmp_path))).read_text())
        assert summ["final.loss"] == rows[k.id][-1]["loss"] and summ["state"] == "complete"
    print("\nMLflow runs of experiment trk-grid:")
    for r in sorted(runs, key=lambda r: (r.data.tags["wsg.role"] != "run", r.info.run_name)):
        print(f"  {r.info.run_name:24s} {r.data.tags['wsg.role']:5s} {r.info.status:9s} "
              f"loss={r.data.metrics.get('loss', float('nan')):+.4f} run_id={r.info.run_id}")


_KILLED = """
import os, sys
from wsg.core.cells import CellKey
from wsg.core.tracking import TrackingCfg, TrackingPaths, open_cell
args = {args}
tr = open_cell(TrackingCfg.model_validate(args["tracking"]), experiment="trk", run=args["run"],
               key=CellKey("sft", 7, 8, 1e-4), params=args["params"], paths=TrackingPaths(**args["paths"]))
assert len(tr.active) == 3, tr.active
for row in args["rows"]:
    tr.log(row)
tr.flush()
# W&B writes its .wandb log every x_transaction_log_flush_interval seconds
# (WANDB__TRANSACTION_LOG_FLUSH_INTERVAL, set short below): wait until it has.
import glob, subprocess, time
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    logs = glob.glob(os.path.join(args["paths"]["wandb"], "wandb", "offline-run-*", "*.wandb"))
    out = subprocess.run([args["wandb"], "leet", "inspect", "--json", logs[0]], capture_output=True, text=True).stdout
    if out.count('"type":"history"') == len(args["rows"]):
        break
    time.sleep(1)
os._exit(9)  # killed: no close, as an OOM kill of the worker
"""


def test_resumed_cell_continues_the_same_tracked_runs(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "resume-run"
    key = CellKey("sft", 7, 8, 1e-4)
    paths = _paths(run, key.id)
    tracking = {"mlflow": {"uri": mlflow_uri}, "tensorboard": True, "wandb": {"project": "wsg-t", "mode": "offline"}}
    params = cell_params(_cfg(), key)
    first = _rows(1, range(1, 5))
    args = {"tracking": tracking, "run": str(run), "params": params, "rows": first, "wandb": str(BIN / "wandb"),
            "paths": {"state": paths.state, "tensorboard": paths.tensorboard, "wandb": paths.wandb}}
    killed = subprocess.run([sys.executable, "-c", _KILLED.format(args=repr(args))], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.5"})
    assert killed.returncode == 9, killed.stderr[-2000:]
    state = json.loads(Path(paths.state).read_text())

    # Resumed from the checkpoint of step 2: steps 3, 4 are trained again
    # (here with other values, to see which ones each tracker keeps).
    second = _rows(2, range(3, 7))
    tr = open_cell(TrackingCfg.model_validate(tracking), experiment="trk", run=str(run), key=key, params=params,
                   paths=paths, start_step=2)
    assert tr.active == ["mlflow", "tensorboard", "wandb"]
    for row in second:
        tr.log(row)
    tr.close({"state": "complete"})
    again = json.loads(Path(paths.state).read_text())
    assert again["mlflow"]["run_id"] == state["mlflow"]["run_id"] and again["wandb"]["id"] == state["wandb"]["id"]

    # MLflow: one run; steps the killed attempt logged are not repeated.
    c = MlflowClient(mlflow_uri)
    r = c.get_run(state["mlflow"]["run_id"])
    assert r.info.status == "FINISHED"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "loss"))
    assert hist == [(x["step"], x["loss"]) for x in first + second[2:]]
    assert len(c.search_runs([r.info.experiment_id], "tags.`wsg.cell` = 'sft-i7-d8-lr1e-04'")) == 1

    # TensorBoard: purge_step hides what the killed attempt wrote after step 2.
    ea = EventAccumulator(paths.tensorboard, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    got = [(e.step, e.value) for e in ea.Scalars("loss")]
    want = [(x["step"], x["loss"]) for x in first[:2] + second]
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)  # stored as float32

    # W&B offline: two offline-run folders of the same run id (wandb sync merges them).
    logs = sorted(Path(paths.wandb).glob(f"wandb/offline-run-*-{state['wandb']['id']}/run-*.wandb"))
    assert len(logs) == 2
    hists = [_wandb_history(_inspect(p)) for p in logs]
    assert sorted(hists[0]) == [1, 2, 3, 4] and sorted(hists[1]) == [3, 4, 5, 6]
    assert hists[1][6]["loss"] == pytest.approx(second[-1]["loss"], rel=1e-12)
    runs = [r["run"] for p in logs for r in _inspect(p) if r["type"] == "run"]
    assert {x["run_id"] for x in runs} == {state["wandb"]["id"]} and runs[1]["resume"] is True


# -------------------------------------------------------------- TensorBoard

def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, key = tmp_path / "tb-run", CellKey("dpo", 5, 5, 3e-6)
    rows = _rows(11, range(1, 9))
    tr = open_cell(TrackingCfg(tensorboard=True), experiment="trk", run=str(run), key=key,
                   params=cell_params(_cfg(), key), paths=_paths(run, key.id))
    for row in rows:
        tr.log(row)
    tr.close({"wall_s": 2.25, "step": 8, "final": {"loss": rows[-1]["loss"]}})
    ea = EventAccumulator(str(run / "tracking" / "tensorboard" / key.id),
                          size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    for name in ("loss", "grad_norm", "lr", "tokens"):
        ev = ea.Scalars(name)
        assert [e.step for e in ev] == list(range(1, 9))
        np.testing.assert_allclose([e.value for e in ev], [r[name] for r in rows], rtol=1e-6)
    assert [(e.step, e.value) for e in ea.Scalars("summary/wall_s")] == [(8, 2.25)]
    text = {t: ea.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in ea.Tags()["tensors"]
            if t.endswith("text_summary")}
    assert "| hyper.beta | 0.2 |" in text["wsg/params/text_summary"]
    assert '"wall_s": 2.25' in text["wsg/summary/text_summary"]
    # The HParams dashboard's records: the experiment and this cell's session.
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(ea.PluginTagToContent("hparams"))


# ------------------------------------------------------------------------ W&B

def test_wandb_offline_run_read_back(tmp_path):
    run, key = tmp_path / "wb-run", CellKey("sft", 3, 3, 2e-5)
    rows = _rows(5, range(1, 5))
    tr = open_cell(TrackingCfg.model_validate({"wandb": {"project": "wsg-t", "mode": "offline"}}),
                   experiment="trk", run=str(run), key=key, params=cell_params(_cfg(), key),
                   paths=_paths(run, key.id))
    for row in rows:
        tr.log(row)
    tr.close({"wall_s": 0.5, "final": {"loss": rows[-1]["loss"]}})
    [log] = list((run / "tracking" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    recs = _inspect(log)
    [info] = [r["run"] for r in recs if r["type"] == "run"]
    assert (info["project"], info["run_group"], info["display_name"], info["job_type"]) == \
        ("wsg-t", "sft", key.id, "cell")
    conf = info["config"]["update"]
    assert (conf["loss"], conf["init_seed"], conf["lr"]) == ("sft", 3, 2e-5)
    hist = _wandb_history(recs)
    assert sorted(hist) == [1, 2, 3, 4]
    for row in rows:
        assert {k: hist[row["step"]][k] for k in ("loss", "grad_norm")} == \
            pytest.approx({k: row[k] for k in ("loss", "grad_norm")}, rel=1e-12)
    summary = {}
    for r in recs:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["wall_s"] == 0.5 and summary["final.loss"] == pytest.approx(rows[-1]["loss"])
    assert [r["exit"]["exit_code"] for r in recs if r["type"] == "exit"] in ([0], [])


# ------------------------------------------------------------- never breaks

def test_tracker_errors_turn_that_tracker_off_once(mlflow_uri, tmp_path, caplog, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    run, key = tmp_path / "err-run", CellKey("sft", 1, 1, 1e-4)
    # A server that is not there: MLflow is off from the start, TensorBoard goes on.
    dead = f"http://127.0.0.1:{_free_port()}"
    with caplog.at_level(logging.WARNING, logger="wsg.tracking"):
        tr = open_cell(TrackingCfg.model_validate({"mlflow": {"uri": dead}, "tensorboard": True}),
                       experiment="trk", run=str(run), key=key, params={"loss": "sft"}, paths=_paths(run, key.id))
        assert tr.active == ["tensorboard"]
        for row in _rows(0, range(1, 4)):
            tr.log(row)
        tr.close({})
    assert len([r for r in caplog.records if "mlflow failed" in r.getMessage()]) == 1
    ea = EventAccumulator(str(run / "tracking" / "tensorboard" / key.id))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]

    # An error in the middle of a cell: its MLflow run is deleted on the server.
    caplog.clear()
    key2 = CellKey("sft", 2, 2, 1e-4)
    with caplog.at_level(logging.WARNING, logger="wsg.tracking"):
        tr = open_cell(TrackingCfg.model_validate({"mlflow": {"uri": mlflow_uri}, "tensorboard": True}),
                       experiment="trk", run=str(run), key=key2, params={"loss": "sft"},
                       paths=_paths(run, key2.id))
        rows = _rows(3, range(1, 6))
        tr.log(rows[0])
        rid = json.loads(Path(_paths(run, key2.id).state).read_text())["mlflow"]["run_id"]
        MlflowClient(mlflow_uri).delete_run(rid)
        for row in rows[1:]:
            tr.log(row)
        assert tr.active == ["tensorboard"]
        tr.close({})
    assert len([r for r in caplog.records if "mlflow failed while logging step 2" in r.getMessage()]) == 1
    assert len(caplog.records) == 1
    ea = EventAccumulator(str(run / "tracking" / "tensorboard" / key2.id))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4, 5]


def test_tracking_leaves_rng_streams_alone(mlflow_uri, tmp_path):
    import random

    import torch

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    run, key = tmp_path / "rng-run", CellKey("sft", 9, 9, 1e-4)
    tr = open_cell(TrackingCfg.model_validate({"mlflow": {"uri": mlflow_uri}, "tensorboard": True,
                                               "wandb": {"project": "wsg-t", "mode": "offline"}}),
                   experiment="trk", run=str(run), key=key, params=cell_params(_cfg(), key),
                   paths=_paths(run, key.id))
    assert len(tr.active) == 3
    for row in _rows(4, range(1, 4)):
        tr.log(row)
    tr.close({"wall_s": 1.0})
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


# ---------------------------------------------------------------- run level

def test_run_level_artifacts(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg()
    run = tmp_path / "art-run"
    tracking = TrackingCfg.model_validate({"mlflow": {"uri": mlflow_uri, "experiment": "trk-art"},
                                           "tensorboard": True, "wandb": {"project": "wsg-t", "mode": "offline"}})
    key = CellKey("sft", 42, 42, 1e-4)
    tr = open_cell(tracking, experiment=cfg.name, run=str(run), key=key, params=cell_params(cfg, key),
                   paths=_paths(run, key.id))
    tr.log(_rows(0, range(1, 2))[0])
    tr.close({})
    rng = np.random.default_rng(7)
    acc = pa.table({"model": ["base", key.id], "eval_set": ["synthetic"] * 2,
                    "accuracy": rng.uniform(0, 1, 2)})
    glob = pa.table({"a": [key.id], "b": ["dpo-s42-lr1e-05"], "cos": rng.uniform(-1, 1, 1)})
    (run / "eval").mkdir(parents=True)
    (run / "geometry").mkdir()
    (run / "report" / "figures").mkdir(parents=True)
    pq.write_table(acc, run / "eval" / "accuracy.parquet")
    pq.write_table(glob, run / "geometry" / "global_pairs.parquet")
    (run / "report" / "index.html").write_text("<html><body>wsg report</body></html>")
    (run / "report" / "figures" / "cos.png").write_bytes(bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    artifacts = {"accuracy.parquet": str(run / "eval" / "accuracy.parquet"),
                 "global_pairs.parquet": str(run / "geometry" / "global_pairs.parquet"),
                 "report": str(run / "report"), "lmc.parquet": str(run / "analysis" / "lmc.parquet")}
    paths = TrackingPaths(state=str(run / "tracking" / "run.json"),
                          tensorboard=str(run / "tracking" / "tensorboard" / "_run"),
                          wandb=str(run / "tracking" / "wandb"))
    done = track_run(tracking, experiment=cfg.name, run=str(run), params=run_params(cfg), artifacts=artifacts,
                     paths=paths, summary={"cells": 1})
    assert done == ["mlflow", "tensorboard", "wandb"]

    c = MlflowClient(mlflow_uri)
    rid = json.loads(Path(paths.state).read_text())["mlflow"]["run_id"]
    cell_rid = json.loads(Path(_paths(run, key.id).state).read_text())["mlflow"]["run_id"]
    parent = c.get_run(c.get_run(cell_rid).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["mlflow.parentRunId"] == rid  # the cells' root is the run-level run
    r = c.get_run(rid)
    assert r.data.params["config_hash"] == config_hash(cfg) and r.data.params["losses"] == "sft,dpo"
    names = sorted(a.path for a in c.list_artifacts(rid)) + sorted(a.path for a in c.list_artifacts(rid, "report"))
    assert names == ["accuracy.parquet", "global_pairs.parquet", "report", "summary.json", "report/figures",
                     "report/index.html"]
    got = pq.read_table(c.download_artifacts(rid, "accuracy.parquet", str(tmp_path)))
    assert got.equals(acc)
    fig = Path(c.download_artifacts(rid, "report/figures/cos.png", str(tmp_path)))
    assert fig.read_bytes() == (run / "report" / "figures" / "cos.png").read_bytes()

    ea = EventAccumulator(paths.tensorboard, size_guidance={"tensors": 0})
    ea.Reload()
    text = ea.Tensors("wsg/accuracy.parquet/text_summary")[0].tensor_proto.string_val[0].decode()
    assert key.id in text and f"{acc['accuracy'][1].as_py():.6g}" in text

    [log] = [p for p in (run / "tracking" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
             if any(r["type"] == "run" and r["run"].get("job_type") == "run" for r in _inspect(p))]
    arts = [r["artifact"] for r in _inspect(log) if r["type"] == "artifact"]
    assert [a["name"] for a in arts] == ["art-run-results"]
    entries = {e["path"] for e in arts[0]["manifest"]["contents"]}
    assert {"accuracy.parquet", "global_pairs.parquet", "report/index.html", "report/figures/cos.png"} == entries


def test_null_tracker_is_inert():
    NULL.log({"step": 1, "loss": 1.0})
    NULL.flush()
    NULL.close({"x": 1})
    assert NULL.active == []


def test_object_store_run_writes_locally_then_uploads(tmp_path, monkeypatch):
    """An s3:// run (moto's S3 server on loopback): TensorBoard and W&B write
    to a local folder, uploaded into the run directory on close."""
    import re

    from _cluster import S3Server
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wsg.core.trackers import copy_local

    s3 = S3Server(tmp_path / "s3").start()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        s3.make_bucket("wsg")
        run, key = "s3://wsg/runs/obj-run", CellKey("sft", 1, 1, 1e-4)
        paths = TrackingPaths(state=f"{run}/cells/{key.id}/tracking.json",
                              tensorboard=f"{run}/tracking/tensorboard/{key.id}", wandb=f"{run}/tracking/wandb")
        rows = _rows(8, range(1, 4))
        tr = open_cell(TrackingCfg.model_validate({"tensorboard": True, "wandb": {"project": "wsg-t",
                                                                                  "mode": "offline"}}),
                       experiment="trk", run=run, key=key, params=cell_params(_cfg(), key), paths=paths)
        assert tr.active == ["tensorboard", "wandb"]
        for row in rows:
            tr.log(row)
        tr.close({"wall_s": 1.0})
        files = s3.files(run)
        assert f"cells/{key.id}/tracking.json" in files
        assert any(f.startswith(f"tracking/tensorboard/{key.id}/events.out.tfevents.") for f in files)
        [wb] = [f for f in files if re.fullmatch(r"tracking/wandb/wandb/offline-run-[^/]+/run-[^/]+\.wandb", f)]

        tb = copy_local(paths.tensorboard, str(tmp_path / "tb"))
        ea = EventAccumulator(tb)
        ea.Reload()
        assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]
        local = copy_local(f"{run}/{wb}", str(tmp_path / "run.wandb"))
        assert sorted(_wandb_history(_inspect(Path(local)))) == [1, 2, 3]
    finally:
        s3.stop()
