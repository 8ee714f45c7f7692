"""Which adapters a run's analyses cover (docs/design.md, "Run layout").

Every complete checkpoint `<run>/cells/<cell_id>/step_<N>/` (a PEFT folder
with its `_COMPLETE` marker) of every cell, filtered by `analysis.steps`, plus
`analysis.extra_adapters`. An adapter is named `<cell_id>@<step>`; the same
name is the `adapter`/`model` column of every analysis table (geometry, eval,
LMC, CKA, logit lens), so the report can join them. The base model is `base`.

Cell ids (`<loss>-s<seed>-lr<lr>`, or `<loss>-i<init>-d<data>-lr<lr>` for
control cells whose LoRA-init and data-order seeds differ) are read by
`core.cells.CellKey.parse`, the one parser. An analysed adapter knows its
cell (`Adapter.cell`, a CellKey); what the analysis tables say about it (the
identity columns of the geometry tables, issue 13 item 4) is its
`core.cells.AdapterRef`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

from ..core import rundir
from ..core.cells import ADAPTER_SEP, AdapterRef, CellKey
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..core.models import cache_root

BASE = "base"
SEP = ADAPTER_SEP
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Extra adapter names become file names (eval/models/<name>.parquet) and
# table keys: keep them to a safe alphabet.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+\-]*$")


@dataclass(frozen=True)
class Adapter:
    """One analysed adapter: `path` is a local folder, `uri` where it lives,
    `cell` the grid cell it is a checkpoint of (None for an extra adapter
    whose name is not a cell's)."""

    name: str
    path: str
    uri: str
    step: int  # -1 when unknown (extra adapters)
    cell: Optional[CellKey] = None

    @property
    def ref(self) -> Optional[AdapterRef]:
        """Its identity in the analysis tables; None for an adapter that is
        not a cell's, and for a horizon control (its identity columns would
        repeat its reference cell's; its name tells it apart)."""
        if self.cell is None or self.cell.horizon is not None:
            return None
        return AdapterRef(self.cell, None if self.step < 0 else self.step, self.name)


def adapter_refs(adapters: list[Adapter]) -> dict[str, AdapterRef]:
    """name -> AdapterRef of every adapter that is a grid cell's checkpoint
    (`run_geometry(..., cells=adapter_refs(list_adapters(cfg, run)))`)."""
    return {a.name: a.ref for a in adapters if a.ref is not None}


def _parse(cell_id: str) -> Optional[CellKey]:
    try:
        return CellKey.parse(cell_id)
    except WsgError:
        return None


def adapter_name(cell_id: str, step: int) -> str:
    return f"{cell_id}{SEP}{int(step)}"


def split_name(name: str) -> tuple[str, Optional[int]]:
    """`sft-s42-lr1e-04@12` -> ("sft-s42-lr1e-04", 12); names without a step -> (name, None)."""
    head, sep, tail = name.rpartition(SEP)
    if sep and tail.isdigit():
        return head, int(tail)
    return name, None


def cell_of(name: str) -> Optional[CellKey]:
    """The cell of an analysis table's adapter name (`<cell_id>@<step>` or a
    cell id alone); None for `base` and extra adapters whose names are not
    cell ids. Used by the report to label and group rows."""
    return _parse(split_name(name)[0])


def step_of(name: str) -> int:
    """The checkpoint step of an adapter name; -1 when it has none."""
    step = split_name(name)[1]
    return -1 if step is None else step


def local_copy(uri: str) -> str:
    """A local folder with the adapter's files (object-store runs are copied
    once into the user cache, keyed by the URI).

    Several workers of one node may copy the same adapter at once (the
    functional stage's units): each downloads into its own temporary folder
    and renames it into place whole, so no reader ever sees a folder whose
    marker is there before its weights."""
    if rundir.is_local(uri):
        return rundir.resolve(uri)[1]

    dest = cache_root() / "adapters" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if rundir.is_complete(str(dest)):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent)
    try:
        rundir.download_dir(uri, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dest.exists() and not rundir.is_complete(str(dest)):
            shutil.rmtree(dest, ignore_errors=True)  # a copy from before downloads were atomic
        try:
            os.rename(tmp, dest)
        except OSError:  # another worker's copy landed first: the same bytes
            if not rundir.is_complete(str(dest)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _select_steps(steps: list[int], rule) -> list[int]:
    if rule == "all":
        return steps
    if rule == "last":
        return steps[-1:]
    return [s for s in steps if s in set(rule)]


def list_adapters(cfg, run: str | RunLayout, *, models: bool = False) -> list[Adapter]:
    """Every analysed adapter of the run, cells sorted by id then step, then
    extras. models=True: only the checkpoints the model-level analyses serve
    (`analysis.model_steps`, a subset of `analysis.steps`: eval and the
    functional stage load a model per adapter, geometry reads factors)."""
    out: list[Adapter] = []
    lay = RunLayout.of(run)
    for cell in lay.cell_ids():
        key = _parse(cell)
        if key is None:
            continue  # not a cell folder (e.g. a temp file)
        cl = lay.cell(cell)
        steps = sorted(int(m[1]) for d in rundir.listdir(cl.root)
                       if (m := _STEP_DIR.match(d)) and rundir.is_complete(cl.step(int(m[1]))))
        if key.horizon is not None:
            # A horizon control feeds only the settle rule (analysis/settle.py),
            # which compares its final ΔW with its reference's: geometry reads
            # that one checkpoint, eval and the functional stage none (and it
            # has no identity columns: Adapter.ref).
            if not models and steps:
                uri = cl.step(steps[-1])
                out.append(Adapter(name=adapter_name(cell, steps[-1]), path=local_copy(uri), uri=uri,
                                   step=steps[-1], cell=key))
            continue
        chosen = _select_steps(steps, cfg.analysis.steps)
        for step in _select_steps(chosen, cfg.analysis.model_steps) if models else chosen:
            uri = cl.step(step)
            out.append(Adapter(name=adapter_name(cell, step), path=local_copy(uri), uri=uri, step=step, cell=key))
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
        # An extra named `<cell_id>@<step>` is taken as that cell's checkpoint, as the report
        # does (a horizon control's id as its reference cell's).
        cell = cell_of(name)
        out.append(Adapter(name=name, path=local_copy(path), uri=path, step=step_of(name),
                           cell=None if cell is None else cell.reference))
        taken.add(name)
    return out


def discover_adapters(cfg, run: str) -> dict[str, str]:
    """name -> local folder of every analysed adapter (the pipeline's geometry input)."""
    return {a.name: a.path for a in list_adapters(cfg, run)}


def _pairing_cell(a: Adapter) -> Optional[CellKey]:
    """The cell reference pairs read: none for a horizon control (it feeds
    only the settle rule, analysis/settle.py)."""
    return a.cell if a.cell is not None and a.cell.horizon is None else None


def _ref_choice(refs: list[Adapter], other: Adapter) -> Adapter:
    """The reference cell to compare `other` with: same seeds (init and data)
    and LR, else the same seeds (losses such as DPO train at a scaled LR,
    seed §2), else the same init seed, else the first."""
    o = _pairing_cell(other)
    if o is None:
        return refs[0]
    same = lambda r: (r.cell.init_seed, r.cell.data_seed) == (o.init_seed, o.data_seed)  # noqa: E731
    for pick in (lambda r: same(r) and r.cell.lr == o.lr, same, lambda r: r.cell.init_seed == o.init_seed):
        hit = [r for r in refs if pick(r)]
        if hit:
            return hit[0]
    return refs[0]


def reference_pairs(adapters: list[Adapter], reference_loss: str) -> list[tuple[str, str]]:
    """(reference, other) name pairs at the same checkpoint step.

    Per step, the reference cells (loss == reference_loss) sorted by seed and LR,
    control cells (init seed != data seed) after the others; the first is the
    primary one. Every other reference cell is paired with the
    primary (the seed/LR comparisons of seed Fig. 2), every other cell with its
    matching reference (`_ref_choice`). Adapters without a step (extras) are
    compared with the primary reference of the last step.
    """
    def is_ref(a: Adapter) -> bool:
        c = _pairing_cell(a)
        return c is not None and c.loss == reference_loss

    steps = sorted({a.step for a in adapters if a.step >= 0})
    pairs: list[tuple[str, str]] = []
    last_primary = None
    for step in steps:
        here = [a for a in adapters if a.step == step]
        refs = sorted((a for a in here if is_ref(a)),
                      key=lambda a: (a.cell.init_seed != a.cell.data_seed, a.cell.init_seed, a.cell.data_seed,
                                     a.cell.lr, a.name))
        if not refs:
            continue
        primary = refs[0]
        last_primary = primary
        for a in here:
            if a.name == primary.name:
                continue
            ref = primary if is_ref(a) else _ref_choice(refs, a)
            pairs.append((ref.name, a.name))
    if last_primary is not None:
        pairs += [(last_primary.name, a.name) for a in adapters if a.step < 0]
    return pairs
