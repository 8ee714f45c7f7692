"""Problems with gold answers, from the synthetic generator, a hub dataset or a
local file. One entry point, `load_problems(src)`, serves the rollouts stage
(cfg.data) and evaluation (cfg.analysis.eval_sets).

Sources (DataCfg/EvalSetCfg.source) and their default columns:

| source     | default path (hub id)                  | problem col | answer col |
|------------|----------------------------------------|-------------|------------|
| synthetic  | (generated: rollouts/synthetic.py)     | -           | -          |
| deepscaler | agentica-org/DeepScaleR-Preview-Dataset| problem     | answer     |
| gsm8k      | openai/gsm8k (config "main")           | question    | answer, gold after "#### " |
| aime       | AI-MO/aimo-validation-aime             | problem     | answer     |
| jsonl/parquet | (path required)                     | problem     | answer     |

`columns` maps the logical names problem/answer/id onto the file's columns.
`path` is a local .parquet/.jsonl/.json file, a folder of them, an object-store
URI of such a file, or a hub id (loaded with `datasets.load_dataset`, which
needs network: on a cluster). Rows whose gold does not parse are dropped,
counted and reported, as are rows with an empty problem; a dataset with no
usable row is a WsgError naming the file and column.
"""
from __future__ import annotations

import io
import json
import logging
import random
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core import rundir
from ..core.errors import WsgError
from . import synthetic
from .reward import parse_gold

log = logging.getLogger("wsg.rollouts.datasets")

