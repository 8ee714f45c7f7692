"""The grid: loss x seed x LR cells as one Ray Tune experiment (Train V2).

Each Tune trial is a driver *function* that builds and fits the cell's
`TorchTrainer` (Ray 2.60: passing a Trainer to `Tuner` is deprecated). Tune
state lives in `<run>/tune/grid`; an existing sweep is continued with
`Tuner.restore`, and a cell that is already complete returns at once, so a
killed `wsg run` resumes without retraining finished cells. No early-stopping
schedulers: with Train V2 under Tune they leak placement groups.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

from sweep import rundir, telemetry
from sweep.config import ONLINE_LOSSES, ExperimentConfig
from sweep.errors import WsgError


@dataclass(frozen=True)
class Cell:
    loss: str
    seed: int
    lr: float

    @property
    def id(self) -> str:
        from train.cell_id import cell_id
        return cell_id(self.loss, self.seed, self.lr)

    @property
    def online(self) -> bool:
        return self.loss in ONLINE_LOSSES


def plan_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Cells = losses x seeds x LRs with per-loss rules, then extra cells.

    Per-loss rules: an explicit `losses.<name>.lrs` list replaces the grid's
    LRs; otherwise they are scaled by `lr_scale` (the seed's DPO convention,
    §2 Training: 10x smaller). Duplicates (same id) are dropped.
    """
    cells: dict[str, Cell] = {}
    for loss in cfg.grid.losses:
        lc = cfg.loss_cfg(loss)
        lrs = lc.lrs if lc.lrs is not None else [lr * lc.lr_scale for lr in cfg.grid.lrs]
        for seed in cfg.grid.seeds:
            for lr in lrs:
                c = Cell(loss, seed, float(f"{lr:.6g}"))
                cells.setdefault(c.id, c)
    for e in cfg.grid.extra_cells:
        c = Cell(e.loss, e.seed, float(e.lr))
        cells.setdefault(c.id, c)
    return list(cells.values())


def cell_resources(cfg: ExperimentConfig, cell: Cell) -> dict[str, float]:
    """What one running cell holds: its Train workers (+ its vLLM engine if online)."""
    t = cfg.train
    res = {"CPU": t.cpus_per_worker * t.num_workers, "GPU": t.gpus_per_worker * t.num_workers}
    if cell.online:
        res["CPU"] += cfg.online.engine_cpus
        res["GPU"] += cfg.online.engine_gpus
    return res


def max_concurrent(cfg: ExperimentConfig, cells: list[Cell]) -> int:
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


def run_one_cell(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float) -> dict:
    """Train one cell: exactly the function every grid trial calls."""
    if loss in ONLINE_LOSSES:
        from train.online import run_online_cell
        return run_online_cell(cfg, run, loss=loss, seed=seed, lr=lr)
    from train.cell import run_cell
    return run_cell(cfg, run, loss=loss, seed=seed, lr=lr)


def _trial(config: dict) -> None:
    """Tune function trainable: one cell. Records failures in the run dir."""
    from ray import tune

    from sweep.config import parse_config

    cfg = parse_config(config["cfg"])
    run, cell = config["run"], Cell(config["loss"], config["seed"], config["lr"])
    cdir = rundir.cell_dir(run, cell.id)
    try:
        summary = run_one_cell(cfg, run, loss=cell.loss, seed=cell.seed, lr=cell.lr)
    except Exception as err:  # noqa: BLE001 - recorded, then re-raised for Tune
        msg = str(err) if isinstance(err, WsgError) else f"{type(err).__name__}: {err}"
        rundir.write_text(rundir.join(cdir, "FAILED"), msg + "\n\n" + traceback.format_exc())
        telemetry.cell_finished(cell.loss, ok=False)
        raise
    if rundir.exists(rundir.join(cdir, "FAILED")):
        rundir.resolve(cdir)[0].delete_file(rundir.resolve(rundir.join(cdir, "FAILED"))[1])
    telemetry.cell_finished(cell.loss, ok=True)
    tune.report({"done": 1, "skipped": int(bool((summary or {}).get("skipped", False)))})


TRIAL_SLOT = "wsg_trial_slot"


