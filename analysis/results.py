"""A run's results for notebooks: `wsg.open_run(path_or_uri)` (docs/results.md).

    import wsg
    run = wsg.open_run("runs/tiny")            # or "s3://bucket/runs/tiny"
    run.claims[["claim", "value", "ci_low", "ci_high", "verdict"]]
    run.global_pairs.query("step == 12")
    run.cells                                  # one row per cell, with its adapter paths
    run.status                                 # stages and cells done / failed / incomplete

Every table attribute reads its Parquet file from the run when asked (so a
run still going shows what it has now) and returns a pandas DataFrame. A table
the run does not hold raises `MissingTable`, naming the file and the stage
that writes it. All I/O goes through core/rundir.py (`pyarrow.fs`), so local
folders and object-store URIs read alike. Importing this module imports
neither torch nor Ray; `config` parses the run's config.yaml on first use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..core import rundir
from ..core.cells import CellKey
from ..core.config import parse_config
from ..core.errors import WsgError
from ..core.layout import STAGES, RunLayout, StudyLayout

_GEOMETRY = "the geometry stage (`wsg geometry --run RUN`)"
_FINDINGS = "the findings step of the geometry stage (`wsg geometry --run RUN`; docs/findings.md)"
_EVAL = "the eval stage (`wsg eval --run RUN`)"
_FUNCTIONAL = "the functional stage (`wsg functional --run RUN`)"
_ROLLOUTS = "the rollouts stage (`wsg rollouts CONFIG --run RUN`)"

# attribute -> (RunLayout path of it, what writes it, what one row is)
TABLES = {
    "claims": (lambda L: L.geometry_table("claims"), _FINDINGS,
               "one row per claim of the seed paper (per eval set for accuracy claims): value, 95% CI, test, "
               "noise floor, verdict"),
    "noise_floors": (lambda L: L.geometry_table("noise_floors"), _FINDINGS,
                     "one row per one-factor control pair (init seed, data seed or LR) and step: the floor metrics"),
    "convergence": (lambda L: L.geometry_table("convergence"), _FINDINGS,
                    "one row per cell and checkpoint: cosine with the final checkpoint, norm growth, converged"),
    "global_pairs": (lambda L: L.geometry_table("global_pairs"), _GEOMETRY,
                     "one row per adapter pair: global cosine, orthogonal fractions, norms, with bootstrap CIs"),
    "layer_pairs": (lambda L: L.geometry_table("layer_pairs"), _GEOMETRY,
                    "one row per adapter pair and layer: the pair's metrics over that layer's modules"),
    "module_pairs": (lambda L: L.geometry_table("module_pairs"), _GEOMETRY,
                     "one row per adapter pair and module: cosine, principal angles, singular-vector overlaps"),
    "adapter_modules": (lambda L: L.geometry_table("adapter_modules"), _GEOMETRY,
                        "one row per adapter and module: Frobenius norm, effective rank, singular values"),
    "accuracy": (lambda L: L.eval_table("accuracy"), _EVAL,
                 "one row per model (base and every adapter) and eval set: greedy pass@1 with its Wilson 95% CI"),
    "mcnemar": (lambda L: L.eval_table("mcnemar"), _EVAL,
                "one row per model pair and eval set: the exact McNemar test on the items both were scored on"),
    "predictions": (lambda L: L.eval_table("predictions"), _EVAL,
                    "one row per model and eval item: the completion, the extracted answer, correct or not"),
    "lmc": (lambda L: L.functional_table("lmc"), _FUNCTIONAL,
            "one row per adapter pair and interpolation point alpha: masked-answer cross-entropy"),
    "cka": (lambda L: L.functional_table("cka"), _FUNCTIONAL,
            "one row per adapter pair and layer: linear CKA of the hidden states"),
    "logit_lens": (lambda L: L.functional_table("logit_lens"), _FUNCTIONAL,
                   "one row per model: mean prediction depth of the logit lens"),
    "rollouts": (lambda L: L.rollouts, _ROLLOUTS, "one row per sampled completion: prompt, completion, reward"),
    "pairs": (lambda L: L.pairs, _ROLLOUTS, "one row per (chosen, rejected) pair built from the rollouts"),
}


class MissingTable(WsgError, LookupError):
    """A table the run does not hold (yet): the message names its file and what writes it."""


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: `stages` maps each stage to complete or not; `cells`
    maps each cell id to `done`, `failed: <reason>` or `incomplete (<n>
    checkpoint(s) written)`; `report` is whether report/index.html exists."""

    stages: dict
    cells: dict
    report: bool

    @property
    def complete(self) -> bool:
        """Every stage complete, every cell done and the report written."""
        return all(self.stages.values()) and all(v == "done" for v in self.cells.values()) and self.report

    def __str__(self) -> str:
        lines = [f"  {name:<11} {'complete' if done else 'not complete'}" for name, done in self.stages.items()]
        lines.append(f"  {'report':<11} {'complete' if self.report else 'not complete'}")
        lines += ["cells:"] * bool(self.cells) + [f"  {c:<28} {state}" for c, state in self.cells.items()]
        return "\n".join(lines)


