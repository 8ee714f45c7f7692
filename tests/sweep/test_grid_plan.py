"""Grid planning: per-loss LR rules, extra cells, stable ids, resources."""
from wsg.core.cells import CellKey
from wsg.sweep.config import parse_config
from wsg.sweep.grid import cell_resources, is_online, plan_cells


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
    assert is_online(on) and not is_online(off) and isinstance(on, CellKey)


def test_a_gpu_engine_holds_its_own_resources():
    cfg = parse_config({"grid": {"losses": ["online_grpo"]}, "analysis": {"reference_loss": "online_grpo"},
                        "train": {"cpus_per_worker": 2, "gpus_per_worker": 1},
                        "online": {"engine_cpus": 3, "engine_gpus": 1}})
    (on,) = plan_cells(cfg)
    assert cell_resources(cfg, on) == {"CPU": 5, "GPU": 2}


def test_controls_differ_from_their_grid_cell_in_one_factor():
    cfg = parse_config({"grid": {"losses": ["sft", "dpo"], "seeds": [42], "lrs": [1e-4],
                                 "controls": {"init_seeds": [43], "data_seeds": [7], "lr_factors": [10]}},
                        "losses": {"dpo": {"lr_scale": 0.1}}})
    cells = plan_cells(cfg)
    assert [c.id for c in cells] == ["sft-s42-lr1e-04", "dpo-s42-lr1e-05", "sft-i43-d42-lr1e-04",
                                     "sft-i42-d7-lr1e-04", "sft-s42-lr1e-03"]
    ref = cells[0]
    for c in cells[2:]:
        diff = [f for f in ("loss", "init_seed", "data_seed", "lr") if getattr(c, f) != getattr(ref, f)]
        assert len(diff) == 1
        assert CellKey.parse(c.id) == c
    two = parse_config({"grid": {"losses": ["sft", "dpo"], "controls": {"losses": ["sft", "dpo"],
                                                                         "init_seeds": [1]}}})
    assert {c.id for c in plan_cells(two)} >= {"sft-i1-d42-lr5e-06", "dpo-i1-d42-lr5e-06"}


def test_horizon_control_is_the_same_cell_on_a_shorter_schedule():
    import pytest
    from wsg.core.errors import WsgError

    cfg = parse_config({"grid": {"losses": ["sft", "rft"], "seeds": [42], "lrs": [1e-4],
                                 "controls": {"data_seeds": [7], "horizons": [0.75]}},
                        "train": {"max_steps": 12, "checkpoint_steps": [6, 12]}})
    ids = [c.id for c in plan_cells(cfg)]
    assert ids == ["sft-s42-lr1e-04", "rft-s42-lr1e-04", "sft-i42-d7-lr1e-04", "sft-s42-lr1e-04-h9"]
    h = plan_cells(cfg)[-1]
    assert (h.loss, h.init_seed, h.data_seed, h.lr, h.horizon) == ("sft", 42, 42, 1e-4, 9)
    assert CellKey.parse(h.id) == h and CellKey(**h.as_dict()) == h
    assert "horizon" not in plan_cells(cfg)[0].as_dict()  # other cells' dicts and fingerprints as before
    # Its training config: the schedule ends at 9, checkpoints below it plus 9.
    t = cfg.for_horizon(9).train
    assert (t.max_steps, t.checkpoint_steps) == (9, [6, 9]) and cfg.train.max_steps == 12
    assert cfg.for_horizon(None) is cfg
    with pytest.raises(Exception, match="grid.controls.horizons"):
        parse_config({"grid": {"controls": {"horizons": [1.5]}}})
    with pytest.raises(WsgError):
        CellKey("sft", 1, 1, 1e-4, 0)


