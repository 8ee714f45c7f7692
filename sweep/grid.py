"""The grid: loss x seed x LR cells (+ control cells) as one Ray Tune experiment (Train V2).

Each Tune trial is a driver *function* that builds and fits the cell's
`TorchTrainer` (Ray 2.60: passing a Trainer to `Tuner` is deprecated). Tune
state lives in `<run>/tune/grid`, started afresh by every grid: the cells'
verified markers say what is left, a cell that is already complete returns at
once and an unfinished one resumes from its Ray Train state, so a killed
`wsg run` resumes without retraining finished cells. No early-stopping
schedulers: with Train V2 under Tune they leak placement groups.
"""
from __future__ import annotations

import os
import traceback

from ..core import console, integrity, rundir, telemetry, tracking
from ..core.cells import CellKey
from ..core.config import ExperimentConfig
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..core.session import placement_groups, remove_placement_groups
from ..train.cell import Prepared, prepare, run_cell
from ..train.losses import get_loss
from ..train.shared import shares_worker
from ..train.task import placement
from .capacity import GroupWait, check_cells_fit, trial_driver_resources


def _rounded(lr: float) -> float:
    return float(f"{lr:.6g}")


def plan_cells(cfg: ExperimentConfig) -> list[CellKey]:
    """Cells = losses x seeds x LRs with per-loss rules, then control cells,
    then extra cells.

    Per-loss rules: an explicit `losses.<name>.lrs` list replaces the grid's
    LRs; otherwise they are scaled by `lr_scale` (the seed's DPO convention,
    §2 Training: 10x smaller). Controls (grid.controls): for each control
    loss and grid cell of it, one cell per other init seed, other data seed
    and LR factor, differing from that cell in that factor only (noise
    floors, docs/findings.md), and one per horizon: the same cell on a
    shorter schedule (the settle rule). Duplicates (same id) are dropped."""
    cells: dict[str, CellKey] = {}

    def add(k: CellKey) -> None:
        cells.setdefault(k.id, k)

    def lrs_of(loss: str) -> list[float]:
        lc = cfg.loss_cfg(loss)
        return [_rounded(x) for x in (lc.lrs if lc.lrs is not None else [lr * lc.lr_scale for lr in cfg.grid.lrs])]

    for loss in cfg.grid.losses:
        for seed in cfg.grid.seeds:
            for lr in lrs_of(loss):
                add(CellKey.of(loss, seed, lr))
    c = cfg.grid.controls
    for loss in cfg.control_losses:
        for seed in cfg.grid.seeds:
            for lr in lrs_of(loss):
                for i in c.init_seeds:
                    add(CellKey.of(loss, seed, lr, init_seed=i))
                for d in c.data_seeds:
                    add(CellKey.of(loss, seed, lr, data_seed=d))
                for f in c.lr_factors:
                    add(CellKey.of(loss, seed, _rounded(lr * f)))
                for h in c.horizons:
                    add(CellKey.of(loss, seed, lr, horizon=cfg.horizon_steps(h)))
    for e in cfg.grid.extra_cells:
        add(CellKey.of(e.loss, e.seed, float(e.lr), init_seed=e.init_seed, data_seed=e.data_seed))
    return list(cells.values())


def is_online(key: CellKey) -> bool:
    return get_loss(key.loss).online


def cell_resources(cfg: ExperimentConfig, cell: CellKey) -> dict[str, float]:
    """What one running cell holds: its Train workers (+ its vLLM engine if online)."""
    p = placement(cfg, online=is_online(cell))
    n = cfg.train.num_workers
    out = {"CPU": p.worker.get("CPU", 0.0) * n, "GPU": p.worker.get("GPU", 0.0) * n}
    for k, v in (p.engine or {}).items():
        out[k] += v
    return out


def cell_demand(cfg: ExperimentConfig, cell: CellKey) -> tuple[dict, int, dict | None]:
    """(worker bundle, number of workers, engine actor's resources or None):
    the placement a running cell asks Ray for (sweep/capacity.py)."""
    p = placement(cfg, online=is_online(cell))
    return dict(p.worker), cfg.train.num_workers, (dict(p.engine) if p.engine else None)


