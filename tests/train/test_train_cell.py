"""Training cells on real Ray Train (Train V2), tiny-qwen3 on CPU.

One module-scoped run trains every offline loss with 2 workers; the other
tests compare against it: a second identical run (bitwise), a 1-worker run
stopped half-way and resumed (same global batch, so equal to tolerance),
DeepSpeed ZeRO-3 (equal to tolerance), and a diverging LR (stops naming
the step).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_cfg, write_run
from wsg.core import rundir
from wsg.core.cells import CellKey, cell_id
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.train.cell import run_cell
from wsg.train.losses import loss_names

LR, SEED = 1e-3, 42
TWO = dict(num_workers=2, per_device_batch=2, grad_accum=1, effective_batch=4, max_steps=4, checkpoint_steps=[2, 4],
           warmup_frac=0.0, max_failures=1)


def _cfg(**kw):
    return tiny_cfg(**{**TWO, **kw})


def _adapter(run, loss, step, lr=LR):
    folder = RunLayout.of(run).cell(cell_id(loss, SEED, lr)).step(step)
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, ray_local):
    """Every offline loss, 2 workers, 4 steps: {loss: summary}."""
    run = write_run(str(tmp_path_factory.mktemp("all_losses")), tokenizer)
    return run, {loss: run_cell(_cfg(), run, CellKey.of(loss, SEED, LR)) for loss in loss_names(online=False)}


@pytest.mark.parametrize("loss", loss_names(online=False))
def test_every_offline_loss_trains_and_writes_reloadable_adapters(trained, loss):
    from peft import PeftModel
    from wsg.core.models import load_causal_lm

    run, summaries = trained
    s = summaries[loss]
    cid = cell_id(loss, SEED, LR)
    assert s["state"] == "complete" and s["step"] == 4 and rundir.is_complete(RunLayout.of(run).cell(cid).root)
    # The attempt's placement group is on record (train/cell.py frees it if a run fails).
    assert len(rundir.read_json(RunLayout.of(run).cell(cid).placement_group)["id"]) == 36
    metrics = rundir.read_table(RunLayout.of(run).cell(cid).metrics).to_pandas()
    assert metrics.step.tolist() == [1, 2, 3, 4]
    assert np.isfinite(metrics[["loss", "grad_norm", "lr", "tokens_per_s"]].to_numpy()).all()
    # Cosine schedule, no warmup (transformers' formula written out).
    np.testing.assert_allclose(metrics.lr, [LR * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], rtol=1e-6)
    assert any(c.startswith("loss_") for c in metrics.columns)  # the loss's own statistics
    base_ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = load_causal_lm("tiny-qwen3")
    with torch.no_grad():
        base_logits = base(input_ids=base_ids).logits
    for step in (2, 4):
        folder = RunLayout.of(run).cell(cid).step(step)
        assert sorted(os.listdir(folder)) == ["README.md", "_COMPLETE", "adapter_config.json", "adapter_model.safetensors"]
        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert len(saved) == 2 * 4 * 2  # (A, B) x q,k,v,o x 2 layers
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
        model = PeftModel.from_pretrained(load_causal_lm("tiny-qwen3"), folder)
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        for k, v in saved.items():
            torch.testing.assert_close(loaded[k.replace(".weight", ".default.weight")], v)
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=base_ids).logits, base_logits)
    again = run_cell(_cfg(), run, CellKey.of(loss, SEED, LR))  # complete: skipped, nothing retrained
    assert again["skipped"] is True and again["cell_id"] == cid


def test_same_seed_twice_gives_identical_adapters(trained, tmp_path, tokenizer):
    run_a, _ = trained
    run_b = write_run(str(tmp_path), tokenizer)
    run_cell(_cfg(), run_b, CellKey.of("sft", SEED, LR))
    for step in (2, 4):
        a, b = _adapter(run_a, "sft", step), _adapter(run_b, "sft", step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_on_one_worker_equals_straight_run_on_two(trained, tmp_path, tokenizer):
    """2 steps, stop, resume 2 more on 1 worker (2 micro-batches per step)
    equals 4 straight steps on 2 workers: same global batches, one
    normaliser per step, optimizer/schedule/RNG state restored."""
    run_a, _ = trained
    run_c = write_run(str(tmp_path), tokenizer)
    one = dict(num_workers=1, per_device_batch=2, grad_accum=2)
    first = run_cell(_cfg(**one), run_c, CellKey.of("dpo", SEED, LR), stop_after=2)
    cdir = RunLayout.of(run_c).cell(cell_id("dpo", SEED, LR)).root
    assert first["state"] == "stopped" and first["step"] == 2 and not rundir.is_complete(cdir)
    with pytest.raises(WsgError, match="different training config"):
        run_cell(_cfg(**one, weight_decay=0.5), run_c, CellKey.of("dpo", SEED, LR))
    second = run_cell(_cfg(**one), run_c, CellKey.of("dpo", SEED, LR))
    assert second["state"] == "complete" and rundir.is_complete(cdir)
    for step in (2, 4):
        _close(_adapter(run_c, "dpo", step), _adapter(run_a, "dpo", step), atol=1e-6)
    ma = rundir.read_table(RunLayout.of(run_a).cell(cell_id("dpo", SEED, LR)).metrics)
    mc = rundir.read_table(rundir.join(cdir, "metrics.parquet"))
    assert mc.column("step").to_pylist() == [1, 2, 3, 4]
    np.testing.assert_allclose(mc.column("loss").to_numpy(), ma.column("loss").to_numpy(), rtol=1e-5)


def test_deepspeed_zero3_matches_ddp(trained, tmp_path, tokenizer):
    run_a, _ = trained
    run_e = write_run(str(tmp_path), tokenizer)
    s = run_cell(_cfg(deepspeed={"enabled": True, "zero_stage": 3}), run_e, CellKey.of("dpo", SEED, LR))
    assert s["deepspeed_stage"] == 3 and s["state"] == "complete"
    for step in (2, 4):
        _close(_adapter(run_e, "dpo", step), _adapter(run_a, "dpo", step), atol=1e-6)


def test_diverging_loss_stops_the_cell_naming_the_step(tmp_path, tokenizer, ray_local):
    run = write_run(str(tmp_path), tokenizer)
    cfg = tiny_cfg(num_workers=1, per_device_batch=2, grad_accum=2, effective_batch=4, max_steps=4,
                   checkpoint_steps=[2, 4], warmup_frac=0.0)
    with pytest.raises(WsgError, match="loss is NaN at step 2"):
        run_cell(cfg, run, CellKey.of("sft", SEED, 1e30))  # step 1 blows the weights up
    cdir = RunLayout.of(run).cell(cell_id("sft", SEED, 1e30)).root
    assert not rundir.is_complete(cdir) and not rundir.exists(RunLayout.of(run).cell(cell_id("sft", SEED, 1e30)).step(2))
    steps = rundir.read_table(rundir.join(cdir, "metrics.parquet")).column("step").to_pylist()
    assert steps == [1, 2]


def test_a_failed_runs_placement_group_is_freed(tmp_path, ray_local):
    """A placement group named in placement_group.json that Ray still holds is
    removed (Ray Train leaves one behind when its controller fails on an
    error it does not retry); a removed or missing one is left alone."""
    from ray.util.placement_group import placement_group, placement_group_table
    from wsg.core.session import placement_groups, remove_placement_groups
    from wsg.train.cell import free_placement_group

    record = str(tmp_path / "placement_group.json")
    assert not free_placement_group(record)  # no record
    before = placement_groups()
    pg = placement_group([{"CPU": 1}])
    ray_local.get(pg.ready(), timeout=60)
    rundir.write_json(record, {"id": pg.id.hex()})
    assert placement_group_table(pg)["state"] == "CREATED" and placement_groups() - before == {pg.id.hex()}
    assert free_placement_group(record)
    assert placement_group_table(pg)["state"] == "REMOVED" and placement_groups() == before
    assert not free_placement_group(record)
    # What the grid does when it ends: groups it made that are still held go.
    other = placement_group([{"CPU": 1}])
    ray_local.get(other.ready(), timeout=60)
    assert remove_placement_groups(placement_groups() - before) == 1 and placement_groups() == before
