"""`wsg study CONFIG`: several runs that differ in one factor, and their claims side by side.

A study config is an experiment config plus a `study:` section naming one
factor and its values; each value is a label and the config keys it sets
(dotted paths), e.g. the teacher:

    study:
      factor: teacher
      values:
        - {label: scripted-0.15, set: {rollouts.backend: scripted, rollouts.scripted_error_rate: 0.15}}
        - {label: scripted-0.80, set: {rollouts.backend: scripted, rollouts.scripted_error_rate: 0.80}}
        - {label: self, set: {rollouts.backend: vllm}}

Each value is one ordinary run in `<study>/<label>/` (its config is the base
with that value's keys set, validated like any config; `study` itself is not
part of it, so a run's config hash is the one `wsg run` would give it). Runs
resume like `wsg run` does, and a finished run (its report written) is
skipped, so rerunning the same command after an interruption continues where
it stopped. After the runs, `<study>/claims.parquet` holds every run's
claims table with the run, the factor, its value, the run's config hash and
the teacher's profile (rollouts/teacher.py) as columns: claim x run, and
`<study>/claims.png` draws each claim's value, CI and floor against the factor, and
`<study>/index.html` opens with which claims hold for which value.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..analysis.claims import CLAIMS_SCHEMA
from ..analysis.study_figures import claims_by_factor, study_forest
from ..analysis.study_page import render as render_study_page
from ..core import rundir
from ..core.config import config_hash
from ..core.console import say
from ..core.errors import WsgError
from ..core.layout import STAGES, RunLayout, StudyLayout
from . import pipeline
from .config import parse_config

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
# The teacher's profile as columns of the combined table (rollouts/teacher.py).
TEACHER_COLS = (("teacher", pa.string()), ("teacher_kind", pa.string()), ("teacher_error_rate", pa.float64()),
                ("teacher_accuracy", pa.float64()), ("teacher_frac_prompts_mixed", pa.float64()),
                ("teacher_distinct_per_prompt", pa.float64()), ("teacher_token_jaccard", pa.float64()))
STUDY_COLS = (("run", pa.string()), ("factor", pa.string()), ("factor_value", pa.string()),
              ("config_hash", pa.string()))


class StudyValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _label(cls, v):
        if not _LABEL.match(v):
            raise ValueError(f"label {v!r} becomes a folder name: use letters, digits and _.+- only")
        return v


class StudyCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: str
    values: list[StudyValue] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _distinct(cls, v):
        labels = [x.label for x in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels repeat ({labels}); give every value its own label")
        return v


def _set_path(data: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise WsgError(f"{where}: {dotted!r} goes through {k!r}, which is not a section of the config")
        node = nxt
    node[keys[-1]] = copy.deepcopy(value)


def load_study(path: str) -> tuple[StudyCfg, list[tuple[StudyValue, Any]]]:
    """(the study section, [(value, its ExperimentConfig)]) of a study YAML."""
    import yaml


    try:
        data = yaml.safe_load(rundir.read_text(path)) or {}
    except FileNotFoundError:
        raise WsgError(f"{path}: no such study config") from None
    if not isinstance(data, dict) or "study" not in data:
        raise WsgError(f"{path} has no `study:` section; add one naming the factor and its values "
                       "(docs/findings.md \"Studies\")")
    raw = data.pop("study")
    try:
        study = StudyCfg.model_validate(raw)
    except ValidationError as err:
        lines = [f"study.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise WsgError(f"{path}: invalid study section:\n  " + "\n  ".join(lines)) from None
    out = []
    for i, v in enumerate(study.values):
        d = copy.deepcopy(data)
        for key, val in v.set.items():
            _set_path(d, key, val, f"{path}: study.values[{i}].set")
        out.append((v, parse_config(d, f"{path} (study.values[{i}], label {v.label})")))
    return study, out


def run_folder(study_dir: str, label: str) -> str:
    return StudyLayout.of(study_dir).run(label)


def combined_path(study_dir: str) -> str:
    return StudyLayout.of(study_dir).claims


def finished(run: str) -> bool:
    """A run whose every stage is complete and whose report is written."""

    lay = RunLayout.of(run)
    return rundir.exists(lay.report_index) and all(rundir.is_complete(lay.stage_marker_dir(s))
                                                   for s in STAGES if s != "report")


def _teacher_of(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(b"wsg.teacher")
    return (json.loads(raw) if raw else None) or {}


def combine(study_dir: str, study: StudyCfg, runs: list[tuple[StudyValue, Any]]) -> Optional[pa.Table]:
    """The claims of every run that has them, one table (claim x run), written
    to <study>/claims.parquet; None when no run has claims yet."""

    schema = pa.schema(list(STUDY_COLS) + list(TEACHER_COLS) + list(CLAIMS_SCHEMA))
    parts = []
    for v, cfg in runs:
        path = RunLayout.of(run_folder(study_dir, v.label)).geometry_table("claims")
        if not rundir.exists(path):
            continue
        t = rundir.read_table(path)
        teacher = _teacher_of(t)
        n = t.num_rows
        cols = {"run": [v.label] * n, "factor": [study.factor] * n,
                "factor_value": [json.dumps(v.set, sort_keys=True)] * n, "config_hash": [config_hash(cfg)] * n}
        cols.update({c: [teacher.get(c)] * n for c, _ in TEACHER_COLS})
        cols.update({f.name: t.column(f.name).to_pylist() if f.name in t.column_names else [None] * n
                     for f in CLAIMS_SCHEMA})
        parts.append(pa.table(cols, schema=schema))
    if not parts:
        return None
    table = pa.concat_tables(parts).replace_schema_metadata(
        {b"wsg.study": json.dumps(study.model_dump(mode="json")).encode()})
    rundir.write_table(combined_path(study_dir), table)
    _figure(study_dir, study, runs, table)
    _page(study_dir, study, runs, table)
    return table


def figure_path(study_dir: str) -> str:
    return StudyLayout.of(study_dir).figure


def _figure(study_dir: str, study: StudyCfg, runs: list, table: pa.Table) -> None:
    """<study>/claims.png (each claim against the factor) and claims_forest.png
    (the report's forest plot, each claim once per run)."""
    import os
    import tempfile

    rows, labels, lay = table.to_pylist(), [v.label for v, _ in runs], StudyLayout.of(study_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for dest, local in ((lay.figure, claims_by_factor(rows, labels, study.factor, os.path.join(tmp, "a.png"))),
                            (lay.forest, study_forest(rows, labels, os.path.join(tmp, "b.png")))):
            if local:
                with open(local, "rb") as f:
                    rundir.write_bytes(dest, f.read())


def _page(study_dir: str, study: StudyCfg, runs: list, table: pa.Table) -> None:
    """<study>/index.html: which claims hold for which value, where a verdict
    changes along the factor, the table and the figures (analysis/study_page.py)."""
    lay = StudyLayout.of(study_dir)
    figs = [(n, c) for n, c, p in (
        ("claims.png", f"each claim's value, 95% CI and noise floor against {study.factor}", lay.figure),
        ("claims_forest.png", "every claim once per run (the report's forest plot)", lay.forest))
        if rundir.exists(p)]
    page = render_study_page(table.to_pylist(), [v.label for v, _ in runs], study.factor, figs)
    rundir.write_text(lay.page, page)


def run_study(path: str, study_dir: Optional[str], *, address: Optional[str] = None, verbose: bool = False) -> int:
    """Run (or resume) every value's run, then write the combined claims table."""
    import os


    study, runs = load_study(path)
    base = os.path.splitext(os.path.basename(path))[0]
    study_dir = rundir.canonical(study_dir or os.path.join(runs[0][1].storage.runs_root, f"{base}-study"))
    rundir.makedirs(study_dir)
    for i, (v, cfg) in enumerate(runs):
        run = run_folder(study_dir, v.label)
        if rundir.exists(RunLayout.of(run).config) and finished(run):
            say(f"wsg study: [{i + 1}/{len(runs)}] {study.factor} = {v.label}: complete, skipped")
            continue
        say(f"wsg study: [{i + 1}/{len(runs)}] {study.factor} = {v.label} -> {run}")
        rc = pipeline.run_all(cfg, run, address=address, verbose=verbose)
        if rc:
            return rc
    table = combine(study_dir, study, runs)
    say(f"wsg study: {0 if table is None else table.num_rows} claim rows over {len(runs)} runs -> "
        f"{combined_path(study_dir)}")
    return 0
