"""Every path of a run directory, named in one place (docs/design.md, "Run layout").

    <run>/config.yaml                    resolved config + its hash (first line)
    <run>/stages/<stage>/_COMPLETE       a finished stage and its summary
    <run>/logs/                          third-party output of the run's processes
    <run>/rollouts/rollouts.parquet, pairs.parquet, shards/shard_<i>.parquet
    <run>/cells/<cell_id>/               one training cell (CellLayout)
    <run>/train_state/<cell_id>/         resume state (Ray Train storage, online state)
    <run>/tune/grid/                     Ray Tune experiment state
    <run>/eval/predictions.parquet, accuracy.parquet, mcnemar.parquet, models/<name>.parquet
    <run>/geometry/<table>.parquet, .cache/
    <run>/analysis/lmc.parquet, cka.parquet, logit_lens.parquet, parts/
    <run>/report/index.html, figures/<name>.png
    <run>/tracking/run.json, tensorboard/<cell_id>/, wandb/   experiment trackers' files
    <run>/_LOCK                          the writing command (core/runlock.py)

A run is a local folder or an object-store URI; paths are joined with
`rundir.join`, so both work. No other module joins run-directory path strings.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import rundir
from .tracking import TrackingPaths

LOCK = "_LOCK"  # the run's one-writer lock file (core/runlock.py)
STAGES = ("rollouts", "grid", "eval", "functional", "geometry", "report")


@dataclass(frozen=True)
class CellLayout:
    """`<run>/cells/<cell_id>/`: adapters, metrics and state files of one cell."""

    root: str
    cell_id: str

    def step(self, n: int) -> str:
        """A published PEFT adapter folder (complete when its marker exists)."""
        return rundir.join(self.root, f"step_{int(n)}")

    @property
    def complete_marker(self) -> str:
        return rundir.join(self.root, rundir.COMPLETE_MARKER)

    @property
    def spec(self) -> str:
        """cell.json: the cell's identity (loss, variant, seeds, lr)."""
        return rundir.join(self.root, "cell.json")

    @property
    def fingerprint(self) -> str:
        return rundir.join(self.root, "fingerprint.json")

    @property
    def status(self) -> str:
        return rundir.join(self.root, "status.json")

    @property
    def failed(self) -> str:
        return rundir.join(self.root, "FAILED")

    @property
    def progress(self) -> str:
        """progress.json: the running cell's last step (the console polls it)."""
        return rundir.join(self.root, "progress.json")

    @property
    def metrics(self) -> str:
        return rundir.join(self.root, "metrics.parquet")

    @property
    def placement_group(self) -> str:
        """placement_group.json: the Ray placement group the cell's current
        Ray Train attempt runs in (train/cell.py frees it if the run fails)."""
        return rundir.join(self.root, "placement_group.json")

    @property
    def tracking(self) -> str:
        """tracking.json: the ids of the cell's tracked runs (a resume continues them)."""
        return rundir.join(self.root, "tracking.json")

    @property
    def fault_marker(self) -> str:
        """Written by the fault-injection hook of the fault-tolerance tests."""
        return rundir.join(self.root, "_fault_injected")


