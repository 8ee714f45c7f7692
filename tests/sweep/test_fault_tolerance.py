"""Fault tolerance of the grid with real Ray on CPU (issue: the sweep).

- a worker crash injected at step k: the cell resumes from its last
  checkpoint and ends with the adapter of an uninterrupted run;
- SIGKILL of `wsg run` mid-grid, then the same command: finished cells are
  untouched, the rest resume, the run completes;
- a node removed mid-run (`ray.cluster_utils.Cluster`): the run completes;
- nothing (placement groups, actors) is left behind after a grid.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from train_fixtures import tiny_cfg, write_run
from wsg.core import rundir
from wsg.core.cells import CellKey
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _adapter(run: str, cid: str, step: int):
    from safetensors.torch import load_file

    return load_file(os.path.join(RunLayout.of(run).cell(cid).step(step), "adapter_model.safetensors"))


def _grid_cfg(losses, **train):
    base = tiny_cfg(**train).model_dump(mode="json")
    base["grid"] = {"losses": losses, "seeds": [42], "lrs": [1e-3]}
    base["losses"] = {"dpo": {"lr_scale": 0.1}}
    return parse_config(base)


def test_worker_crash_resumes_to_the_uninterrupted_adapter(tmp_path, tokenizer, monkeypatch):
    import ray
    import torch
    from wsg.core.cells import cell_id
    from wsg.train.cell import run_cell

    cfg = tiny_cfg(max_steps=4, checkpoint_steps=[2, 4], max_failures=2)
    straight = write_run(str(tmp_path / "straight"), tokenizer)
    crashed = write_run(str(tmp_path / "crashed"), tokenizer)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        run_cell(cfg, straight, CellKey.of("sft", 42, 1e-3))
        monkeypatch.setenv("WSG_FAULT_CRASH_AT_STEP", "3")
        summary = run_cell(cfg, crashed, CellKey.of("sft", 42, 1e-3))
    finally:
        ray.shutdown()
    cid = cell_id("sft", 42, 1e-3)
    # the crash really happened (the worker leaves this marker before exiting)
    assert rundir.exists(rundir.join(RunLayout.of(crashed).cell(cid).root, "_fault_injected"))
    assert summary["state"] == "complete" and summary["step"] == 4
    a, b = _adapter(straight, cid, 4), _adapter(crashed, cid, 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # and training did move the adapter (the comparison is not vacuous)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 0


def _tree_digest(folder: str) -> dict[str, tuple[float, str]]:
    """Every file of a finished cell but the adapters' model cards, which the
    eval stage completes with the measured accuracy (core/adapter_card.py)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == "README.md":
                continue
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest())
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        kids = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [parent, *kids]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(kids, timeout=30)


def test_sigkill_of_wsg_run_then_rerun_completes(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["grid"]["losses"] = ["sft", "rft", "dft", "dpo"]
    cfg["train"]["max_steps"] = 6
    cfg["train"]["checkpoint_steps"] = [2, 4, 6]
    cpath = tmp_path / "tiny4.yaml"
    cpath.write_text(yaml.safe_dump(cfg))
    run = str(tmp_path / "run")
    # a relative --run from another working directory: Tune trials chdir, so
    # the CLI must hand every stage an absolute path
    cmd = [sys.executable, "-m", "wsg.sweep.cli", "run", str(cpath), "--run", "run"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    cells = Path(run) / "cells"
    deadline = time.time() + 900
    done: list[str] = []
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [c.name for c in cells.glob("*") if (c / rundir.COMPLETE_MARKER).exists()] if cells.exists() else []
            if done:
                break
            time.sleep(1)
        assert proc.poll() is None, f"wsg run ended before the kill: {(tmp_path / 'first.log').read_text()[-3000:]}"
        assert done, "no cell completed in time"
    finally:
        _kill_tree(proc)
    assert len(done) < 4, "the kill came after the whole grid finished"
    before = {c: _tree_digest(str(cells / c)) for c in done}

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for c, digest in before.items():
        after = _tree_digest(str(cells / c))
        assert {k: v for k, v in after.items() if k in digest} == digest, f"finished cell {c} was rewritten"
    complete = sorted(c.name for c in cells.glob("*") if (c / rundir.COMPLETE_MARKER).exists())
    assert len(complete) == 4
    assert (Path(run) / "report" / "index.html").exists()
    assert (Path(run) / "geometry" / "global_pairs.parquet").exists()


def test_node_removed_mid_run_the_grid_completes(tmp_path, tokenizer):
    import ray
    from ray.cluster_utils import Cluster
    from wsg.sweep.grid import plan_cells, run_grid

    cfg = _grid_cfg(["sft", "rft", "dft"], max_steps=6, checkpoint_steps=[2, 4, 6], max_failures=3)
    cfg.resources.max_concurrent_cells = 2
    run = write_run(str(tmp_path / "run"), tokenizer)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"wsg_trial_slot": 100}})
    doomed = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    result: dict = {}

    def go():
        try:
            result["summary"] = run_grid(cfg, run)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assert below
            result["error"] = err

    th = threading.Thread(target=go)
    try:
        th.start()
        state = Path(run) / "train_state"
        deadline = time.time() + 300
        while time.time() < deadline and not any(state.glob("*/checkpoint_*")) and not any(state.glob("*/resume/step_*")) and th.is_alive():
            time.sleep(0.5)
        cluster.remove_node(doomed)  # a node (and whatever ran there) disappears
        cluster.add_node(num_cpus=2)  # the autoscaler's replacement
        th.join(timeout=1200)
        assert not th.is_alive(), "grid did not finish"
        assert "error" not in result, result.get("error")
        for c in plan_cells(cfg):
            assert rundir.is_complete(RunLayout.of(run).cell(c.id).root), c.id
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_grid_leaves_no_placement_groups_or_actors(tmp_path, tokenizer):
    import ray
    from ray.util.state import list_actors, list_placement_groups
    from wsg.sweep.grid import run_grid

    cfg = _grid_cfg(["sft", "dpo"], max_steps=2, checkpoint_steps=[2])
    run = write_run(str(tmp_path / "run"), tokenizer)
    ray.init(address="local", num_cpus=2, include_dashboard=True, resources={"wsg_trial_slot": 100})
    try:
        summary = run_grid(cfg, run)
        assert summary["trained"] == 2 and summary["failed"] == 0
        time.sleep(2)  # state API is eventually consistent
        addr = ray.get_runtime_context().gcs_address  # explicit: other Ray instances may run here
        pgs = [p for p in list_placement_groups(address=addr, limit=1000) if p.state != "REMOVED"]
        alive = list_actors(address=addr, filters=[("state", "=", "ALIVE")], limit=1000)
        # Ray Train V2 keeps one detached, cluster-wide coordinator of its own
        # for the session's lifetime; it is Ray's, not a leak of the grid's.
        alive = [a for a in alive if a.class_name != "_AutoscalingCoordinatorActor"]
        assert pgs == [], pgs
        assert alive == [], [(a.class_name, a.name) for a in alive]
        again = run_grid(cfg, run)  # a complete grid is a no-op
        assert again["trained"] == 0
    finally:
        ray.shutdown()
