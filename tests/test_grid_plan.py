"""Grid planning: per-loss LR rules, extra cells, stable ids, resources."""
from sweep.config import parse_config
from sweep.grid import Cell, cell_resources, plan_cells


def test_dpo_convention_explicit_lrs_and_extra_cells():
    cfg = parse_config({
        "grid": {"losses": ["sft", "dpo", "rft"], "seeds": [42, 123], "lrs": [5e-6, 5e-5],
                 "extra_cells": [{"loss": "dpo", "seed": 42, "lr": 5e-6}, {"loss": "sft", "seed": 42, "lr": 5e-6}]},
        "losses": {"dpo": {"lr_scale": 0.1}, "rft": {"lrs": [1e-5]}},
    })
    ids = [c.id for c in plan_cells(cfg)]
    assert ids == [
        "sft-s42-lr5e-06", "sft-s42-lr5e-05", "sft-s123-lr5e-06", "sft-s123-lr5e-05",
        "dpo-s42-lr5e-07", "dpo-s42-lr5e-06", "dpo-s123-lr5e-07", "dpo-s123-lr5e-06",
        "rft-s42-lr1e-05", "rft-s123-lr1e-05",
    ]  # the extra dpo cell at 5e-6 and sft duplicate collapse onto existing ids
    assert len(set(ids)) == len(ids)


def test_extra_cell_adds_lr_matched_dpo():
    cfg = parse_config({"grid": {"losses": ["sft", "dpo"], "lrs": [5e-6],
                                 "extra_cells": [{"loss": "dpo", "seed": 42, "lr": 5e-6}]},
                        "losses": {"dpo": {"lr_scale": 0.1}}})
    assert [c.id for c in plan_cells(cfg)] == ["sft-s42-lr5e-06", "dpo-s42-lr5e-07", "dpo-s42-lr5e-06"]


def test_online_cells_hold_their_engine():
    cfg = parse_config({"grid": {"losses": ["sft", "online_grpo"]},
                        "train": {"cpus_per_worker": 2}, "online": {"engine_cpus": 3}})
    off, on = plan_cells(cfg)
    assert cell_resources(cfg, off)["CPU"] == 2 and cell_resources(cfg, on)["CPU"] == 5
    assert on.online and not off.online and isinstance(on, Cell)
