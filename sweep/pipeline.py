"""Drive the stages of one run (docs/design.md): rollouts -> grid -> eval ->
functional -> geometry -> report. Every stage is idempotent: it skips what
is complete (its `_COMPLETE` markers) and resumes what is not, so the same
`wsg run` after a crash or a kill picks up where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime

from ..analysis.adapters import adapter_refs, list_adapters
from ..analysis.evaluate import run_eval
from ..analysis.findings_run import run_findings
from ..analysis.functional import run_functional
from ..analysis.geometry import parse_adapter_args, run_geometry
from ..analysis.report import build_report
from ..core import integrity, rundir, tracking
from ..core.cells import CellKey
from ..core.config import ExperimentConfig, config_hash, dump_config
from ..core.console import RunConsole, say
from ..core.errors import WsgError
from ..core.layout import STAGES, RunLayout
from ..core.runlock import RunLock
from ..core.runlock import describe as describe_holder
from ..core.session import dashboard_url, session
from ..rollouts.stage import run_rollouts
from ..rollouts.teacher import read_teacher_profile
from ..train.losses import loss_names
from .config import load_config, parse_config
from .grid import run_grid, run_one_cell


# --- run directory -----------------------------------------------------------
def default_run_dir(cfg: ExperimentConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(cfg.storage.runs_root, f"{cfg.name}-{stamp}-{config_hash(cfg)[:8]}")


def prepare_run(cfg: ExperimentConfig, run: str | None) -> str:
    """Create the run dir (or check an existing one) and write config.yaml.

    An existing run with a different config hash is refused: resuming it with
    another config would mix results (nothing already written is overwritten).
    """
    layout = RunLayout.of(run or default_run_dir(cfg))
    run, cpath, h = layout.root, layout.config, config_hash(cfg)
    if rundir.exists(cpath):
        old = stored_config_hash(layout)
        if old != h:
            raise WsgError(f"{run} already holds a run with config hash {old}, but this config hashes to {h}; "
                           "pass a new --run, or rerun with the config in that run's config.yaml")
    else:
        rundir.makedirs(run)
        rundir.write_text(cpath, dump_config(cfg))
    return run


def stored_config_hash(run: str | RunLayout) -> str | None:
    """The hash in the first line of `<run>/config.yaml` (dump_config writes it)."""
    first = rundir.read_text(RunLayout.of(run).config).splitlines()[0]
    return first.rsplit(" ", 1)[-1] if first.startswith("# wsg resolved config") else None


def load_run_config(run: str) -> ExperimentConfig:
    import yaml

    cpath = RunLayout.of(run).config
    if not rundir.exists(cpath):
        raise WsgError(f"{run} is not a wsg run directory (no config.yaml); start one with `wsg run CONFIG --run {run}`")
    return parse_config(yaml.safe_load(rundir.read_text(cpath)), cpath)


def check_tracking(cfg: ExperimentConfig) -> ExperimentConfig:
    """At run start, say on the terminal when the MLflow store cannot work (and
    the fix), and run without it, rather than one warning per cell in the log."""
    if cfg.tracking.mlflow is None:
        return cfg
    problem = tracking.mlflow_preflight(cfg.tracking.mlflow)
    if problem is None:
        return cfg
    say(f"wsg: tracking: {problem}. MLflow tracking is off for this run; the other trackers go on")
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"mlflow": None})})


# --- stages -------------------------------------------------------------------
def check_cell_args(loss: str, lr: float) -> None:
    if lr <= 0:
        raise WsgError(f"--lr must be > 0, got {lr}")
    if loss not in loss_names():
        raise WsgError(f"--loss {loss!r} is not a known loss; valid: {', '.join(loss_names())}")


def stage_train_one(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float,
                    init_seed: int | None = None, data_seed: int | None = None) -> dict:
    check_cell_args(loss, lr)
    return run_one_cell(cfg, run, CellKey.of(loss, seed, lr, init_seed=init_seed, data_seed=data_seed))


def stage_geometry(cfg: ExperimentConfig, run: str, extra: dict[str, str] | None = None,
                   out: str | None = None, top_k: int | None = None) -> dict:
    """Geometry of every adapter of the run (+ extra ones), with each cell's
    identity in the tables; then, in the run's own geometry folder, the
    findings: noise floors, convergence, the seed paper's claims."""
    layout = RunLayout.of(run)
    found = list_adapters(cfg, layout)
    adapters = {a.name: a.path for a in found}
    for k, v in (extra or {}).items():
        if k in adapters:
            raise WsgError(f"--adapter name {k!r} clashes with a run adapter; choose another name")
        adapters[k] = v
    if len(adapters) < 1:
        raise WsgError(f"{run} has no complete adapters yet; run the grid first (`wsg run`)")
    tables = run_geometry(adapters, out or layout.geometry_dir, top_k=top_k or cfg.analysis.top_k,
                          config_hash=config_hash(cfg), cells=adapter_refs(found),
                          where={a.name: layout.relative(a.uri) for a in found})
    summary = {"adapters": len(adapters), "tables": {k: t.num_rows for k, t in tables.items()}}
    if out is None:
        summary["findings"] = run_findings(cfg, layout)
    return summary