def trial_driver_resources() -> dict[str, float]:
    """What a trial's driver function holds: nothing its cell needs.

    The TorchTrainer and engines of the cell ask for the real CPUs/GPUs. The
    driver itself must hold no CPU, or an online cell whose placement group
    asks for every CPU of a small box could never be placed (deadlock).
    `{"CPU": 0}` alone is refused by Tune (empty bundle), so the driver holds
    a custom `wsg_trial_slot` resource, which `wsg` declares when it starts
    Ray and cluster.yaml declares on the head node. On a cluster without it,
    fall back to a sliver of CPU.
    """
    import ray

    if ray.cluster_resources().get(TRIAL_SLOT, 0) >= 1:
        return {"CPU": 0, TRIAL_SLOT: 1}
    print(f"wsg: warning: the Ray cluster declares no {TRIAL_SLOT!r} resource; trial drivers hold "
          "0.01 CPU each (declare it, e.g. `ray start --resources='{\"wsg_trial_slot\": 1000}'`)",
          flush=True)
    return {"CPU": 0.01}


def _tune_storage(run: str) -> str:
    path = rundir.join(run, "tune")
    return path if not rundir.is_local(path) else rundir.resolve(path)[1]


def run_grid(cfg: ExperimentConfig, run: str) -> dict:
    """Run every incomplete cell; returns counts. Raises if any cell failed."""
    from ray import tune

    cells = plan_cells(cfg)
    todo = [c for c in cells if not rundir.is_complete(rundir.cell_dir(run, c.id))]
    print(f"wsg: grid of {len(cells)} cells, {len(cells) - len(todo)} complete, {len(todo)} to run", flush=True)
    if not todo:
        return {"cells": len(cells), "trained": 0, "failed": 0}
    for c in todo:
        _validate_cell_inputs(cfg, run, c)
    # One grid_search over whole cells keeps (loss, seed, lr) tied together;
    # the config and run travel as constant parameters, so Tune's progress
    # table shows only the cell.
    param_space = {"cell": tune.grid_search([{"loss": c.loss, "seed": c.seed, "lr": c.lr} for c in cells])}

    def trainable(config, cfg_json=None, run_dir=None):
        _trial({"cfg": cfg_json, "run": run_dir, **config["cell"]})

    trainable = tune.with_parameters(trainable, cfg_json=cfg.model_dump(mode="json"), run_dir=run)
    trainable = tune.with_resources(trainable, trial_driver_resources())
    storage, name = _tune_storage(run), "grid"
    exp = os.path.join(storage, name) if rundir.is_local(run) else rundir.join(storage, name)
    run_config = tune.RunConfig(name=name, storage_path=storage,
                                failure_config=tune.FailureConfig(max_failures=1), verbose=1)
    if tune.Tuner.can_restore(exp):
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg, todo),
                                        trial_name_creator=lambda t: _trial_name(t),
                                        trial_dirname_creator=lambda t: _trial_name(t)),
            run_config=run_config)
    results = tuner.fit()
    failed = [c.id for c in cells if not rundir.is_complete(rundir.cell_dir(run, c.id))]
    n_err = sum(1 for r in results if r.error is not None)
    if failed:
        reasons = []
        for cid in failed:
            f = rundir.join(rundir.cell_dir(run, cid), "FAILED")
            why = rundir.read_text(f).splitlines()[0] if rundir.exists(f) else "did not finish"
            reasons.append(f"  {cid}: {why}")
        raise WsgError(f"{len(failed)} cell(s) did not complete (finished ones are kept; rerun the same "
                       "command to retry):\n" + "\n".join(reasons))
    return {"cells": len(cells), "trained": len(todo), "failed": 0, "trial_errors": n_err}


def _trial_name(trial) -> str:
    c = trial.config.get("cell", {})
    try:
        return Cell(c["loss"], c["seed"], c["lr"]).id
    except (KeyError, TypeError):
        return trial.trial_id


def _validate_cell_inputs(cfg: ExperimentConfig, run: str, cell: Cell) -> None:
    """Refuse bad input before any worker starts (the cell's own validator)."""
    if cell.online:
        return
    from train.cell import validate_cell
    validate_cell(cfg, run, loss=cell.loss, seed=cell.seed, lr=cell.lr)
