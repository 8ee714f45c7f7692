"""Experiment tracking: cells and runs as tracked runs in MLflow, W&B and TensorBoard.

Configured by the `tracking:` section (docs/tracking.md). One tracked run per
cell: its params (loss, variant, seeds, lr, loss hyperparameters, config
hash), every step's metrics row and a final summary. Seeds of one loss sit
together: in MLflow each cell is nested under a run per loss, itself under
the run of the whole wsg run; in W&B the loss is the run's group; TensorBoard
gets one event folder per cell. The run level gets the accuracy table,
global geometry and report as artifacts of that root run.

Each tracker is driven by its own client (mlflow's MlflowClient,
torch.utils.tensorboard, wandb); nothing is imported unless the tracker is
configured. The ids of a cell's tracked runs live in a small JSON file in the
cell folder, so a cell resumed after a kill continues the same tracked runs.

A tracker must never break training: any error of a tracker is logged once
as a warning and that tracker is switched off for the rest of the cell (or
run); training and the other trackers go on. Tracking never touches the RNG
streams of torch, numpy or `random` (ids come from os.urandom), so it cannot
change a trained adapter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger("wsg.tracking")

# MLflow's HTTP client retries 7 times with exponential backoff (minutes of
# stalled training when the server hangs); wsg's defaults, unless the user
# set these variables, give up after 3 tries of 60 s and switch MLflow off.
# Its client also prints a "View run" URL line per finished run (console noise).
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_STATUS = {"complete": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
# Rows of a table shown as text in TensorBoard (the file itself is the artifact).
_TEXT_ROWS = 50


# ----------------------------------------------------------------- config

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MlflowCfg(_Strict):
    # A tracking server (http://host:5000) or any MLflow tracking URI.
    uri: str
    # Experiment name; None = the config's `name`.
    experiment: Optional[str] = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("tracking.mlflow.uri is empty: give the server, e.g. http://127.0.0.1:5000")
        return v


class WandbCfg(_Strict):
    project: str = Field(min_length=1)
    mode: Literal["online", "offline"] = "online"
    entity: Optional[str] = None


class TrackingCfg(_Strict):
    """`tracking:` of the experiment config; every tracker is off by default."""

    mlflow: Optional[MlflowCfg] = None
    tensorboard: bool = False
    wandb: Optional[WandbCfg] = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard or self.wandb is not None


@dataclass(frozen=True)
class TrackingPaths:
    """Where a tracked cell (or the run) keeps its files, from sweep.layout.

    state: JSON file with the tracked runs' ids (a resume continues them);
    tensorboard: this cell's (or the run's) event folder; wandb: W&B's local
    folder (its `dir`). Object-store paths are written locally and uploaded
    on `close`/`flush`."""

    state: str
    tensorboard: str
    wandb: str


# ----------------------------------------------------------------- params

def cell_params(cfg, key, *, hyper: dict | None = None) -> dict:
    """The params of a cell's tracked run. `cfg`: the ExperimentConfig;
    `key`: its sweep.cells.CellKey; `hyper`: the loss's resolved
    hyperparameters (defaults included), else the config's `losses.<loss>.hyper`."""
    from sweep.config import config_hash

    lcfg, t = cfg.loss_cfg(key.loss), cfg.train
    out = {"loss": key.loss, "variant": lcfg.variant, "init_seed": key.init_seed, "data_seed": key.data_seed,
           "lr": key.lr, "config_hash": config_hash(cfg), "config_name": cfg.name, "model": cfg.model.name,
           "max_steps": t.max_steps, "effective_batch": t.effective_batch, "lora_r": t.lora.r,
           "lora_alpha": t.lora.alpha, "warmup_frac": t.warmup_frac, "weight_decay": t.weight_decay,
           "max_grad_norm": t.max_grad_norm, "precision": t.precision}
    out.update({f"hyper.{k}": v for k, v in sorted((lcfg.hyper if hyper is None else hyper).items())})
    return out


def run_params(cfg) -> dict:
    """The params of the run-level tracked run."""
    from sweep.config import config_hash

    g = cfg.grid
    return {"config_name": cfg.name, "config_hash": config_hash(cfg), "model": cfg.model.name,
            "losses": ",".join(g.losses), "seeds": ",".join(map(str, g.seeds)),
            "lrs": ",".join(f"{x:g}" for x in g.lrs), "max_steps": cfg.train.max_steps,
            "rollouts_backend": cfg.rollouts.backend, "data_source": cfg.data.source}