def _table_property(name: str):
    where, writer, row = TABLES[name]

    def get(self: "Run"):
        return self.table(name)

    get.__doc__ = (f"`{name}` as a pandas DataFrame, from `<run>/{RunLayout('').relative(where(RunLayout('')))}`"
                   f": {row}. Written by {writer}; absent, it raises MissingTable.")
    return property(get, doc=get.__doc__)


class Run:
    """A wsg run directory opened for reading (local folder or `s3://`/`gs://` URI).

    Table attributes (`claims`, `global_pairs`, ...) read their Parquet file
    each time they are accessed; `tables()` lists those present. Nothing is
    ever written to the run.
    """

    def __init__(self, path_or_uri: str):
        root = rundir.canonical(str(path_or_uri))
        # A local path without its "..": the paths this object hands out are the run's own.
        self.layout = RunLayout(os.path.normpath(root) if rundir.is_local(root) else root.rstrip("/"))
        if not rundir.exists(self.layout.root):
            raise WsgError(f"run directory {path_or_uri} does not exist; pass the folder or URI given to "
                           "`wsg run --run`")
        if not rundir.exists(self.layout.config):
            raise WsgError(f"{self.layout.root} is not a wsg run directory: it has no config.yaml (`wsg run` "
                           "writes it first)")
        self._config = None

    @property
    def path(self) -> str:
        """The run's folder or URI (a local path made absolute)."""
        return self.layout.root

    def __repr__(self) -> str:
        return f"wsg.Run({self.path!r}, tables={self.tables()})"

    # -- tables ---------------------------------------------------------------------
    def table_path(self, name: str) -> str:
        """Where table `name` lives in the run (one of `TABLES`)."""
        if name not in TABLES:
            raise WsgError(f"no table {name!r}; a run's tables are: {', '.join(TABLES)}")
        return TABLES[name][0](self.layout)

    def table(self, name: str):
        """Table `name` as a pandas DataFrame; MissingTable if the run lacks it."""
        path = self.table_path(name)
        if not rundir.exists(path):
            raise MissingTable(f"{name}: {self.layout.relative(path)} is absent from {self.path}: it is written by "
                               f"{TABLES[name][1]}")
        return rundir.read_table(path).to_pandas()

    def tables(self) -> list[str]:
        """The names of the tables this run holds now."""
        return [n for n in TABLES if rundir.exists(self.table_path(n))]

    claims = _table_property("claims")
    noise_floors = _table_property("noise_floors")
    convergence = _table_property("convergence")
    global_pairs = _table_property("global_pairs")
    layer_pairs = _table_property("layer_pairs")
    module_pairs = _table_property("module_pairs")
    adapter_modules = _table_property("adapter_modules")
    accuracy = _table_property("accuracy")
    mcnemar = _table_property("mcnemar")
    predictions = _table_property("predictions")
    lmc = _table_property("lmc")
    cka = _table_property("cka")
    logit_lens = _table_property("logit_lens")
    rollouts = _table_property("rollouts")
    pairs = _table_property("pairs")

    # -- config ---------------------------------------------------------------------
    @property
    def config_text(self) -> str:
        """`<run>/config.yaml` as written by `wsg run`: the resolved config, its hash in the first line."""
        return rundir.read_text(self.layout.config)

    @property
    def config_hash(self) -> Optional[str]:
        """The config hash `wsg run` wrote in config.yaml's first line (None for a hand-written file)."""
        first = (self.config_text.splitlines() or [""])[0]
        return first.rsplit(" ", 1)[-1] if first.startswith("# wsg resolved config") else None

    @property
    def config(self):
        """The resolved config, validated: a `wsg.core.config.ExperimentConfig` (`.model_dump()` for a dict)."""
        if self._config is None:
            import yaml


            self._config = parse_config(yaml.safe_load(self.config_text), self.layout.config)
        return self._config

    # -- cells, adapters, status ------------------------------------------------------
    def _steps(self, cell_id: str) -> list[int]:
        """Complete checkpoint steps of a cell (folders whose `_COMPLETE` marker exists)."""
        cl = self.layout.cell(cell_id)
        return sorted(int(n[5:]) for n in rundir.listdir(cl.root)
                      if n.startswith("step_") and n[5:].isdigit() and rundir.is_complete(cl.step(int(n[5:]))))

    def _state(self, cell_id: str, steps: list[int]) -> str:
        cl = self.layout.cell(cell_id)
        if rundir.is_complete(cl.root):
            return "done"
        if rundir.exists(cl.failed):
            return "failed: " + (rundir.read_text(cl.failed).strip().splitlines() or [""])[0][:200]
        return f"incomplete ({len(steps)} checkpoint(s) written)"

    @property
    def cells(self):
        """One row per cell of `<run>/cells/`: cell_id, loss, variant, init_seed, data_seed, lr, state
        (done / failed: reason / incomplete), steps (complete checkpoints), adapters (the checkpoints' folders,
        in step order) and final_adapter (the last one, None before the first)."""
        import pandas as pd


        rows = []
        for cid in self.layout.cell_ids():
            cl = self.layout.cell(cid)
            try:
                key = CellKey.parse(cid).as_dict()
            except WsgError:  # not a cell's folder
                continue
            spec = rundir.read_json(cl.spec) if rundir.exists(cl.spec) else {}
            steps = self._steps(cid)
            paths = [cl.step(s) for s in steps]
            rows.append({"cell_id": cid, **key, "variant": spec.get("variant"), "state": self._state(cid, steps),
                         "steps": steps, "adapters": paths, "final_adapter": paths[-1] if paths else None})
        cols = ["cell_id", "loss", "variant", "init_seed", "data_seed", "lr", "state", "steps", "adapters",
                "final_adapter"]
        return pd.DataFrame(rows, columns=cols)

    @property
    def adapters(self):
        """One row per complete checkpoint: name (`<cell_id>@<step>`, the `adapter`/`model` column of the
        analysis tables), cell_id, loss, init_seed, data_seed, lr, step and path (a PEFT adapter folder or URI)."""
        import pandas as pd

        rows = [{"name": f"{c['cell_id']}@{s}", **{k: c[k] for k in ("cell_id", "loss", "init_seed", "data_seed",
                                                                      "lr")}, "step": s, "path": p}
                for c in self.cells.to_dict("records") for s, p in zip(c["steps"], c["adapters"])]
        return pd.DataFrame(rows, columns=["name", "cell_id", "loss", "init_seed", "data_seed", "lr", "step", "path"])

    def adapter(self, cell_id: str, step: Optional[int] = None) -> str:
        """The folder of a cell's checkpoint `step` (default: its last complete one)."""
        steps = self._steps(cell_id)
        if not steps:
            raise WsgError(f"cell {cell_id!r} has no complete checkpoint in {self.path}; its cells: "
                           f"{', '.join(self.layout.cell_ids()) or 'none'}")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise WsgError(f"cell {cell_id!r} has no complete checkpoint at step {step}; it has {steps}")
        return self.layout.cell(cell_id).step(step)

    def metrics(self, cell_id: Optional[str] = None):
        """Training metrics (`cells/<cell>/metrics.parquet`, one row per step) as a DataFrame with a cell_id
        column: of one cell, or of every cell that has them."""
        import pandas as pd

        ids = [cell_id] if cell_id else self.layout.cell_ids()
        frames = []
        for cid in ids:
            path = self.layout.cell(cid).metrics
            if rundir.exists(path):
                frames.append(rundir.read_table(path).to_pandas().assign(cell_id=cid))
            elif cell_id:
                raise MissingTable(f"{self.layout.relative(path)} is absent from {self.path}: the cell writes it "
                                   "as it trains (`wsg run` / `wsg train`)")
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["cell_id"])

    @property
    def status(self) -> RunStatus:
        """Which stages are complete, each cell's state, whether the report is built (what `wsg status` prints)."""
        stages = {s: rundir.is_complete(self.layout.stage_marker_dir(s)) for s in STAGES[:-1]}
        cells = {}
        for cid in self.layout.cell_ids():
            cells[cid] = self._state(cid, self._steps(cid))
        return RunStatus(stages=stages, cells=cells, report=rundir.exists(self.layout.report_index))

    @property
    def report(self) -> Optional[str]:
        """The path of report/index.html, or None before `wsg report RUN` (or `wsg run`) built it."""
        return self.layout.report_index if rundir.exists(self.layout.report_index) else None