def geometry_command(args) -> int:
    """`wsg geometry`: standalone over --adapter folders, or over a run. As
    every stage command, third-party output goes to the log (`<run>/logs/`,
    standalone `<out>/logs/`) unless --verbose; wsg's own lines stay here."""
    extra = parse_adapter_args(args.adapter) if args.adapter else {}
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.run:
        cfg = load_config_or_run(args.config_opt, args.run)
        with open_console(args.run, verbose=args.verbose), session(address, dashboard=True):
            summary = stage_geometry(cfg, args.run, extra=extra, out=args.out, top_k=args.top_k)
            say(f"wsg: [geometry] {_brief('geometry', summary)}")
            print(summary, flush=True)  # the whole summary, into the log
        return 0
    if not extra:
        raise WsgError("give at least one --adapter NAME=PATH, or --run RUN")
    if not args.out:
        raise WsgError("--out DIR is required with --adapter (where the Parquet tables go)")
    out = rundir.canonical(args.out)
    with open_console(out, verbose=args.verbose), session(address, dashboard=True):
        tables = run_geometry(extra, out, top_k=args.top_k or 10)
        for name, t in tables.items():
            say(f"{name}: {t.num_rows} rows")
        say(f"tables in {out}")
    return 0


def load_config_or_run(path: str | None, run: str) -> ExperimentConfig:
    if path:
        return load_config(path)
    return load_run_config(run)


# --- the whole pipeline --------------------------------------------------------
def open_console(run: str | RunLayout, *, verbose: bool = False) -> RunConsole:
    """Third-party output to `<run>/logs/wsg.log` (uploaded there at the end
    for an object-store run) unless `verbose`."""
    layout = RunLayout.of(run)
    if rundir.is_local(layout.root):
        return RunConsole(rundir.resolve(layout.logs)[1], verbose=verbose)
    return RunConsole(None, verbose=verbose, upload_to=layout.logs)


def _brief(name: str, s: dict) -> str:
    """A stage summary in a few words (the whole one is in the log and in
    `<run>/stages/<stage>/_COMPLETE`)."""
    if not isinstance(s, dict):
        return str(s)
    if name == "rollouts":
        tp = s.get("teacher_profile") or {}
        jac = tp.get("teacher_token_jaccard")
        return (f"{s.get('n_samples')} samples of {s.get('n_prompts')} prompts, reward mean "
                f"{s.get('reward_mean', float('nan')):.3f}, {s.get('n_pairs')} pairs"
                + ("" if jac is None else f"; teacher {tp.get('teacher')}, token overlap within a prompt {jac:.2f}"))
    if name == "grid":
        return f"{s.get('cells')} cells, {s.get('trained')} trained now"
    if name == "eval":
        return f"{s.get('models')} models, {s.get('evaluated')} evaluated now ({s.get('mode')} adapters)"
    if name == "functional":
        return f"{s.get('units')} units ({s.get('computed')} now): LMC, CKA, logit lens"
    if name == "geometry":
        f = s.get("findings") or {}
        claims = ", ".join(f"{n} {v}" for v, n in sorted((f.get("claims") or {}).items()))
        return (f"{s.get('adapters')} adapters, {s.get('tables', {}).get('global_pairs')} pairs; "
                f"{f.get('converged_cells')}/{f.get('cells')} cells converged; {f.get('claims_settled')} of "
                f"{f.get('n_claims')} claims settled; claims: {claims or 'none'}")
    return ", ".join(f"{k}={v}" for k, v in list(s.items())[:6])