# ------------------------------------------------------------- the tracker

@dataclass
class _Subject:
    """What is tracked: a cell (name = cell id, group = loss) or the run."""

    kind: Literal["cell", "run"]
    name: str
    group: str
    run: str                 # the run folder or URI
    experiment: str
    params: dict
    start_step: int = 0
    state: dict = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.run.rstrip("/").rsplit("/", 1)[-1]

    @property
    def run_key(self) -> str:
        """Tag value naming the run in filters (a path may hold quotes)."""
        return hashlib.sha256(self.run.encode()).hexdigest()[:16]


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


def _open(tracking: TrackingCfg, subject: _Subject, paths: TrackingPaths, label: str) -> Tracker:
    from sweep import rundir

    try:
        if rundir.exists(paths.state):
            subject.state = dict(rundir.read_json(paths.state))
    except Exception as exc:  # noqa: BLE001 - unreadable state: start new tracked runs
        log.warning("tracking: cannot read %s (%s); new tracked runs are started", paths.state, exc)
    makers = []
    if tracking.mlflow is not None:
        makers.append(("mlflow", lambda: _Mlflow(tracking.mlflow, subject)))
    if tracking.tensorboard:
        makers.append(("tensorboard", lambda: _TensorBoard(subject, paths.tensorboard)))
    if tracking.wandb is not None:
        makers.append(("wandb", lambda: _Wandb(tracking.wandb, subject, paths.wandb)))
    backends = []
    for name, make in makers:
        try:
            backends.append(make())
        except Exception as exc:  # noqa: BLE001 - a tracker must never break training
            _off(_Named(name), label, "starting", exc)
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
    subject = _Subject("cell", key.id, key.loss, run, experiment, dict(params), int(start_step))
    return _open(tracking, subject, paths, f"cell {key.id}")


def track_run(tracking: TrackingCfg | None, *, experiment: str, run: str, params: dict,
              artifacts: dict[str, str], paths: TrackingPaths, summary: dict | None = None) -> list[str]:
    """The run-level tracked run: params, `artifacts` ({name: file or folder
    in the run dir}, e.g. the accuracy table, global geometry, report folder;
    missing ones are skipped) and a summary. Returns the trackers that took
    it. In MLflow this is the root run whose children are the cells."""
    if tracking is None or not tracking.enabled:
        return []
    from sweep import rundir

    subject = _Subject("run", "", "run", run, experiment, dict(params))
    subject.name = subject.run_name
    tracker = _open(tracking, subject, paths, f"run {subject.run_name}")
    with tempfile.TemporaryDirectory(prefix="wsg-track-art-") as tmp:
        staged = {}
        for name, uri in artifacts.items():
            if rundir.exists(uri):
                staged[name] = _copy_local(uri, os.path.join(tmp, name))
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


def _scalar(v: Any):
    """A param value every tracker takes (TensorBoard hparams: bool/number/str)."""
    if v is None:
        return "None"
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)


def _new_id() -> str:
    return secrets.token_hex(4)  # os.urandom: no RNG stream is advanced


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _copy_local(uri: str, dest: str) -> str:
    """Copy a run-dir file or folder (local or object store) to `dest`."""
    import pyarrow.fs as pafs

    from sweep import rundir

    fs, path = rundir.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if f.type == pafs.FileType.File:
                target = os.path.join(dest, os.path.relpath(f.path, path))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with fs.open_input_stream(f.path) as src, open(target, "wb") as out:
                    out.write(src.read())
    else:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as out:
            out.write(rundir.read_bytes(uri))
    return dest


class _Mirror:
    """A tracker's local folder: the run-dir folder itself, or for an
    object-store run a temporary folder uploaded by `upload()`."""

    def __init__(self, uri: str):
        from sweep import rundir

        self.remote = None if rundir.is_local(uri) else uri
        self.local = rundir.resolve(uri)[1] if self.remote is None else tempfile.mkdtemp(prefix="wsg-track-")
        os.makedirs(self.local, exist_ok=True)

    def upload(self) -> None:
        if self.remote is None:
            return
        from sweep import rundir

        for root, _dirs, files in os.walk(self.local):
            for name in files:
                p = os.path.join(root, name)
                rel = os.path.relpath(p, self.local).replace(os.sep, "/")
                with open(p, "rb") as f:
                    rundir.write_bytes(rundir.join(self.remote, rel), f.read())

    def cleanup(self) -> None:
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


