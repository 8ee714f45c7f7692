"""Experiment tracking: cells and runs as tracked runs in MLflow, W&B and TensorBoard.

Configured by the `tracking:` section (docs/tracking.md). One tracked run per
cell: its params (loss, variant, seeds, lr, loss hyperparameters, config
hash), every step's metrics row and a final summary. Seeds of one loss sit
together: in MLflow each cell is nested under a run per loss, itself under
the run of the whole wsg run; in W&B the loss is the run's group; TensorBoard
gets one event folder per cell. The run level gets the accuracy table,
global geometry and report as artifacts of that root run.

Each tracker is driven by its own client (core/trackers.py: mlflow's
MlflowClient, torch.utils.tensorboard, wandb), imported only when that
tracker is configured. The ids of a cell's tracked runs live in a small JSON file in the
cell folder, so a cell resumed after a kill continues the same tracked runs.

A tracker must never break training: any error of a tracker is logged once
as a warning and that tracker is switched off for the rest of the cell (or
run); training and the other trackers go on. Tracking never touches the RNG
streams of torch, numpy or `random` (ids come from os.urandom), so it cannot
change a trained adapter.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

from . import rundir
from .config import config_hash
from .config_tracking import MlflowCfg, TrackingCfg, mlflow_store_kind
from .teacher import teacher_identity
from .trackers import (
    Mlflow,
    Named,
    Subject,
    TensorBoard,
    Wandb,
    copy_local,
    sqlite_folder,
)

log = logging.getLogger("wsg.tracking")


@dataclass(frozen=True)
class TrackingPaths:
    """Where a tracked cell (or the run) keeps its files, from core.layout.

    state: JSON file with the tracked runs' ids (a resume continues them);
    tensorboard: this cell's (or the run's) event folder; wandb: W&B's local
    folder (its `dir`). Object-store paths are written locally and uploaded
    on `close`/`flush`."""

    state: str
    tensorboard: str
    wandb: str


# ----------------------------------------------------------------- params

def mlflow_preflight(cfg: MlflowCfg) -> str | None:
    """At run start: None when the MLflow store answers, else what is wrong and the fix.
    A SQLite store is created here, once, before cells open it in parallel."""
    if mlflow_store_kind(cfg.uri) == "sql":
        try:
            if (folder := sqlite_folder(cfg.uri)) is not None:
                os.makedirs(folder, exist_ok=True)
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=cfg.uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - reported, with the fix
            return (f"the MLflow store {cfg.uri} cannot be opened ({type(exc).__name__}: "
                    f"{(str(exc).strip().splitlines() or [''])[0][:300]}); check that its folder is writable")
        return None
    if cfg.uri.lower().startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(cfg.uri.rstrip("/") + "/health", timeout=10).close()
        except Exception as exc:  # noqa: BLE001
            return (f"the MLflow server {cfg.uri} does not answer ({type(exc).__name__}: {exc}); start it "
                    f"(`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) or "
                    "use the local store, tracking.mlflow.uri: sqlite:///<folder>/mlflow.db")
    return None


def cell_params(cfg, key, *, hyper: dict | None = None) -> dict:
    """The params of a cell's tracked run. `cfg`: the ExperimentConfig;
    `key`: its core.cells.CellKey; `hyper`: the loss's resolved
    hyperparameters (defaults included), else the config's `losses.<loss>.hyper`."""

    lcfg, t = cfg.loss_cfg(key.loss), cfg.train
    out = {"loss": key.loss, "variant": lcfg.variant, "init_seed": key.init_seed, "data_seed": key.data_seed,
           "lr": key.lr, "config_hash": config_hash(cfg), "config_name": cfg.name, "model": cfg.model.name,
           "max_steps": t.max_steps, "effective_batch": t.effective_batch, "lora_r": t.lora.r,
           "lora_alpha": t.lora.alpha, "warmup_frac": t.warmup_frac, "weight_decay": t.weight_decay,
           "max_grad_norm": t.max_grad_norm, "precision": t.precision}
    out.update({f"hyper.{k}": v for k, v in sorted((lcfg.hyper if hyper is None else hyper).items())})
    out.update(_teacher_params(cfg))
    return out


def _teacher_params(cfg, profile: dict | None = None) -> dict:
    """The teacher's identity (and, given the rollouts' profile, what it
    produced: accuracy, mixed prompts, text variety), None values left out."""
    return {k: v for k, v in {**teacher_identity(cfg), **(profile or {})}.items() if v is not None}


def run_params(cfg, teacher: dict | None = None) -> dict:
    """The params of the run-level tracked run; `teacher`: the rollouts'
    teacher profile (rollouts.teacher.read_teacher_profile)."""

    g = cfg.grid
    return {"config_name": cfg.name, "config_hash": config_hash(cfg), "model": cfg.model.name,
            "losses": ",".join(g.losses), "seeds": ",".join(map(str, g.seeds)),
            "lrs": ",".join(f"{x:g}" for x in g.lrs), "max_steps": cfg.train.max_steps,
            "rollouts_backend": cfg.rollouts.backend, "data_source": cfg.data.source,
            **_teacher_params(cfg, teacher)}


# ------------------------------------------------------------- the tracker