def open_run(path_or_uri: str) -> Run:
    """Open a wsg run directory (a local folder or an `s3://` / `gs://` URI) for reading; see `Run`."""
    return Run(path_or_uri)


class Study:
    """A study folder written by `wsg study CONFIG` (sweep/study.py), read back:
    the runs' claims side by side and each run as a `Run`.

        >>> study = wsg.open_study("runs/teacher-study")
        >>> study.claims.pivot(index="claim", columns="factor_value", values="verdict")
    """

    def __init__(self, path_or_uri: str):
        self.layout = StudyLayout.of(path_or_uri)
        if not rundir.exists(self.layout.root):
            raise WsgError(f"study folder {path_or_uri} does not exist; pass the folder given to `wsg study`")

    @property
    def path(self) -> str:
        """The study folder (a local path made absolute, or the URI)."""
        return self.layout.root

    @property
    def claims(self):
        """claim x run: each run's claims table (see `Run.claims`) with the
        columns run, factor, factor_value, config_hash and the teacher's
        profile (teacher, teacher_kind, teacher_accuracy, ...)."""
        if not rundir.exists(self.layout.claims):
            raise MissingTable(f"{self.layout.claims} is absent: `wsg study CONFIG --study {self.path}` writes it "
                               "once a run of the study has finished")
        return rundir.read_table(self.layout.claims).to_pandas()

    @property
    def factor(self) -> Optional[str]:
        """The factor the runs differ in (the study config's `study.factor`)."""
        c = self.claims
        return str(c["factor"].iloc[0]) if len(c) else None

    @property
    def labels(self) -> list[str]:
        """The values' labels, one run folder each, in the study's order."""
        if rundir.exists(self.layout.claims):
            return list(dict.fromkeys(self.claims["run"]))
        return sorted(n for n in rundir.listdir(self.layout.root)
                      if rundir.exists(RunLayout.of(self.layout.run(n)).config))

    @property
    def runs(self) -> dict[str, Run]:
        """label -> the run of that value of the factor (`open_run` of its folder)."""
        return {label: Run(self.layout.run(label)) for label in self.labels}

    @property
    def figure(self) -> Optional[str]:
        """The path of claims.png (each claim's value, CI and floor against the factor), or None."""
        return self.layout.figure if rundir.exists(self.layout.figure) else None

    @property
    def forest(self) -> Optional[str]:
        """The path of claims_forest.png (the report's forest plot, each claim once per run), or None."""
        return self.layout.forest if rundir.exists(self.layout.forest) else None


def open_study(path_or_uri: str) -> Study:
    """Open a study folder (local or `s3://` / `gs://`) for reading; see `Study`."""
    return Study(path_or_uri)
