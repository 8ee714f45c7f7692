"""Stable, readable cell ids: `<loss>-s<seed>-lr<lr>` (DESIGN.md "Run directory").

The learning rate is written with numpy's shortest round-tripping scientific
form, so `5e-7` gives `dpo-s42-lr5e-07` and parsing the id gives the same
float back bit for bit.
"""
from __future__ import annotations

import re

import numpy as np

from sweep.errors import WsgError

# Loss names are lower-case words joined by underscores (never hyphens), so the
# first "-s" after the name unambiguously starts the seed.
_CELL_RE = re.compile(r"^(?P<loss>[a-z][a-z0-9_]*)-s(?P<seed>-?\d+)-lr(?P<lr>[0-9.]+(?:e[+-]?\d+)?)$")


def format_lr(lr: float) -> str:
    return np.format_float_scientific(float(lr), trim="-", exp_digits=2)


def cell_id(loss: str, seed: int, lr: float) -> str:
    """`cell_id("dpo", 42, 5e-7) == "dpo-s42-lr5e-07"`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", loss):
        raise WsgError(f"loss name {loss!r} cannot form a cell id: use lower-case letters, digits and '_'")
    if float(lr) <= 0 or not np.isfinite(lr):
        raise WsgError(f"learning rate must be a finite number > 0, got {lr!r}")
    return f"{loss}-s{int(seed)}-lr{format_lr(lr)}"


def parse_cell_id(cid: str) -> tuple[str, int, float]:
    """Inverse of `cell_id`: returns (loss, seed, lr)."""
    m = _CELL_RE.match(cid)
    if not m:
        raise WsgError(f"{cid!r} is not a cell id of the form <loss>-s<seed>-lr<lr>, e.g. dpo-s42-lr5e-07")
    return m["loss"], int(m["seed"]), float(m["lr"])