def test_shipped_configs_plan_the_same_cells_as_before_plus_only_new_controls():
    """configs/tiny.yaml plans exactly the cells it did (its adapters cannot
    change through the plan); configs/smoke.yaml plans its grid then its controls."""
    from wsg.sweep.config import load_config

    tiny = [c.id for c in plan_cells(load_config("configs/tiny.yaml"))]
    assert tiny == [f"{x}-s42-lr1e-03" for x in ("sft", "rft", "dft", "rift", "offline_grpo")] + [
        "dpo-s42-lr1e-04", "online_grpo-s42-lr1e-03", "online_dapo-s42-lr1e-03"]
    smoke = [c.id for c in plan_cells(load_config("configs/smoke.yaml"))]
    # The default's grid cells, then its four SFT controls (init seed, data order, 10x LR, 0.75x horizon).
    assert smoke == [f"{x}-s42-lr3e-04" for x in ("sft", "rft", "dft", "rift", "offline_grpo")] + [
        "dpo-s42-lr3e-05", "online_grpo-s42-lr3e-04", "online_dapo-s42-lr3e-04",
        "sft-i43-d42-lr3e-04", "sft-i42-d7-lr3e-04", "sft-s42-lr3e-03", "sft-s42-lr3e-04-h9"]


def _makespan(cells, seconds, width, cpus=2, live=2):
    """Tune's start rule, simulated: trials are created in list order, at most
    `live` at once (max_concurrent_trials, pending ones included), and a
    created trial starts when its CPUs are free."""
    t, free, running, queue = 0.0, cpus, [], list(cells)
    pending = []
    while queue or pending or running:
        while queue and len(pending) + len(running) < live:
            pending.append(queue.pop(0))
        while pending and width(pending[0]) <= free:
            c = pending.pop(0)
            free -= width(c)
            running.append((t + seconds(c), c))
        running.sort(key=lambda x: x[0])
        t, c = running.pop(0)
        free += width(c)
    return t


def test_the_grid_starts_wide_cells_then_long_ones_and_finishes_sooner():
    """start_order: online cells (the whole 2-CPU box) first, then offline
    cells longest first. Simulated with the per-step times measured in the
    default's grid (SFT 5.4 s, DPO 14.0 s, online 11.3 s a step, 2 cores), its
    grid ends sooner than in plan order (on a 20-step schedule: 1,164 ->
    1,073 s simulated; 1,201 s measured in plan order)."""
    from wsg.sweep.config import load_config
    from wsg.sweep.grid import start_order

    cfg = load_config("configs/smoke.yaml")
    plan = plan_cells(cfg)
    order = start_order(cfg, plan)
    assert sorted(c.id for c in order) == sorted(c.id for c in plan)
    ids = [c.id for c in order]
    assert ids[:2] == ["online_grpo-s42-lr3e-04", "online_dapo-s42-lr3e-04"]
    assert ids[2] == "dpo-s42-lr3e-05" and ids[-1] == "sft-s42-lr3e-04-h9"
    # Ties keep plan order: the full-schedule 1x cells in the order they were planned.
    assert ids[3:-1] == [c.id for c in plan if c.id not in (ids[:3] + ids[-1:])]

    def steps(c):
        return c.horizon or cfg.train.max_steps

    def seconds(c):
        per = 11.3 if is_online(c) else 14.0 if c.loss == "dpo" else 5.4
        return steps(c) * per

    def width(c):
        return int(cell_resources(cfg, c)["CPU"])

    before, after = _makespan(plan, seconds, width), _makespan(order, seconds, width)
    assert after < before
    # Longest-first never leaves a core idle while a started cell waits: the
    # offline part is balanced to within one cell.
    online = sum(seconds(c) for c in plan if is_online(c))
    offline = sum(seconds(c) for c in plan if not is_online(c))
    assert after <= online + offline / 2 + max(seconds(c) for c in plan if not is_online(c)) / 2


def test_the_start_order_changes_no_cell_of_tiny():
    """tiny's cells start in a new order but are the same cells (their ids
    carry every factor that trains them)."""
    from wsg.sweep.config import load_config
    from wsg.sweep.grid import start_order

    cfg = load_config("configs/tiny.yaml")
    plan = plan_cells(cfg)
    assert {c.id: c for c in start_order(cfg, plan)} == {c.id: c for c in plan}
