"""A horizon control cell (grid.controls.horizons; analysis/settle.py): the
same cell trained on a shorter schedule that ends at its own last step, on
real Ray Train with tiny-qwen3."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_cfg, write_run
from wsg.core import rundir
from wsg.core.cells import CellKey
from wsg.core.layout import RunLayout
from wsg.train.cell import run_cell

ONE = dict(num_workers=1, per_device_batch=2, grad_accum=2, effective_batch=4, max_steps=4, checkpoint_steps=[2, 4],
           warmup_frac=0.0)


def _weights(run, cid, step):
    return load_file(os.path.join(RunLayout.of(run).cell(cid).step(step), "adapter_model.safetensors"))


@pytest.mark.slow
def test_horizon_cell_ends_its_schedule_at_its_own_last_step(tmp_path, tokenizer, ray_local):
    run = write_run(str(tmp_path / "run"), tokenizer)
    cfg = tiny_cfg(**ONE)
    full = run_cell(cfg, run, CellKey.of("sft", 42, 1e-3))
    short = run_cell(cfg, run, CellKey.of("sft", 42, 1e-3, horizon=3))
    key = CellKey("sft", 42, 42, 1e-3, 3)
    assert short["cell_id"] == key.id == "sft-s42-lr1e-03-h3" and short["max_steps"] == 3 and short["step"] == 3
    assert full["max_steps"] == 4
    cl = RunLayout.of(run).cell(key.id)
    steps = sorted(n for n in rundir.listdir(cl.root) if n.startswith("step_"))
    assert steps == ["step_2", "step_3"]
    # Same init and data order, so step 1's update is the same; the schedule
    # differs (cosine over 3 vs 4 steps), so by step 2 the adapters differ.
    ref2, h2 = _weights(run, CellKey("sft", 42, 42, 1e-3).id, 2), _weights(run, key.id, 2)
    assert ref2.keys() == h2.keys()
    assert any(not torch.equal(ref2[k], h2[k]) for k in ref2)
    assert rundir.read_json(cl.fingerprint)["train"]["max_steps"] == 3