def max_concurrent(cfg: ExperimentConfig, cells: list[CellKey]) -> int:
    import ray

    if cfg.resources.max_concurrent_cells:
        return cfg.resources.max_concurrent_cells
    total = ray.cluster_resources()
    need = [cell_resources(cfg, c) for c in cells] or [{"CPU": 1.0, "GPU": 0.0}]
    cpu = max(r["CPU"] for r in need)
    gpu = max(r["GPU"] for r in need)
    by_cpu = int(total.get("CPU", 1) // cpu) if cpu else len(cells)
    by_gpu = int(total.get("GPU", 0) // gpu) if gpu else len(cells)
    return max(1, min(by_cpu, by_gpu, len(cells)))


def _step_weight(key: CellKey) -> float:
    """A step's cost relative to SFT's: a paired loss runs both completions
    of each pair (2x), and one that reads reference log-probs runs them
    through the frozen model too (about a third of a forward+backward each).
    DPO: 2.67; measured 14.0 s against SFT's 5.4 s a step (2.6x) on 2 cores."""
    spec = get_loss(key.loss)
    w = 2.0 if spec.paired else 1.0
    return w * (4.0 / 3.0) if "ref_logprobs" in spec.needs else w


def start_order(cfg: ExperimentConfig, cells: list[CellKey]) -> list[CellKey]:
    """The order Tune starts the cells in (it starts trials in grid_search
    order): the widest cells first, then the longest, i.e. longest-first list
    scheduling (Graham 1969). In plan order the default's two online cells
    (the whole 2-CPU box each) waited behind DPO, its longest offline cell,
    while one core stood idle for 187 s of a 1,201 s grid (docs/benchmarks.md).
    A wide cell started first never waits for narrow ones to drain a node;
    the longest narrow ones started first leave short ones to even out the
    slots at the end. No cell's result depends on the order: each is trained
    from its own key. Ties keep plan order (a stable sort)."""

    def cost(c: CellKey) -> tuple:
        r = cell_resources(cfg, c)
        steps = c.horizon if c.horizon is not None else cfg.train.max_steps
        return (-r["GPU"], -r["CPU"], -steps * _step_weight(c))

    return sorted(cells, key=cost)


def run_one_cell(cfg: ExperimentConfig, run: str, key: CellKey, prepared: Prepared | None = None) -> dict:
    """Train one cell alone (`wsg train`), as a Ray Train run."""
    return run_cell(cfg, run, key, prepared=prepared)


def shared(cfg: ExperimentConfig, key: CellKey) -> bool:
    """Whether the grid trains `key` in a shared worker process (train/shared.py)."""
    return shares_worker(cfg, online=is_online(key))


def trial_resources(cfg: ExperimentConfig, key: CellKey, driver: dict[str, float] | None) -> dict[str, float]:
    """What a cell's Tune trial holds: the whole cell when it trains in the
    trial's own (shared) process, else only its `driver`
    (trial_driver_resources(), asked once per grid)."""
    if shared(cfg, key):
        return {k: v for k, v in placement(cfg, online=is_online(key)).total.items() if v}
    return dict(driver)


def _trial(cfg: ExperimentConfig, layout: RunLayout, key: CellKey, prepared: Prepared | None) -> None:
    """Tune function trainable: one cell. Records failures in the run dir."""
    from ray import tune

    cl = layout.cell(key.id)
    try:
        summary = run_cell(cfg, layout, key, prepared=prepared, shared=shared(cfg, key))
    except Exception as err:  # noqa: BLE001 - recorded, then re-raised for Tune
        msg = str(err) if isinstance(err, WsgError) else f"{type(err).__name__}: {err}"
        rundir.write_text(cl.failed, msg + "\n\n" + traceback.format_exc())
        telemetry.cell_finished(key.loss, ok=False)
        raise
    if rundir.exists(cl.failed):
        fs, path = rundir.resolve(cl.failed)
        fs.delete_file(path)
    telemetry.cell_finished(key.loss, ok=True)
    tune.report({"done": 1, "skipped": int(bool((summary or {}).get("skipped", False)))})


def _tune_storage(layout: RunLayout) -> str:
    path = layout.tune_dir
    return path if not rundir.is_local(path) else rundir.resolve(path)[1]


def run_grid(cfg: ExperimentConfig, run: str | RunLayout) -> dict:
    """Run every incomplete cell; returns counts. Raises if any cell failed."""
    layout = RunLayout.of(run)
    cells = start_order(cfg, plan_cells(cfg))  # the order Tune starts them in
    # A cell whose marker no longer matches its files (integrity.revoke) runs again.
    todo = [c for c in cells if not integrity.revoke(layout.cell(c.id).root, f"cell {c.id}", run=layout.root)]
    console.say(f"wsg: grid of {len(cells)} cells, {len(cells) - len(todo)} complete, {len(todo)} to run")
    if not todo:
        return {"cells": len(cells), "trained": 0, "failed": 0}
    # A cell no node can ever hold would wait forever: refuse it now, by name.
    check_cells_fit({c.id: cell_demand(cfg, c) for c in todo})
    # Every cell's data, built and validated once per loss before any worker
    # starts (bad input is refused now); the trials use it as it is.
    prepared: dict[str, Prepared] = {}
    for c in todo:
        if c.loss not in prepared:
            prepared[c.loss] = prepare(cfg, layout.root, c)
    # The tracked runs the cells file under, made here once (core/tracking.py).
    tracking.open_groups(cfg, run=layout.root, groups=sorted({c.loss for c in todo}))
    tuner = _tuner(cfg, layout, cells, todo, prepared)
    results = _fit(tuner, layout, todo)
    _raise_failed(layout, cells)
    n_err = sum(1 for r in results if r.error is not None)
    return {"cells": len(cells), "trained": len(todo), "failed": 0, "trial_errors": n_err}


def _tuner(cfg: ExperimentConfig, layout: RunLayout, cells: list[CellKey], todo: list[CellKey],
           prepared: dict[str, Prepared]):
    """The Tune experiment over every cell (a complete cell's trial returns at once)."""
    from ray import tune

    # One grid_search over whole cells keeps (loss, seed, lr) tied together;
    # the config and run travel as constant parameters, so Tune's progress
    # table shows only the cell.
    param_space = {"cell": tune.grid_search([c.as_dict() for c in cells])}

    def trainable(config, cfg=None, layout=None, prepared=None):
        key = CellKey(**config["cell"])
        _trial(cfg, layout, key, prepared.get(key.loss))

    trainable = tune.with_parameters(trainable, cfg=cfg, layout=layout, prepared=prepared)
    driver = trial_driver_resources() if not all(shared(cfg, c) for c in todo) else None
    trainable = tune.with_resources(trainable, lambda config: tune.PlacementGroupFactory(
        [trial_resources(cfg, CellKey(**config["cell"]), driver)]))
    storage, name = _tune_storage(layout), "grid"
    exp = os.path.join(storage, name) if rundir.is_local(layout.root) else rundir.join(storage, name)
    # A shared worker's cell has no Ray Train retries: Tune's are its train.max_failures.
    retries = cfg.train.max_failures if any(shared(cfg, c) for c in todo) else 1
    run_config = tune.RunConfig(name=name, storage_path=storage,
                                failure_config=tune.FailureConfig(max_failures=retries),
                                verbose=1 if console.verbose() else 0)
    # The cells' markers, not Tune's trial states, say what is left: Tune would
    # count the trial of a cell whose marker was voided (integrity.revoke) or
    # removed as done. So a fresh experiment every time: a complete cell's
    # trial returns at once, an unfinished cell resumes from its own Ray Train
    # state (train_state/), as it would under Tune's restore.
    if rundir.exists(exp):
        fs, path = rundir.resolve(exp)
        fs.delete_dir(path)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg, todo), reuse_actors=True,
                                    trial_name_creator=lambda t: _trial_name(t),
                                    trial_dirname_creator=lambda t: _trial_name(t)),
        run_config=run_config)


