"""Adapter arguments and compatibility checks of the geometry stage
(docs/geometry.md). Reading adapters is analysis/lora_io.py's.

Every problem a user can cause (bad NAME=PATH, mismatched module sets or
shapes) raises `WsgError` naming the file, module and shapes, so the CLI
prints it with exit code 2 and no traceback.
"""
from __future__ import annotations

import os

from ..core.errors import WsgError
from .lora_io import CONFIG_FILE, WEIGHTS_FILE, AdapterSpec


def parse_adapter_args(items: list[str]) -> dict[str, str]:
    """`["sft=/runs/a", "dpo=/runs/b"]` -> {"sft": "/runs/a", "dpo": "/runs/b"}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise WsgError(f"--adapter {item!r}: expected NAME=PATH (e.g. --adapter sft=runs/x/cells/sft-s42-lr1e-05/step_100)")
        if name in out:
            raise WsgError(f"--adapter name {name!r} is given twice ({out[name]} and {path}); give each adapter its own name")
        if not os.path.isdir(path):
            raise WsgError(f"--adapter {name}={path}: no such folder; give a PEFT adapter folder "
                           f"(with {CONFIG_FILE} and {WEIGHTS_FILE})")
        out[name] = path
    return out


def check_compatible(specs: list[AdapterSpec]) -> None:
    """Same module set and same base shapes (d_out x d_in) for every adapter;
    ranks may differ. The message names the module and the shapes."""
    ref = specs[0]
    for other in specs[1:]:
        only_ref = sorted(set(ref.modules) - set(other.modules))
        only_other = sorted(set(other.modules) - set(ref.modules))
        if only_ref or only_other:
            mod, has, lacks = (only_ref[0], ref, other) if only_ref else (only_other[0], other, ref)
            n = len(only_ref) + len(only_other)
            raise WsgError(f"module {mod} is in adapter {has.name!r} but not in {lacks.name!r} "
                           f"({n} module(s) differ); geometry compares adapters over the same modules "
                           "(same target_modules on the same base model)")
        for mod, a in ref.modules.items():
            b = other.modules[mod]
            if (a.d_out, a.d_in) != (b.d_out, b.d_in):
                raise WsgError(f"module {mod}: adapter {ref.name!r} has dW shape {a.d_out}x{a.d_in} (d_out x d_in) "
                               f"but {other.name!r} has {b.d_out}x{b.d_in}; the adapters are for different base models")
