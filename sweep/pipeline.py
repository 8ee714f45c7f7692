"""Drive the stages of one run (DESIGN.md architecture): rollouts -> grid ->
eval -> functional -> geometry -> report. Every stage is idempotent: it skips
what is complete (its `_COMPLETE` markers) and resumes what is not, so the
same `wsg run` after a crash or a kill picks up where it stopped.
"""
from __future__ import annotations

import importlib
import os
import time
from datetime import datetime

from sweep import rundir
from sweep.config import ExperimentConfig, config_hash, dump_config
from sweep.errors import StageNotBuilt, WsgError


def _stage(module: str, func: str):
    """Import a stage lazily, so `wsg --help` and config tools stay fast."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith(module.split(".")[0]) and module.startswith(err.name):
            raise StageNotBuilt(f"stage {module} is not built in this version of wsg") from None
        raise
    if not hasattr(mod, func):
        raise StageNotBuilt(f"stage {module}.{func} is not built in this version of wsg")
    return getattr(mod, func)


# --- run directory -----------------------------------------------------------
def default_run_dir(cfg: ExperimentConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(cfg.storage.runs_root, f"{cfg.name}-{stamp}-{config_hash(cfg)[:8]}")


def prepare_run(cfg: ExperimentConfig, run: str | None) -> str:
    """Create the run dir (or check an existing one) and write config.yaml.

    An existing run with a different config hash is refused: resuming it with
    another config would mix results (nothing already written is overwritten).
    """
    run = rundir.canonical(run or default_run_dir(cfg))
    h = config_hash(cfg)
    cpath = rundir.config_path(run)
    if rundir.exists(cpath):
        first = rundir.read_text(cpath).splitlines()[0]
        old = first.rsplit(" ", 1)[-1] if first.startswith("# wsg resolved config") else None
        if old != h:
            raise WsgError(f"{run} already holds a run with config hash {old}, but this config hashes to {h}; "
                           "pass a new --run, or rerun with the config in that run's config.yaml")
    else:
        rundir.makedirs(run)
        rundir.write_text(cpath, dump_config(cfg))
    return run


def load_run_config(run: str) -> ExperimentConfig:
    from sweep.config import parse_config
    import yaml

    cpath = rundir.config_path(run)
    if not rundir.exists(cpath):
        raise WsgError(f"{run} is not a wsg run directory (no config.yaml); start one with `wsg run CONFIG --run {run}`")
    return parse_config(yaml.safe_load(rundir.read_text(cpath)), cpath)


def ensure_ray(address: str | None = None) -> None:
    """Join a cluster when an address is given, else start a local instance with the dashboard."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # wsg_trial_slot: what grid trial drivers hold instead of CPU (sweep/grid.py).
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 resources={"wsg_trial_slot": 1000})


# --- stages -------------------------------------------------------------------
def stage_rollouts(cfg: ExperimentConfig, run: str) -> dict:
    return _stage("rollouts.stage", "run_rollouts")(cfg, run)


def check_cell_args(loss: str, lr: float) -> None:
    from sweep.config import ALL_LOSSES
    if lr <= 0:
        raise WsgError(f"--lr must be > 0, got {lr}")
    if loss not in ALL_LOSSES:
        raise WsgError(f"--loss {loss!r} is not a known loss; valid: {', '.join(ALL_LOSSES)}")


def stage_train_one(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float) -> dict:
    check_cell_args(loss, lr)
    return _stage("sweep.grid", "run_one_cell")(cfg, run, loss=loss, seed=seed, lr=lr)


def stage_grid(cfg: ExperimentConfig, run: str) -> dict:
    return _stage("sweep.grid", "run_grid")(cfg, run)


def stage_eval(cfg: ExperimentConfig, run: str) -> dict:
    return _stage("analysis.evaluate", "run_eval")(cfg, run)


def stage_functional(cfg: ExperimentConfig, run: str) -> dict:
    return _stage("analysis.functional", "run_functional")(cfg, run)


def run_adapters(cfg: ExperimentConfig, run: str) -> dict[str, str]:
    """name -> local folder of every complete cell x checkpoint (+ extra adapters)."""
    return _stage("analysis.adapters", "discover_adapters")(cfg, run)