class Tracker:
    """A cell's (or run's) tracked runs. Methods never raise for a tracker's
    error: the failing tracker is switched off with one warning."""

    def __init__(self, backends: list, label: str = ""):
        self._backends = list(backends)
        self._label = label
        self._last_step = 0

    @property
    def active(self) -> list[str]:
        """Names of the trackers still on."""
        return [b.name for b in self._backends]

    def log(self, row: dict) -> None:
        """One metrics row (the cell's metrics.parquet row: "step" + floats)."""
        if not self._backends:
            return
        step = int(row["step"])
        values = _numbers(row)
        self._last_step = max(self._last_step, step)
        self._each("logging step %d" % step, lambda b: b.log(step, values))

    def flush(self) -> None:
        """Push buffered data (and, for object-store runs, upload local files)."""
        self._each("flushing", lambda b: b.flush())

    def close(self, summary: dict | None = None, *, state: str = "complete") -> None:
        """End the tracked runs: the summary, and a status from `state`
        ("complete", "stopped": resumable, "failed")."""
        flat = _flatten(summary or {})
        self._each("closing", lambda b: b.close(flat, state, self._last_step))
        self._backends = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._backends:
            self.close({}, state="failed" if exc_type else "complete")

    def _each(self, what: str, fn) -> None:
        for b in list(self._backends):
            try:
                fn(b)
            except Exception as exc:  # noqa: BLE001 - a tracker must never break training
                _off(b, self._label, what, exc)
                self._backends.remove(b)


NULL = Tracker([])


def _off(backend, label: str, what: str, exc: BaseException) -> None:
    log.warning("tracking: %s failed while %s for %s (%s: %s); %s tracking is off for it from now on, "
                "training goes on (docs/tracking.md)", backend.name, what, label, type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "", backend.name)
    try:
        backend.abort()
    except Exception:  # noqa: BLE001 - already off
        pass


def _open(tracking: TrackingCfg, subject: Subject, paths: TrackingPaths, label: str) -> Tracker:
    try:
        if rundir.exists(paths.state):
            subject.state = dict(rundir.read_json(paths.state))
    except Exception as exc:  # noqa: BLE001 - unreadable state: start new tracked runs
        log.warning("tracking: cannot read %s (%s); new tracked runs are started", paths.state, exc)
    makers = []
    if tracking.mlflow is not None:
        makers.append(("mlflow", lambda: Mlflow(tracking.mlflow, subject)))
    if tracking.tensorboard:
        makers.append(("tensorboard", lambda: TensorBoard(subject, paths.tensorboard)))
    if tracking.wandb is not None:
        makers.append(("wandb", lambda: Wandb(tracking.wandb, subject, paths.wandb)))
    backends = []
    for name, make in makers:
        try:
            backends.append(make())
        except Exception as exc:  # noqa: BLE001 - a tracker must never break training
            _off(Named(name), label, "starting", exc)
    try:
        rundir.write_json(paths.state, subject.state)
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking: cannot write %s (%s); a resume will start new tracked runs", paths.state, exc)
    return Tracker(backends, label)


def open_cell(tracking: TrackingCfg | None, *, experiment: str, run: str, key, params: dict,
              paths: TrackingPaths, start_step: int = 0) -> Tracker:
    """The tracked runs of one cell (call on rank 0 only; others use NULL).

    experiment: the config's name (MLflow experiment unless tracking.mlflow
    names one); run: the run folder/URI; key: the cell's CellKey; params:
    `cell_params(...)`; start_step: the step training resumes after (0 for a
    fresh cell): rows up to the tracker's last logged step are not repeated."""
    if tracking is None or not tracking.enabled:
        return NULL
    subject = Subject("cell", key.id, key.loss, run, experiment, dict(params), int(start_step))
    return _open(tracking, subject, paths, f"cell {key.id}")


def open_groups(cfg, *, run: str, groups: list[str]) -> None:
    """Before a grid's cells start: the tracked runs they file under (in
    MLflow the run's root and one run per loss), made once by this one
    process. `cfg`: the ExperimentConfig; `run`: the run folder/URI exactly
    as the cells get it. A failure only logs: the cells then make them."""

    if cfg.tracking is None or cfg.tracking.mlflow is None:
        return
    subject = Subject("cell", "", "", run, cfg.name, {"config_hash": config_hash(cfg)})
    try:
        Mlflow.make_containers(cfg.tracking.mlflow, subject, list(groups))
    except Exception as exc:  # noqa: BLE001 - a tracker must never break training
        log.warning("tracking: mlflow: cannot make the run's parent runs (%s); the cells make them", exc)


def track_run(tracking: TrackingCfg | None, *, experiment: str, run: str, params: dict,
              artifacts: dict[str, str], paths: TrackingPaths, summary: dict | None = None) -> list[str]:
    """The run-level tracked run: params, `artifacts` ({name: file or folder
    in the run dir}, e.g. the accuracy table, global geometry, report folder;
    missing ones are skipped) and a summary. Returns the trackers that took
    it. In MLflow this is the root run whose children are the cells."""
    if tracking is None or not tracking.enabled:
        return []

    subject = Subject("run", "", "run", run, experiment, dict(params))
    subject.name = subject.run_name
    tracker = _open(tracking, subject, paths, f"run {subject.run_name}")
    with tempfile.TemporaryDirectory(prefix="wsg-track-art-") as tmp:
        staged = {}
        for name, uri in artifacts.items():
            if rundir.exists(uri):
                staged[name] = copy_local(uri, os.path.join(tmp, name))
            else:
                log.info("tracking: artifact %s (%s) does not exist; not logged", name, uri)
        tracker._each("logging artifacts", lambda b: b.artifacts(staged))
        done = tracker.active
        tracker.close(summary or {}, state="complete")
    return done


# ------------------------------------------------------------------ helpers

def _numbers(row: dict) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or v is None:
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