HUB_DEFAULTS = {
    "deepscaler": ("agentica-org/DeepScaleR-Preview-Dataset", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "aime": ("AI-MO/aimo-validation-aime", None),
}
DEFAULT_COLUMNS = {
    "deepscaler": {"problem": "problem", "answer": "answer"},
    "gsm8k": {"problem": "question", "answer": "answer"},
    "aime": {"problem": "problem", "answer": "answer"},
    "jsonl": {"problem": "problem", "answer": "answer"},
    "parquet": {"problem": "problem", "answer": "answer"},
}
LOGICAL_COLUMNS = ("problem", "answer", "id")
_EXAMPLES = 5


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


@dataclass
class LoadReport:
    source: str
    where: str
    n_rows: int = 0          # rows in the file / generated
    n_examined: int = 0      # rows looked at before n_prompts usable ones were found
    n_loaded: int = 0
    n_bad_gold: int = 0
    n_empty_problem: int = 0
    n_excluded: int = 0      # eval sets: candidates dropped because training asks the same problem
    bad_gold_examples: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def load_problems(src) -> list["Problem"]:
    """Problems of a DataCfg or EvalSetCfg (see the module docstring)."""
    problems, report = load_problems_with_report(src)
    return problems


def load_problems_with_report(src, exclude: frozenset | None = None) -> tuple[list[Problem], LoadReport]:
    """exclude: keys (synthetic.problem_key / normalize_text) of problems to
    leave out (an eval set's training problems); None for training itself."""
    source = src.source
    if source == "synthetic":
        return _synthetic(src, exclude)
    columns = _columns(src)
    rows, where = _read_rows(src)
    return _select(rows, columns, src, where, exclude or frozenset())


def training_keys(data) -> frozenset:
    """What the training prompts (a DataCfg) ask: for synthetic data both the
    operation-operands key and the text, else the normalised text."""
    if data.source == "synthetic":
        rows = synthetic.generate(data.family, data.n_prompts, data.seed)
        return frozenset([synthetic.problem_key(r["op"], r["a"], r["b"]) for r in rows]
                         + [synthetic.normalize_text(r["problem"]) for r in rows])
    return frozenset(synthetic.normalize_text(p.problem) for p in load_problems(data))


def load_eval_problems(eval_set, data) -> tuple[list[Problem], LoadReport]:
    """An eval set's problems, disjoint from the training prompts of `data` by
    construction: a candidate that asks a training problem (same operation
    and operands, or the same text) is skipped and the next one drawn. A
    small synthetic family may run out: the set is then smaller than its
    n_prompts (never a repeat), and the report says by how many."""
    probs, report = load_problems_with_report(eval_set, exclude=training_keys(data))
    if len(probs) < eval_set.n_prompts:
        log.warning("eval set %r: %d of n_prompts=%d problems left once the %d training problems are excluded",
                    getattr(eval_set, "name", "?"), len(probs), eval_set.n_prompts, data.n_prompts)
    return probs, report


# ------------------------------------------------------------------ synthetic
def _synthetic(src, exclude: frozenset | None = None) -> tuple[list[Problem], LoadReport]:
    try:
        if exclude is None:
            rows, dropped = synthetic.generate(src.family, src.n_prompts, src.seed), 0
        else:
            rows, dropped = synthetic.generate_excluding(src.family, src.n_prompts, src.seed, exclude)
    except KeyError as exc:
        raise WsgError(f"{_field(src, 'family')}: {exc.args[0]}") from None
    probs = [Problem(r["id"], r["problem"], r["answer"]) for r in rows]
    where = f"synthetic:{src.family}"
    return probs, LoadReport("synthetic", where, len(rows), len(rows) + dropped, len(probs), n_excluded=dropped)


def _field(src, name: str) -> str:
    # DataCfg lives at `data`, EvalSetCfg at analysis.eval_sets[name].
    return f"analysis.eval_sets[{src.name}].{name}" if hasattr(src, "name") else f"data.{name}"


# --------------------------------------------------------------------- files
def _columns(src) -> dict[str, str]:
    bad = [k for k in src.columns if k not in LOGICAL_COLUMNS]
    if bad:
        raise WsgError(f"{_field(src, 'columns')}: unknown key(s) {bad}; map only "
                       f"{list(LOGICAL_COLUMNS)} onto the file's column names")
    return {**DEFAULT_COLUMNS[src.source], **src.columns}


def _read_rows(src) -> tuple[list[dict], str]:
    path = src.path
    if path is None:
        if src.source not in HUB_DEFAULTS:
            raise WsgError(f"{_field(src, 'path')} is required for source {src.source!r}: "
                           "give a local .parquet/.jsonl file")
        path = HUB_DEFAULTS[src.source][0]
    if "://" in path:
        return _read_uri(path), path
    p = Path(path).expanduser()
    if p.is_file():
        return _read_file(p), str(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".parquet", ".jsonl", ".json"))
        split_files = [f for f in files if src.split in f.name]
        files = split_files or files
        if not files:
            raise WsgError(f"{_field(src, 'path')}: folder {str(p)!r} holds no .parquet/.jsonl/.json file")
        return [r for f in files for r in _read_file(f)], str(p)
    if path.startswith((".", "/", "~")) or path.endswith((".parquet", ".jsonl", ".json")):
        raise WsgError(f"{_field(src, 'path')}: file {path!r} does not exist")
    return _read_hub(path, src), f"hub:{path}[{src.split}]"


def _read_file(p: Path) -> list[dict]:
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as exc:  # pyarrow raises several types for bad files
            raise WsgError(f"{str(p)!r} is not a readable Parquet file: {exc}") from None
    return _parse_json_lines(p.read_text(encoding="utf-8"), str(p))


def _read_uri(uri: str) -> list[dict]:
    data = rundir.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return _parse_json_lines(data.decode("utf-8"), uri)


def _parse_json_lines(text: str, where: str) -> list[dict]:
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):  # a JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WsgError(f"{where!r} is not valid JSON: {exc}") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise WsgError(f"{where!r} line {i} is not valid JSON: {exc}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise WsgError(f"{where!r}: every record must be a JSON object with named fields")
    return rows


def _read_hub(hub_id: str, src) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise WsgError(f"{_field(src, 'path')}={hub_id!r} is a hub id but the package "
                       "`datasets` is not installed; pip install datasets or give a local file") from None
    config = HUB_DEFAULTS.get(src.source, (None, None))[1] if hub_id == HUB_DEFAULTS.get(
        src.source, (None,))[0] else None
    try:
        ds = datasets.load_dataset(hub_id, config, split=src.split)
    except Exception as exc:  # network, unknown id, unknown split: all user-fixable
        raise WsgError(f"could not load hub dataset {hub_id!r} split {src.split!r} "
                       f"({type(exc).__name__}: {str(exc)[:300]}); on a machine without network "
                       f"give a local .parquet/.jsonl file as {_field(src, 'path')}") from None
    return [dict(r) for r in ds]


