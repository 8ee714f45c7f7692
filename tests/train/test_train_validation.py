"""Bad input is refused by `run_cell` before Ray or any worker starts."""
from __future__ import annotations

import pytest
from train_fixtures import tiny_cfg, write_run
from wsg.core import rundir
from wsg.core.cells import CellKey
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.rollouts.schema import pairs_table
from wsg.train.cell import run_cell
from wsg.train.steps import build_policy


@pytest.fixture(autouse=True)
def no_ray():
    import ray

    if ray.is_initialized():  # left up by an earlier module (tests/train_fixtures.py)
        ray.shutdown()
    yield
    assert not ray.is_initialized(), "validation must fail before Ray starts"


def test_rft_without_positive_rollouts(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer, all_wrong=True)
    with pytest.raises(WsgError, match="no positive rollouts.*RFT trains only on positives"):
        run_cell(tiny_cfg(), run, CellKey.of("rft", 1, 1e-4))


def test_dpo_without_pairs(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer)
    rundir.write_table(RunLayout.of(run).pairs, pairs_table([]))
    for loss in ("dpo", "ipo", "simpo"):
        with pytest.raises(WsgError, match="pairs.parquet has no \\(chosen, rejected\\) pairs"):
            run_cell(tiny_cfg(), run, CellKey.of(loss, 1, 1e-4))


def test_checkpoint_step_beyond_last_step(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer)
    cfg = tiny_cfg()
    # model_copy skips pydantic's validators, as a programmatic caller might.
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_steps": [1, 5]})})
    with pytest.raises(WsgError, match=r"checkpoint_steps \[5\] lie beyond the last step \(train.max_steps=2\)"):
        run_cell(cfg, run, CellKey.of("sft", 1, 1e-4))


@pytest.mark.parametrize("lr", [0.0, -1e-5, float("nan")])
def test_non_positive_learning_rate(tmp_path, tokenizer, lr):
    run = write_run(str(tmp_path), tokenizer)
    with pytest.raises(WsgError, match="learning rate must be a finite number > 0"):
        run_cell(tiny_cfg(), run, CellKey.of("sft", 1, lr))


def test_unknown_loss_or_an_online_cell_that_cannot_run(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer)
    with pytest.raises(WsgError, match="num_workers=2: an online cell trains on one worker"):
        run_cell(tiny_cfg(num_workers=2, per_device_batch=1, grad_accum=2), run, CellKey.of("online_grpo", 1, 1e-4))
    with pytest.raises(WsgError, match="valid losses: sft, rft"):
        run_cell(tiny_cfg(), run, CellKey.of("ppo", 1, 1e-4))


def test_seed_alone_fixes_the_lora_init():
    cfg = tiny_cfg()
    a, b, c = (dict(build_policy(cfg, seed=s).named_parameters()) for s in (7, 7, 8))
    lora_a = [n for n in a if "lora_A" in n]
    assert lora_a and all(bool((a[n] == b[n]).all()) for n in lora_a)
    assert all(not bool((a[n] == c[n]).all()) for n in lora_a)
