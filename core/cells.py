"""What identifies a grid cell, and its stable, readable id.

A cell is one training run: a loss, the seed of its LoRA initialisation
(`init_seed`), the seed of its data order and sampling (`data_seed`) and a
learning rate. The seed paper (§3.4) shows that the LoRA init alone rotates
ΔW more than the loss does, so the two seeds are separate axes: control
cells that differ from a reference cell in only one of them measure the
noise floor of every geometry number (docs/findings.md).

Ids (the folder name under `<run>/cells/`):

- `<loss>-s<seed>-lr<lr>` when init_seed == data_seed (every grid cell of a
  config without controls), e.g. `dpo-s42-lr5e-07`;
- `<loss>-i<init>-d<data>-lr<lr>` otherwise, e.g. `sft-i43-d42-lr1e-04`;
- either followed by `-h<steps>` for a horizon control: the same cell trained
  on a shorter schedule that ends (LR at its floor) at step <steps>, e.g.
  `sft-s42-lr1e-04-h9` (docs/findings.md "Settled").

The learning rate is written in numpy's shortest round-tripping scientific
form, so parsing an id gives the same float back bit for bit.

An adapter of a cell at a checkpoint is an `AdapterRef` (cell + step), named
`<cell_id>@<step>` in every analysis table (analysis/adapters.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from .errors import WsgError

# Loss names are lower-case words joined by underscores (never hyphens), so the
# first "-s" / "-i" after the name unambiguously starts the seeds.
_LOSS = r"[a-z][a-z0-9_]*"
_LR = r"[0-9.]+(?:e[+-]?\d+)?"
_H = r"(?:-h(?P<h>\d+))?"
_SAME = re.compile(rf"^(?P<loss>{_LOSS})-s(?P<seed>-?\d+)-lr(?P<lr>{_LR}){_H}$")
_SPLIT = re.compile(rf"^(?P<loss>{_LOSS})-i(?P<init>-?\d+)-d(?P<data>-?\d+)-lr(?P<lr>{_LR}){_H}$")


def format_lr(lr: float) -> str:
    return np.format_float_scientific(float(lr), trim="-", exp_digits=2)


@dataclass(frozen=True)
class CellKey:
    """(loss, init_seed, data_seed, lr): everything that tells two cells of
    one config apart. `seed` is the init seed (the grid's `seeds` axis sets
    both seeds to the same value)."""

    loss: str
    init_seed: int
    data_seed: int
    lr: float
    # A horizon control's own train.max_steps (its schedule ends there); None
    # for every other cell, whose id, dict and fingerprint stay as they were.
    horizon: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(_LOSS, self.loss):
            raise WsgError(f"loss name {self.loss!r} cannot form a cell id: use lower-case letters, digits and '_'")
        for name in ("init_seed", "data_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise WsgError(f"{name} must be an integer, got {v!r}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
            raise WsgError(f"learning rate must be a finite number > 0, got lr={lr!r}")
        object.__setattr__(self, "init_seed", int(self.init_seed))
        object.__setattr__(self, "data_seed", int(self.data_seed))
        object.__setattr__(self, "lr", float(lr))
        h = self.horizon
        if h is not None:
            if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
                raise WsgError(f"a horizon (steps) must be an integer >= 1, got {h!r}")
            object.__setattr__(self, "horizon", int(h))

    @classmethod
    def of(cls, loss: str, seed: int, lr: float, *, init_seed: int | None = None,
           data_seed: int | None = None, horizon: int | None = None) -> "CellKey":
        """A cell from the grid's `seed`, with either seed overridden."""
        return cls(loss, seed if init_seed is None else init_seed, seed if data_seed is None else data_seed, lr,
                   horizon)

    @property
    def seed(self) -> int:
        """The grid seed: the init seed (equal to data_seed outside controls)."""
        return self.init_seed

    @property
    def id(self) -> str:
        h = "" if self.horizon is None else f"-h{self.horizon}"
        if self.init_seed == self.data_seed:
            return f"{self.loss}-s{self.init_seed}-lr{format_lr(self.lr)}{h}"
        return f"{self.loss}-i{self.init_seed}-d{self.data_seed}-lr{format_lr(self.lr)}{h}"

    @classmethod
    def parse(cls, cid: str) -> "CellKey":
        """Inverse of `.id`."""
        m = _SAME.match(cid)
        if m:
            return cls(m["loss"], int(m["seed"]), int(m["seed"]), float(m["lr"]), _horizon(m))
        m = _SPLIT.match(cid)
        if m:
            return cls(m["loss"], int(m["init"]), int(m["data"]), float(m["lr"]), _horizon(m))
        raise WsgError(f"{cid!r} is not a cell id of the form <loss>-s<seed>-lr<lr> (e.g. dpo-s42-lr5e-07) "
                       "or <loss>-i<init_seed>-d<data_seed>-lr<lr>")

    def as_dict(self) -> dict:
        d = {"loss": self.loss, "init_seed": self.init_seed, "data_seed": self.data_seed, "lr": self.lr}
        return d if self.horizon is None else {**d, "horizon": self.horizon}

    @property
    def reference(self) -> "CellKey":
        """The cell a horizon control shortens (the cell itself for any other)."""
        return self if self.horizon is None else replace(self, horizon=None)


# Between a cell id and a checkpoint step in an adapter's name.
ADAPTER_SEP = "@"


@dataclass(frozen=True)
class AdapterRef:
    """A cell's adapter at a checkpoint step: what the analysis tables say
    about an adapter (their identity columns are the cell's fields and the
    step). step None: a cell's adapter whose step is unknown (an extra
    adapter named by its cell id alone).

    `name` is the adapter's name in those tables, `<cell_id>@<step>` unless
    it was given under another one (an extra adapter whose name writes the
    LR another way, a table written by hand): rows are joined by name, so it
    is kept as given."""

    cell: CellKey
    step: int | None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.cell, CellKey):
            raise WsgError(f"an adapter's cell must be a CellKey, got {self.cell!r}")
        s = self.step
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise WsgError(f"a checkpoint step must be an integer, got {s!r}")
            object.__setattr__(self, "step", int(s))
        if not self.name:
            tail = "" if self.step is None else f"{ADAPTER_SEP}{self.step}"
            object.__setattr__(self, "name", self.cell.id + tail)

    @classmethod
    def parse(cls, name: str) -> "AdapterRef":
        """The cell and step of an adapter named `<cell_id>@<step>` (the name kept as given)."""
        head, sep, tail = name.rpartition(ADAPTER_SEP)
        if not sep or not tail.isdigit():
            raise WsgError(f"{name!r} is not an adapter name of the form <cell_id>@<step> (e.g. sft-s42-lr1e-04@12)")
        return cls(CellKey.parse(head), int(tail), name)


def _horizon(m: re.Match) -> int | None:
    return None if m["h"] is None else int(m["h"])


def cell_id(loss: str, seed: int, lr: float) -> str:
    """`cell_id("dpo", 42, 5e-7) == "dpo-s42-lr5e-07"` (init seed = data seed)."""
    return CellKey(loss, seed, seed, lr).id


def parse_cell_id(cid: str) -> tuple[str, int, float]:
    """(loss, init seed, lr) of an id; see CellKey.parse for both seeds."""
    k = CellKey.parse(cid)
    return k.loss, k.init_seed, k.lr