class _Named:
    def __init__(self, name: str):
        self.name = name

    def abort(self) -> None:
        pass


# ------------------------------------------------------------------- MLflow

class _Mlflow:
    """MlflowClient. Hierarchy: run root (tag wsg.role=run) > one run per
    loss (wsg.role=loss) > cells (wsg.role=cell), linked by mlflow.parentRunId."""

    name = "mlflow"

    def __init__(self, cfg: MlflowCfg, s: _Subject):
        for k, v in _MLFLOW_ENV.items():
            os.environ.setdefault(k, v)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.c, self.s = MlflowClient(tracking_uri=cfg.uri), s
        self.exp_id = self._experiment(cfg.experiment or s.experiment)
        saved = s.state.get("mlflow") or {}
        self.run_id, self.last_step = None, 0
        if saved.get("uri") == cfg.uri and saved.get("run_id"):
            try:
                r = self.c.get_run(saved["run_id"])
                if r.info.lifecycle_stage == "active":
                    self.run_id = r.info.run_id
                    self.last_step = self._last_step(r)
            except MlflowException:
                pass  # deleted or another server: a new tracked run
        if self.run_id is not None:
            self.c.update_run(self.run_id, status="RUNNING")
        elif s.kind == "run":
            self.run_id = self._container("run", s.run_name, None)
        else:
            root = self._container("run", s.run_name, None)
            parent = self._container("loss", s.group, root)
            self.run_id = self.c.create_run(self.exp_id, run_name=s.name, tags={
                **self._tags("cell"), "mlflow.parentRunId": parent, "wsg.cell": s.name}).info.run_id
        self._params(s.params)  # only those not there yet: a resume re-logs none
        s.state["mlflow"] = {"uri": cfg.uri, "experiment_id": self.exp_id, "run_id": self.run_id}

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.c.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.c.create_experiment(name)
            except MlflowException:  # another cell created it meanwhile
                exp = self.c.get_experiment_by_name(name)
                if exp is None:
                    raise
        return exp.experiment_id

    def _tags(self, role: str) -> dict:
        return {"wsg.role": role, "wsg.run": self.s.run_name, "wsg.run_key": self.s.run_key,
                "wsg.loss": self.s.group if role != "run" else "", "wsg.config_hash":
                str(self.s.params.get("config_hash", ""))}

    def _container(self, role: str, name: str, parent: str | None) -> str:
        """The run of this wsg run (role "run") or of one loss ("loss"), made
        once. Cells start in parallel processes: each may create one, then
        all agree on the oldest and the others delete their own."""
        filt = f"tags.`wsg.role` = '{role}' and tags.`wsg.run_key` = '{self.s.run_key}'"
        if role == "loss":
            filt += f" and tags.`wsg.loss` = '{self.s.group}'"
        found = self._oldest(filt)
        if found is not None:
            return found
        tags = self._tags(role)
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        mine = self.c.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
        self.c.set_terminated(mine, "FINISHED")
        winner = self._oldest(filt) or mine
        if winner != mine:
            self.c.delete_run(mine)
        return winner

    def _oldest(self, filt: str) -> str | None:
        runs = self.c.search_runs([self.exp_id], filter_string=filt, max_results=100)
        if not runs:
            return None
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

    def _last_step(self, r) -> int:
        keys = sorted(r.data.metrics)
        if not keys:
            return 0
        key = "loss" if "loss" in keys else keys[0]
        return max((m.step for m in self.c.get_metric_history(r.info.run_id, key)), default=0)

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        have = self.c.get_run(self.run_id).data.params
        new = [Param(k, str(_scalar(v))[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's per-request limit
            self.c.log_batch(self.run_id, params=new[i:i + 100])

    def log(self, step: int, values: dict) -> None:
        if step <= self.last_step or not values:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def artifacts(self, staged: dict) -> None:
        for name, path in staged.items():
            if os.path.isdir(path):
                self.c.log_artifacts(self.run_id, path, artifact_path=name)
            else:
                self.c.log_artifact(self.run_id, path)

    def flush(self) -> None:
        pass

    def close(self, summary: dict, state: str, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        nums = [Metric(f"summary.{k}", float(v), ts, step) for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if nums:
            self.c.log_batch(self.run_id, metrics=nums)
        if summary:
            self.c.log_dict(self.run_id, summary, "summary.json")
        self.c.set_tag(self.run_id, "wsg.state", state)
        self.c.set_terminated(self.run_id, _STATUS.get(state, "FINISHED"))

    def abort(self) -> None:
        pass


# -------------------------------------------------------------- TensorBoard

class _TensorBoard:
    """torch.utils.tensorboard's SummaryWriter, one event folder per cell.
    A resumed cell writes with purge_step, so TensorBoard hides the events a
    killed attempt logged after the checkpoint it resumes from."""

    name = "tensorboard"

    def __init__(self, s: _Subject, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.s, self.mirror = s, _Mirror(folder)
        purge = s.start_step + 1 if s.start_step > 0 else None
        self.w = SummaryWriter(log_dir=self.mirror.local, purge_step=purge)
        if s.start_step == 0:
            self.w.add_text("wsg/params", _md_table([{"param": k, "value": _scalar(v)}
                                                     for k, v in s.params.items()]), 0)

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def artifacts(self, staged: dict) -> None:
        """Tables as text (their files are the other trackers' artifacts)."""
        import pyarrow.parquet as pq

        for name, path in staged.items():
            if path.endswith(".parquet") and os.path.isfile(path):
                rows = pq.read_table(path).slice(0, _TEXT_ROWS).to_pylist()
                self.w.add_text(f"wsg/{name}", _md_table(rows), 0)
            else:
                self.w.add_text(f"wsg/{name}", f"`{name}`: see the run directory", 0)

    def flush(self) -> None:
        self.w.flush()
        self.mirror.upload()

    def close(self, summary: dict, state: str, step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"summary/{k}": float(v) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        # The HParams dashboard: this cell's params next to its summary numbers.
        exp, ssi, sei = hparams({k: _scalar(v) for k, v in self.s.params.items()}, metrics)
        fw = self.w._get_file_writer()
        for summ in (exp, ssi, sei):
            fw.add_summary(summ)
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.w.add_text("wsg/summary", "```\n" + json.dumps({**summary, "state": state}, indent=1,
                                                             default=str) + "\n```", step)
        self.w.close()
        self.mirror.upload()
        self.mirror.cleanup()

    def abort(self) -> None:
        self.w.close()
        self.mirror.upload()
        self.mirror.cleanup()


# ------------------------------------------------------------------------ W&B

class _Wandb:
    """wandb.init with the cell's stored id and resume="allow": a resumed cell
    continues its run (offline: a new offline-run folder with the same id,
    merged by `wandb sync`)."""

    name = "wandb"

    def __init__(self, cfg: WandbCfg, s: _Subject, folder: str):
        import wandb

        self.mirror = _Mirror(folder)
        saved = s.state.get("wandb") or {}
        rid = saved["id"] if saved.get("project") == cfg.project and saved.get("id") else _new_id()
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_save_requirements=False,
                                  disable_git=True, save_code=False)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, id=rid, resume="allow",
                              name=s.name, group=s.group, job_type=s.kind, tags=[s.run_name],
                              config={k: _scalar(v) for k, v in s.params.items()}, dir=self.mirror.local,
                              reinit="create_new", settings=settings)
        # Online resume: W&B holds history up to here already.
        self.first = int(self.run.step or 0)
        self.s = s
        s.state["wandb"] = {"project": cfg.project, "entity": cfg.entity, "id": rid}

    def log(self, step: int, values: dict) -> None:
        if step >= self.first and values:
            self.run.log(values, step=step, commit=True)  # written now, not when the next step starts

    def artifacts(self, staged: dict) -> None:
        import wandb

        if not staged:
            return
        name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in f"{self.s.run_name}-results")
        art = wandb.Artifact(name, type="wsg-results")
        for key, path in staged.items():
            if os.path.isdir(path):
                art.add_dir(path, name=key)
            else:
                art.add_file(path, name=key)
        self.run.log_artifact(art)

    def flush(self) -> None:
        self.mirror.upload()

    def close(self, summary: dict, state: str, step: int) -> None:
        self.run.summary.update({k: _scalar(v) for k, v in summary.items()})
        self.run.summary["state"] = state
        self.run.finish(exit_code=1 if state == "failed" else 0)
        self.mirror.upload()
        self.mirror.cleanup()

    def abort(self) -> None:
        try:
            self.run.finish(exit_code=1)
        finally:
            self.mirror.upload()
            self.mirror.cleanup()
