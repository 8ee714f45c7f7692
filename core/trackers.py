"""The trackers behind core.tracking: MLflow, TensorBoard and W&B, each
driven by its own client (mlflow's MlflowClient, torch.utils.tensorboard's
SummaryWriter, wandb), imported only when its tracker is configured.

Every backend has the same five methods: log(step, values), artifacts({name:
local path}), flush(), close(summary, state, last_step) and abort();
core.tracking.Tracker calls them and switches a backend off at its first
error (docs/tracking.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from . import rundir

# MLflow's HTTP client retries 7 times with exponential backoff (minutes of
# stalled training when the server hangs); wsg's defaults, unless the user
# set these variables, give up after 3 tries of 60 s and switch MLflow off.
# Its client also prints a "View run" URL line per finished run (console noise).
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_STATUS = {"complete": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
# Rows of a table shown as text in TensorBoard (the file itself is the artifact).
_TEXT_ROWS = 50


@dataclass
class Subject:
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


def scalar(v: Any):
    """A param value every tracker takes (TensorBoard hparams: bool/number/str)."""
    if v is None:
        return "None"
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)


def new_id() -> str:
    return secrets.token_hex(4)  # os.urandom: no RNG stream is advanced


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def copy_local(uri: str, dest: str) -> str:
    """Copy a run-dir file or folder (local or object store) to `dest`."""
    import pyarrow.fs as pafs

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


class Mirror:
    """A tracker's local folder: the run-dir folder itself, or for an
    object-store run a temporary folder uploaded by `upload()`."""

    def __init__(self, uri: str):
        self.remote = None if rundir.is_local(uri) else uri
        self.local = rundir.resolve(uri)[1] if self.remote is None else tempfile.mkdtemp(prefix="wsg-track-")
        os.makedirs(self.local, exist_ok=True)

    def upload(self) -> None:
        if self.remote is None:
            return

        for root, _dirs, files in os.walk(self.local):
            for name in files:
                p = os.path.join(root, name)
                rel = os.path.relpath(p, self.local).replace(os.sep, "/")
                with open(p, "rb") as f:
                    rundir.write_bytes(rundir.join(self.remote, rel), f.read())

    def cleanup(self) -> None:
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


class Named:
    def __init__(self, name: str):
        self.name = name

    def abort(self) -> None:
        pass


# ------------------------------------------------------------------- MLflow

def sqlite_folder(uri: str) -> str | None:
    """The folder of a `sqlite:///<path>` store (None for other URIs)."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    return os.path.dirname(uri.split("://", 1)[1][1:]) or None


class Mlflow:
    """MlflowClient. Hierarchy: run root (tag wsg.role=run) > one run per
    loss (wsg.role=loss) > cells (wsg.role=cell), linked by mlflow.parentRunId."""

    name = "mlflow"

    def __init__(self, cfg, s: Subject):
        from mlflow.exceptions import MlflowException

        self._connect(cfg, s)
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

    def _connect(self, cfg, s: Subject) -> None:
        for k, v in _MLFLOW_ENV.items():
            os.environ.setdefault(k, v)
        from mlflow.tracking import MlflowClient

        self.uri = cfg.uri
        if (folder := sqlite_folder(cfg.uri)) is not None:
            os.makedirs(folder, exist_ok=True)  # SQLite makes the file, not its folder
        self.c, self.s = MlflowClient(tracking_uri=cfg.uri), s
        self.exp_id = self._experiment(cfg.experiment or s.experiment)

    @classmethod
    def make_containers(cls, cfg, s: Subject, groups: list[str]) -> None:
        """The run's root run and one run per loss, made by the grid's driver
        (one process) before its cells start, so the cells only find them.
        Cells that each made one in parallel could not agree: MLflow has no
        atomic create-if-absent, and a start time taken by the client may sort
        a later run first, so a loss could end up under a deleted root."""
        self = cls.__new__(cls)
        self._connect(cfg, s)
        root = self._container("run", s.run_name, None)
        for group in groups:
            self.s = dataclasses.replace(s, group=group)
            self._container("loss", group, root)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.c.get_experiment_by_name(name)
        if exp is None:
            # A SQLite store keeps artifacts next to its file: MLflow's default,
            # ./mlruns, is relative to each cell's working directory.
            folder = sqlite_folder(self.uri)
            where = None if folder is None else "file://" + os.path.join(folder, "mlartifacts")
            try:
                return self.c.create_experiment(name, artifact_location=where)
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
        once: found when the grid's driver made it (make_containers), else
        made here (a cell trained on its own); should two appear at once, the
        oldest is kept and the other deleted by its maker."""
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
        new = [Param(k, str(scalar(v))[:6000]) for k, v in params.items() if k not in have]
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

class TensorBoard:
    """torch.utils.tensorboard's SummaryWriter, one event folder per cell.
    A resumed cell writes with purge_step, so TensorBoard hides the events a
    killed attempt logged after the checkpoint it resumes from."""

    name = "tensorboard"

    def __init__(self, s: Subject, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.s, self.mirror = s, Mirror(folder)
        purge = s.start_step + 1 if s.start_step > 0 else None
        self.w = SummaryWriter(log_dir=self.mirror.local, purge_step=purge)
        if s.start_step == 0:
            self.w.add_text("wsg/params", md_table([{"param": k, "value": scalar(v)}
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
                self.w.add_text(f"wsg/{name}", md_table(rows), 0)
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
        exp, ssi, sei = hparams({k: scalar(v) for k, v in self.s.params.items()}, metrics)
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

class Wandb:
    """wandb.init with the cell's stored id and resume="allow": a resumed cell
    continues its run (offline: a new offline-run folder with the same id,
    merged by `wandb sync`)."""

    name = "wandb"

    def __init__(self, cfg, s: Subject, folder: str):
        import wandb

        self.mirror = Mirror(folder)
        saved = s.state.get("wandb") or {}
        rid = saved["id"] if saved.get("project") == cfg.project and saved.get("id") else new_id()
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_save_requirements=False,
                                  disable_git=True, save_code=False)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, id=rid, resume="allow",
                              name=s.name, group=s.group, job_type=s.kind, tags=[s.run_name],
                              config={k: scalar(v) for k, v in s.params.items()}, dir=self.mirror.local,
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
        self.run.summary.update({k: scalar(v) for k, v in summary.items()})
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