def run_all(cfg: ExperimentConfig, run: str | None, *, address: str | None = None, verbose: bool = False) -> int:
    run = prepare_run(cfg, run)
    layout = RunLayout(run)
    with contextlib.ExitStack() as stack:
        stack.enter_context(RunLock(run))  # one writer: a second `wsg run` here exits 2 naming this one
        con = stack.enter_context(open_console(layout, verbose=verbose))
        say(f"wsg: run directory {run} (config hash {config_hash(cfg)})")
        if con.log_path:
            say(f"wsg: third-party output (Ray, vLLM, transformers) goes to {layout.logs}/wsg.log; "
                "--verbose shows it here")
        cfg = check_tracking(cfg)
        stack.enter_context(session(address, dashboard=True))
        if (url := dashboard_url()):
            say(f"wsg: Ray dashboard at http://{url}")
        t0 = time.time()
        # The stages that take the run's layout get this one; the functional
        # stage (its units carry the run folder to Ray workers) and geometry
        # (its messages name the run as given) take the folder.
        steps = [
            ("rollouts", lambda: run_rollouts(cfg, layout)),
            ("grid", lambda: run_grid(cfg, layout)),
            ("eval", lambda: run_eval(cfg, layout)),
            ("functional", lambda: run_functional(cfg, run)),
            ("geometry", lambda: stage_geometry(cfg, run)),
        ]
        remade = False  # a stage made something again: every later one runs (each skips what still holds)
        for name, fn in steps:
            marker = layout.stage_marker_dir(name)
            if name != "grid" and not remade and integrity.revoke(marker, f"[{name}]", run=run):
                say(f"wsg: [{name}] complete, skipped")
                continue
            t = time.time()
            say(f"wsg: [{name}] starting")
            summary = fn()
            remade = remade or (bool(summary.get("trained")) if name == "grid" else not summary.get("skipped"))
            rundir.mark_complete(marker, {"summary": summary, "seconds": round(time.time() - t, 1)},
                                 files=stage_outputs(layout, name), root=run)
            print(f"wsg: [{name}] summary: {summary}", flush=True)  # whole, into the log
            say(f"wsg: [{name}] done in {time.time() - t:.0f}s: {_brief(name, summary)}")
        path = build_report(run)
        if cfg.tracking.enabled:
            took = tracking.track_run(
                cfg.tracking, experiment=cfg.name, run=layout.root, params=tracking.run_params(cfg, read_teacher_profile(cfg, layout)),
                artifacts={"accuracy.parquet": layout.eval_table("accuracy"),
                           "global_pairs.parquet": layout.geometry_table("global_pairs"),
                           "claims.parquet": layout.geometry_table("claims"), "report": layout.report_dir},
                paths=layout.tracking_paths(), summary={"wall_s": round(time.time() - t0, 1)})
            say(f"wsg: tracked in {', '.join(took) or 'no tracker (see the log)'}")
        say(f"wsg: finished in {time.time() - t0:.0f}s")
        say(f"wsg: report: {path}")
    return 0


def stage_outputs(layout: RunLayout, stage: str) -> list[str]:
    """The files a stage's marker vouches for: the top-level files of its
    folder (the grid's cells vouch for themselves)."""
    folder = {"rollouts": layout.rollouts_dir, "eval": layout.eval_dir, "functional": layout.functional_dir,
              "geometry": layout.geometry_dir}.get(stage)
    names = rundir.list_files(folder) if folder else []
    return [rundir.join(folder, n) for n in names if n != rundir.COMPLETE_MARKER]


def status_text(run: str) -> str:
    layout = RunLayout.of(run)
    if not rundir.exists(layout.config):
        raise WsgError(f"{run} is not a wsg run directory (no config.yaml)")
    lines = [f"run {run}"]
    lock = layout.lock
    if rundir.exists(lock):
        try:
            lines.append(f"  being written by {describe_holder(rundir.read_json(lock))}")
        except (ValueError, OSError):
            pass  # a lock half written: nothing to say
    for name in STAGES[:-1]:
        done = rundir.is_complete(layout.stage_marker_dir(name))
        lines.append(f"  {name:<11} {'complete' if done else 'not complete'}")
    lines.append(f"  {'report':<11} {'complete' if rundir.exists(layout.report_index) else 'not complete'}")
    cells = layout.cell_ids()
    if cells:
        lines.append("cells:")
    for c in cells:
        cl = layout.cell(c)
        if rundir.is_complete(cl.root):
            state = "done"
        elif rundir.exists(cl.failed):
            state = "failed: " + rundir.read_text(cl.failed).strip().splitlines()[0][:200]
        else:
            steps = [n for n in rundir.listdir(cl.root) if n.startswith("step_") and n[5:].isdigit()
                     and rundir.is_complete(cl.step(int(n[5:])))]
            state = f"incomplete ({len(steps)} checkpoint(s) written)"
        lines.append(f"  {c:<28} {state}")
    return "\n".join(lines)
