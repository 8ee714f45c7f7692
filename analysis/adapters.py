"""Which adapters a run's analyses cover (DESIGN.md "Run directory").

Every complete checkpoint `<run>/cells/<cell_id>/step_<N>/` (a PEFT folder
with its `_COMPLETE` marker) of every cell, filtered by `analysis.steps`, plus
`analysis.extra_adapters`. An adapter is named `<cell_id>@<step>`; the same
name is the `adapter`/`model` column of every analysis table (geometry, eval,
LMC, CKA, logit lens), so the report can join them. The base model is `base`.

`analysis` never imports `train` (common rules), so the cell id format
`<loss>-s<seed>-lr<lr>` (train/cell_id.py) is parsed here from its text.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from analysis.lora_io import content_hash  # noqa: F401  (evaluate/functional import it from here)
from sweep import rundir
from sweep.errors import WsgError

BASE = "base"
SEP = "@"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CELL_ID = re.compile(r"^(?P<loss>[a-z][a-z0-9_]*)-s(?P<seed>-?\d+)-lr(?P<lr>[0-9.]+(?:e[+-]?\d+)?)$")
# Extra adapter names become file names (eval/models/<name>.parquet) and
# table keys: keep them to a safe alphabet.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+\-]*$")


@dataclass(frozen=True)
class Adapter:
    """One analysed adapter: `path` is a local folder, `uri` where it lives."""

    name: str
    path: str
    uri: str
    step: int  # -1 when unknown (extra adapters)
    cell_id: Optional[str] = None
    loss: Optional[str] = None
    seed: Optional[int] = None
    lr: Optional[float] = None


def parse_cell_id(cell_id: str) -> tuple[str, int, float]:
    """`dpo-s42-lr5e-07` -> ("dpo", 42, 5e-07)."""
    m = _CELL_ID.match(cell_id)
    if not m:
        raise WsgError(f"cell id {cell_id!r} does not read as <loss>-s<seed>-lr<lr> (e.g. dpo-s42-lr5e-07)")
    return m["loss"], int(m["seed"]), float(m["lr"])


def adapter_name(cell_id: str, step: int) -> str:
    return f"{cell_id}{SEP}{int(step)}"


def split_name(name: str) -> tuple[str, Optional[int]]:
    """`sft-s42-lr1e-04@12` -> ("sft-s42-lr1e-04", 12); names without a step -> (name, None)."""
    head, sep, tail = name.rpartition(SEP)
    if sep and tail.isdigit():
        return head, int(tail)
    return name, None


def describe(name: str) -> dict:
    """Loss/seed/lr/step of an analysis table's adapter name (None where unknown).

    Used by the report to label and group rows; `base` and extra adapters
    whose names are not cell ids get loss None.
    """
    cell, step = split_name(name)
    try:
        loss, seed, lr = parse_cell_id(cell)
    except WsgError:
        loss, seed, lr = None, None, None
    return {"name": name, "cell_id": cell if loss else None, "loss": loss, "seed": seed, "lr": lr,
            "step": -1 if step is None else step}


def local_copy(uri: str) -> str:
    """A local folder with the adapter's files (object-store runs are copied
    once into the user cache, keyed by the URI)."""
    if rundir.is_local(uri):
        return rundir.resolve(uri)[1]
    from sweep.models import cache_root

    dest = cache_root() / "adapters" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not rundir.is_complete(str(dest)):
        rundir.download_dir(uri, str(dest))
    return str(dest)


def _select_steps(steps: list[int], rule) -> list[int]:
    if rule == "all":
        return steps
    if rule == "last":
        return steps[-1:]
    return [s for s in steps if s in set(rule)]


def list_adapters(cfg, run: str) -> list[Adapter]:
    """Every analysed adapter of the run, cells sorted by id then step, then extras."""
    out: list[Adapter] = []
    cells_root = rundir.join(run, "cells")
    for cell in rundir.listdir(cells_root):
        try:
            loss, seed, lr = parse_cell_id(cell)
        except WsgError:
            continue  # not a cell folder (e.g. a temp file)
        steps = sorted(int(m[1]) for d in rundir.listdir(rundir.cell_dir(run, cell))
                       if (m := _STEP_DIR.match(d)) and rundir.is_complete(rundir.step_dir(run, cell, int(m[1]))))
        for step in _select_steps(steps, cfg.analysis.steps):
            uri = rundir.step_dir(run, cell, step)
            out.append(Adapter(name=adapter_name(cell, step), path=local_copy(uri), uri=uri, step=step,
                               cell_id=cell, loss=loss, seed=seed, lr=lr))
    taken = {a.name for a in out} | {BASE}
    for name, path in cfg.analysis.extra_adapters.items():
        if not _SAFE_NAME.match(name):
            raise WsgError(f"analysis.extra_adapters: name {name!r} must use letters, digits and _.@+- only "
                           "(it becomes a file name and a table key); rename it")
        if name in taken:
            raise WsgError(f"analysis.extra_adapters: name {name!r} clashes with a run adapter or 'base'; rename it")
        if not rundir.exists(rundir.join(path, "adapter_config.json")):
            raise WsgError(f"analysis.extra_adapters.{name}: {path} is not a PEFT adapter folder "
                           "(no adapter_config.json); give the folder written by save_pretrained")
        cell, step = split_name(name)
        info = describe(name)
        out.append(Adapter(name=name, path=local_copy(path), uri=path, step=-1 if step is None else step,
                           cell_id=info["cell_id"], loss=info["loss"], seed=info["seed"], lr=info["lr"]))
        taken.add(name)
    return out


def discover_adapters(cfg, run: str) -> dict[str, str]:
    """name -> local folder of every analysed adapter (the pipeline's geometry input)."""
    return {a.name: a.path for a in list_adapters(cfg, run)}


def _ref_choice(refs: list[Adapter], other: Adapter) -> Adapter:
    """The reference cell to compare `other` with: same seed and LR, else the
    same seed (losses such as DPO train at a scaled LR, seed §2), else the first."""
    for pick in (lambda r: r.seed == other.seed and r.lr == other.lr, lambda r: r.seed == other.seed):
        hit = [r for r in refs if pick(r)]
        if hit:
            return hit[0]
    return refs[0]


def reference_pairs(adapters: list[Adapter], reference_loss: str) -> list[tuple[str, str]]:
    """(reference, other) name pairs at the same checkpoint step.

    Per step, the reference cells (loss == reference_loss) sorted by seed and LR;
    the first is the primary one. Every other reference cell is paired with the
    primary (the seed/LR comparisons of seed Fig. 2), every other cell with its
    matching reference (`_ref_choice`). Adapters without a step (extras) are
    compared with the primary reference of the last step.
    """
    steps = sorted({a.step for a in adapters if a.step >= 0})
    pairs: list[tuple[str, str]] = []
    last_primary = None
    for step in steps:
        here = [a for a in adapters if a.step == step]
        refs = sorted((a for a in here if a.loss == reference_loss), key=lambda a: (a.seed, a.lr, a.name))
        if not refs:
            continue
        primary = refs[0]
        last_primary = primary
        for a in here:
            if a.name == primary.name:
                continue
            ref = primary if a.loss == reference_loss else _ref_choice(refs, a)
            pairs.append((ref.name, a.name))
    if last_primary is not None:
        pairs += [(last_primary.name, a.name) for a in adapters if a.step < 0]
    return pairs