@dataclass(frozen=True)
class RunLayout:
    root: str

    @classmethod
    def of(cls, run: "str | RunLayout") -> "RunLayout":
        """The layout of a run folder (a local path made absolute), or `run`
        itself when it is a layout already: a stage handed the pipeline's
        layout builds no other."""
        return run if isinstance(run, RunLayout) else cls(rundir.canonical(run))

    def _p(self, *parts: str) -> str:
        return rundir.join(self.root, *parts)

    # -- run level -------------------------------------------------------------
    @property
    def lock(self) -> str:
        """The one-writer lock (core/runlock.py)."""
        return self._p(LOCK)

    @property
    def config(self) -> str:
        return self._p("config.yaml")

    def stage_marker_dir(self, stage: str) -> str:
        return self._p("stages", stage)

    @property
    def logs(self) -> str:
        return self._p("logs")

    # -- rollouts --------------------------------------------------------------
    @property
    def rollouts_dir(self) -> str:
        return self._p("rollouts")

    @property
    def rollouts(self) -> str:
        return self._p("rollouts", "rollouts.parquet")

    @property
    def pairs(self) -> str:
        return self._p("rollouts", "pairs.parquet")

    @property
    def rollouts_complete(self) -> str:
        return self._p("rollouts", rundir.COMPLETE_MARKER)

    def rollout_shard(self, i: int) -> str:
        return self._p("rollouts", "shards", f"shard_{i:05d}.parquet")

    # -- training --------------------------------------------------------------
    @property
    def cells_dir(self) -> str:
        return self._p("cells")

    def cell(self, cell_id: str) -> CellLayout:
        return CellLayout(self._p("cells", cell_id), cell_id)

    def cell_ids(self) -> list[str]:
        return rundir.listdir(self.cells_dir)

    @property
    def train_state_dir(self) -> str:
        return self._p("train_state")

    def train_state(self, cell_id: str) -> str:
        return self._p("train_state", cell_id)

    @property
    def tune_dir(self) -> str:
        return self._p("tune")

    def tracking_paths(self, cell_id: str | None = None):
        """Where the trackers of a cell (or of the run) keep their files."""

        if cell_id is None:  # "_run" cannot be a cell id: those start with a letter
            return TrackingPaths(self._p("tracking", "run.json"), self._p("tracking", "tensorboard", "_run"),
                                 self._p("tracking", "wandb"))
        return TrackingPaths(self.cell(cell_id).tracking, self._p("tracking", "tensorboard", cell_id),
                             self._p("tracking", "wandb"))

    # -- evaluation ------------------------------------------------------------
    @property
    def eval_dir(self) -> str:
        return self._p("eval")

    def eval_table(self, name: str) -> str:
        """predictions, accuracy, mcnemar."""
        return self._p("eval", f"{name}.parquet")

    def eval_model(self, model: str) -> str:
        """One model's cached predictions."""
        return self._p("eval", "models", f"{model}.parquet")

    # -- geometry --------------------------------------------------------------
    @property
    def geometry_dir(self) -> str:
        return self._p("geometry")

    def geometry_table(self, name: str) -> str:
        """adapter_modules, module_pairs, layer_pairs, global_pairs, noise_floors, convergence, claims."""
        return self._p("geometry", f"{name}.parquet")

    # -- functional analyses ---------------------------------------------------
    @property
    def functional_dir(self) -> str:
        return self._p("analysis")

    def functional_table(self, name: str) -> str:
        """lmc, cka, logit_lens."""
        return self._p("analysis", f"{name}.parquet")

    def functional_parts(self, kind: str) -> str:
        """The cached units of one kind (hidden, lmc)."""
        return self._p("analysis", "parts", kind)

    def functional_part(self, kind: str, name: str) -> str:
        return self._p("analysis", "parts", kind, name)

    # -- report ------------------------------------------------------------------
    @property
    def report_dir(self) -> str:
        return self._p("report")

    @property
    def report_index(self) -> str:
        return self._p("report", "index.html")

    def report_figure(self, name: str) -> str:
        return self._p("report", "figures", name)

    # -- relative names (tables read by the report, for messages) ----------------
    def relative(self, path: str) -> str:
        root = self.root.rstrip("/") + "/"
        return path[len(root):] if path.startswith(root) else path


@dataclass(frozen=True)
class StudyLayout:
    """A study folder (`wsg study`, sweep/study.py): one run per value of its
    factor and the runs' claims side by side.

        <study>/<label>/        an ordinary run (RunLayout) per value
        <study>/claims.parquet  claim x run, with the factor's value (sweep/study.py)
        <study>/claims.png      each claim's value, CI and floor against the factor
        <study>/claims_forest.png  the report's forest plot, each claim once per run
        <study>/index.html      the study's page: which claims hold for which value
    """

    root: str

    @classmethod
    def of(cls, study: str) -> "StudyLayout":
        return cls(rundir.canonical(study))

    def run(self, label: str) -> str:
        return rundir.join(self.root, label)

    @property
    def claims(self) -> str:
        return rundir.join(self.root, "claims.parquet")

    @property
    def figure(self) -> str:
        return rundir.join(self.root, "claims.png")

    @property
    def forest(self) -> str:
        return rundir.join(self.root, "claims_forest.png")

    @property
    def page(self) -> str:
        """index.html: which claims hold for which value (analysis/study_page.py)."""
        return rundir.join(self.root, "index.html")