def _fit(tuner, layout: RunLayout, todo: list[CellKey]):
    """tuner.fit(), watched; placement groups failed cells left are freed."""
    held_before = placement_groups()
    try:
        with console.GridWatch(layout, [c.id for c in todo]), GroupWait(layout, [c.id for c in todo], held_before):
            return tuner.fit()
    finally:
        # No cell runs any more: a placement group the grid made that Ray still
        # holds was left by a failed Ray Train run; free its CPUs for eval.
        freed = remove_placement_groups(placement_groups() - held_before)
        if freed:
            console.say(f"  [grid] freed {freed} placement group(s) left by failed cell attempts")


def _raise_failed(layout: RunLayout, cells: list[CellKey]) -> None:
    """Raise naming every cell that did not complete, with its reason."""
    failed = [c.id for c in cells if not rundir.is_complete(layout.cell(c.id).root)]
    if failed:
        reasons = []
        for cid in failed:
            f = layout.cell(cid).failed
            # the message, not its traceback: a failed write names its file on a later line
            why = rundir.read_text(f).split("\n\n")[0].strip() if rundir.exists(f) else "did not finish"
            reasons.append(f"  {cid}: " + "\n    ".join(why.splitlines()[:8]))
        raise WsgError(f"{len(failed)} cell(s) did not complete (finished ones are kept; rerun the same "
                       "command to retry):\n" + "\n".join(reasons))


def _trial_name(trial) -> str:
    try:
        return CellKey(**trial.config.get("cell", {})).id
    except (TypeError, WsgError):
        return trial.trial_id
