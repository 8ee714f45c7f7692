"""Cells in shared worker processes (train/shared.py): one Tune trial
process trains many cells in turn, with the base model loaded once, and
every cell keeps its own result.

- a cell that fails on a shared worker fails alone: the cells before and
  after it on the same process complete, with adapters byte for byte equal
  to those of the same cells trained alone, each by a fresh Ray Train
  worker group;
- the resume store keeps the last two complete states and offers the last.
"""
from __future__ import annotations

import os
import re

import pytest
from train_fixtures import tiny_cfg, write_run
from wsg.core import rundir
from wsg.core.cells import CellKey
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config

pytestmark = pytest.mark.slow


def _bytes(run: str, cid: str, step: int) -> bytes:
    with open(os.path.join(RunLayout.of(run).cell(cid).step(step), "adapter_model.safetensors"), "rb") as f:
        return f.read()


def test_a_failing_cell_leaves_the_other_cells_of_its_worker_unchanged(tmp_path, tokenizer):
    import ray
    from wsg.sweep.grid import plan_cells, run_grid, shared
    from wsg.train.cell import run_cell

    base = tiny_cfg(max_steps=3, checkpoint_steps=[3], max_failures=0).model_dump(mode="json")
    # sft, then an sft cell whose first step blows the weights up (NaN), then rft: one worker, in turn.
    base["grid"] = {"losses": ["sft"], "seeds": [42], "lrs": [1e-3],
                    "extra_cells": [{"loss": "sft", "seed": 42, "lr": 1e30}, {"loss": "rft", "seed": 42, "lr": 1e-3}]}
    base["resources"] = {"max_concurrent_cells": 1}
    cfg = parse_config(base)
    good = [CellKey.of("sft", 42, 1e-3), CellKey.of("rft", 42, 1e-3)]
    bad = CellKey.of("sft", 42, 1e30)
    assert [c.id for c in plan_cells(cfg)] == [good[0].id, bad.id, good[1].id]
    assert all(shared(cfg, c) for c in plan_cells(cfg))
    grid_run = write_run(str(tmp_path / "grid"), tokenizer)
    alone_run = write_run(str(tmp_path / "alone"), tokenizer)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"wsg_trial_slot": 100})
    try:
        with pytest.raises(WsgError, match=r"(?s)1 cell\(s\) did not complete.*" + re.escape(bad.id)):
            run_grid(cfg, grid_run)
        for key in good:  # the reference: each cell alone, in its own Ray Train worker group
            assert run_cell(cfg, alone_run, key)["shared_worker"] is False
    finally:
        ray.shutdown()
    layout = RunLayout.of(grid_run)
    assert not rundir.is_complete(layout.cell(bad.id).root)
    assert "the loss is NaN" in rundir.read_text(layout.cell(bad.id).failed)
    pid = {k.id: rundir.read_json(layout.cell(k.id).status)["pid"] for k in good + [bad]}
    for key in good:
        done = rundir.read_json(layout.cell(key.id).complete_marker)
        assert done["shared_worker"] is True and done["state"] == "complete"
        assert _bytes(grid_run, key.id, 3) == _bytes(alone_run, key.id, 3), key.id
    # the failing cell ran on the worker process that had trained the first
    # cell (reused, not this test's process); Tune replaced it after the failure
    assert pid[bad.id] == pid[good[0].id] != os.getpid()


def test_resume_store_keeps_the_last_two_complete_states(tmp_path):
    from wsg.train.shared import ResumeStore

    layout = RunLayout.of(str(tmp_path / "run"))
    store = ResumeStore(layout, "sft-s42-lr1e-03")
    with store.latest() as d:
        assert d is None
    for step in (1, 2, 3):
        src = tmp_path / f"src{step}"
        src.mkdir()
        (src / "state.json").write_text(f'{{"step": {step}}}')
        store.save(step, str(src))
    names = sorted(os.listdir(rundir.resolve(store.root)[1]))
    assert names == ["step_00000002", "step_00000003"]
    # a folder without its marker (a save cut short) is not a state
    os.makedirs(os.path.join(rundir.resolve(store.root)[1], "step_00000004"))
    with store.latest() as d:
        assert open(os.path.join(d, "state.json")).read() == '{"step": 3}'