# ----------------------------------------------------------------- selection
_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)


def gold_from_raw(raw: Any, source: str) -> str | None:
    """The gold answer string of a raw answer cell (None if absent)."""
    if raw is None:
        return None
    s = str(raw).strip()
    if source == "gsm8k":
        m = _GSM8K_GOLD.search(s)
        if not m:
            return None
        s = m.group(1).replace(",", "").strip()
    return s or None


def _gold_ok(gold: str) -> bool:
    # On the main thread math_verify's alarm can bound a pathological gold;
    # elsewhere (Ray Train threads) signals are unavailable.
    on_main = threading.current_thread() is threading.main_thread()
    return parse_gold(gold, alarm_s=5 if on_main else None) is not None


def _select(rows: list[dict], columns: dict[str, str], src, where: str, exclude: frozenset = frozenset()):
    report = LoadReport(src.source, where, n_rows=len(rows))
    if not rows:
        raise WsgError(f"{where!r} holds no rows; give a non-empty dataset as {_field(src, 'path')}")
    present = set().union(*(r.keys() for r in rows[: min(len(rows), 100)]))
    for logical in ("problem", "answer"):
        col = columns[logical]
        if col not in present:
            raise WsgError(f"{where!r} has no column {col!r} (for the {logical}); its columns are "
                           f"{sorted(present)}; map it with "
                           f"{_field(src, 'columns')}: {{{logical}: <column>}}")
    if "id" in src.columns and src.columns["id"] not in present:
        raise WsgError(f"{where!r} has no column {src.columns['id']!r} (for the id); its columns "
                       f"are {sorted(present)}")
    # A seeded permutation, read until n_prompts usable rows: exactly n when
    # the file has them, and only as many golds checked as needed.
    order = list(range(len(rows)))
    if src.n_prompts < len(rows):
        random.Random(src.seed).shuffle(order)
    chosen: list[tuple[int, Problem]] = []
    for i in order:
        if len(chosen) >= src.n_prompts:
            break
        report.n_examined += 1
        r = rows[i]
        text = r.get(columns["problem"])
        if text is None or not str(text).strip():
            report.n_empty_problem += 1
            continue
        if exclude and synthetic.normalize_text(text) in exclude:
            report.n_excluded += 1
            continue
        gold = gold_from_raw(r.get(columns["answer"]), src.source)
        if gold is None or not _gold_ok(gold):
            report.n_bad_gold += 1
            if len(report.bad_gold_examples) < _EXAMPLES:
                report.bad_gold_examples.append({"row": i, "answer": str(r.get(columns["answer"]))[:200]})
            continue
        pid = str(r[columns["id"]]) if "id" in columns and columns["id"] in r else f"{src.source}-{i:06d}"
        chosen.append((i, Problem(pid, str(text).strip(), gold)))
    chosen.sort(key=lambda t: t[0])  # keep the file's order
    probs = [p for _, p in chosen]
    report.n_loaded = len(probs)
    if report.n_bad_gold or report.n_empty_problem:
        log.warning("%s: dropped %d row(s) with an unparseable gold answer (column %r) and %d with an "
                    "empty problem (column %r); examples: %s", where, report.n_bad_gold,
                    columns["answer"], report.n_empty_problem, columns["problem"],
                    report.bad_gold_examples)
    if not probs:
        raise WsgError(f"{where!r}: none of {report.n_examined} rows is usable ({report.n_bad_gold} "
                       f"unparseable gold answers in column {columns['answer']!r}, "
                       f"{report.n_empty_problem} empty problems in column {columns['problem']!r})")
    ids = [p.id for p in probs]
    if len(set(ids)) != len(ids):
        raise WsgError(f"{where!r}: the id column {columns.get('id')!r} has repeated values; "
                       "ids must be unique (or drop the id mapping to number the rows)")
    return probs, report