def stage_geometry(cfg: ExperimentConfig, run: str, extra: dict[str, str] | None = None,
                   out: str | None = None, top_k: int | None = None) -> dict:
    adapters = dict(run_adapters(cfg, run))
    for k, v in (extra or {}).items():
        if k in adapters:
            raise WsgError(f"--adapter name {k!r} clashes with a run adapter; choose another name")
        adapters[k] = v
    if len(adapters) < 1:
        raise WsgError(f"{run} has no complete adapters yet; run the grid first (`wsg run`)")
    run_geometry = _stage("analysis.geometry", "run_geometry")
    tables = run_geometry(adapters, out or rundir.geometry_dir(run), top_k=top_k or cfg.analysis.top_k,
                          config_hash=config_hash(cfg))
    return {"adapters": len(adapters), "tables": {k: t.num_rows for k, t in tables.items()}}


def stage_report(run: str) -> str:
    return _stage("analysis.report", "build_report")(run)


def geometry_command(args) -> int:
    """`wsg geometry`: standalone over --adapter folders, or over a run."""
    parse = _stage("analysis.geometry", "parse_adapter_args")
    extra = parse(args.adapter) if args.adapter else {}
    if args.run:
        cfg = load_config_or_run(args.config_opt, args.run)
        ensure_ray(args.address or os.environ.get("RAY_ADDRESS"))
        print(stage_geometry(cfg, args.run, extra=extra, out=args.out, top_k=args.top_k))
        return 0
    if not extra:
        raise WsgError("give at least one --adapter NAME=PATH, or --run RUN")
    if not args.out:
        raise WsgError("--out DIR is required with --adapter (where the Parquet tables go)")
    ensure_ray(args.address or os.environ.get("RAY_ADDRESS"))
    run_geometry = _stage("analysis.geometry", "run_geometry")
    tables = run_geometry(extra, args.out, top_k=args.top_k or 10)
    for name, t in tables.items():
        print(f"{name}: {t.num_rows} rows")
    print(f"tables in {args.out}")
    return 0


def load_config_or_run(path: str | None, run: str) -> ExperimentConfig:
    if path:
        from sweep.config import load_config
        return load_config(path)
    return load_run_config(run)


# --- the whole pipeline --------------------------------------------------------
STAGES = ("rollouts", "grid", "eval", "functional", "geometry", "report")


def run_all(cfg: ExperimentConfig, run: str | None, *, address: str | None = None) -> int:
    run = prepare_run(cfg, run)
    print(f"wsg: run directory {run} (config hash {config_hash(cfg)})", flush=True)
    ensure_ray(address)
    t0 = time.time()
    steps = [
        ("rollouts", lambda: stage_rollouts(cfg, run)),
        ("grid", lambda: stage_grid(cfg, run)),
        ("eval", lambda: stage_eval(cfg, run)),
        ("functional", lambda: stage_functional(cfg, run)),
        ("geometry", lambda: stage_geometry(cfg, run)),
    ]
    for name, fn in steps:
        marker = rundir.join(run, "stages", name)
        if rundir.is_complete(marker) and name != "grid":
            print(f"wsg: [{name}] complete, skipped", flush=True)
            continue
        t = time.time()
        print(f"wsg: [{name}] starting", flush=True)
        summary = fn()
        rundir.mark_complete(marker, {"summary": summary, "seconds": round(time.time() - t, 1)})
        print(f"wsg: [{name}] done in {time.time() - t:.0f}s: {summary}", flush=True)
    path = stage_report(run)
    print(f"wsg: finished in {time.time() - t0:.0f}s", flush=True)
    print(f"wsg: report: {path}", flush=True)
    return 0


def status_text(run: str) -> str:
    if not rundir.exists(rundir.config_path(run)):
        raise WsgError(f"{run} is not a wsg run directory (no config.yaml)")
    lines = [f"run {run}"]
    for name in STAGES[:-1]:
        done = rundir.is_complete(rundir.join(run, "stages", name))
        lines.append(f"  {name:<11} {'complete' if done else 'not complete'}")
    report = rundir.join(rundir.report_dir(run), "index.html")
    lines.append(f"  {'report':<11} {'complete' if rundir.exists(report) else 'not complete'}")
    cells = rundir.listdir(rundir.join(run, "cells"))
    if cells:
        lines.append("cells:")
    for c in cells:
        cd = rundir.cell_dir(run, c)
        if rundir.is_complete(cd):
            state = "done"
        elif rundir.exists(rundir.join(cd, "FAILED")):
            state = "failed: " + rundir.read_text(rundir.join(cd, "FAILED")).strip().splitlines()[0][:200]
        else:
            steps = [s for s in rundir.listdir(cd) if s.startswith("step_") and rundir.is_complete(rundir.join(cd, s))]
            state = f"incomplete ({len(steps)} checkpoint(s) written)"
        lines.append(f"  {c:<28} {state}")
    return "\n".join(lines)
