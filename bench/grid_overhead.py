"""Benchmark: what a grid pays besides its training steps, shared worker
processes (train/shared.py) against a fresh Ray Train worker group per cell,
measured in the same run on the same rollouts.

The embedded default's grid (all its cells, its rollouts made once by the
rollouts stage), trained twice into two run folders: `resources.share_workers`
on (the default) and off. For each: the grid's wall time against the ideal
schedule of its own recorded step times (the baseline: the cells' compute,
measured in the same run), and each cell's trial start → first step (run_cell
entered → the first step begins; the issue's target: ≤ 3 s for every offline
cell after the first on a worker). The ideal schedule on `--slots` one-CPU
slots: an offline cell holds one slot, an online cell two (trainer + engine),
so ideal = max(longest cell, (Σ offline steps + 2 Σ online steps) / slots).

    .venv/bin/python bench/grid_overhead.py [--steps 12] [--only shared|fresh]

Results: docs/benchmarks.md ("Cell overhead").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/rollouts.py shadows the package
sys.path.insert(0, os.path.dirname(_HERE))


def _cfg(path: str | None, steps: int | None, shared: bool):
    from wsg.core.config import default_config_path
    from wsg.sweep.config import load_config, parse_config

    d = load_config(path or default_config_path()).model_dump(mode="json")
    if steps:
        d["train"].update(max_steps=steps, checkpoint_steps=[steps])
    d["resources"]["share_workers"] = shared
    return parse_config(d)


def _cells(cfg, run: str) -> list[dict]:
    import pyarrow.parquet as pq
    from wsg.core import rundir
    from wsg.core.layout import RunLayout
    from wsg.sweep.grid import is_online, plan_cells

    out = []
    for key in plan_cells(cfg):
        cl = RunLayout.of(run).cell(key.id)
        done, rows = rundir.read_json(cl.complete_marker), pq.read_table(cl.metrics).to_pylist()
        tl = done["timeline"]
        out.append({"cell": key.id, "online": is_online(key), "steps_s": sum(r["step_time_s"] for r in rows),
                    "start_to_first_step_s": tl["setup_done"] - tl["started"], "started": tl["started"],
                    "pid": rundir.read_json(cl.status).get("pid"), "wall_s": done["wall_s"]})
    return out


def measure(cfg, run: str, slots: int) -> dict:
    from wsg.sweep.grid import run_grid

    t0 = time.time()
    run_grid(cfg, run)
    wall = time.time() - t0
    cells = _cells(cfg, run)
    off = sum(c["steps_s"] for c in cells if not c["online"])
    on = sum(c["steps_s"] for c in cells if c["online"])
    ideal = max(max(c["steps_s"] for c in cells), (off + 2 * on) / slots)
    first_on_pid: dict = {}
    for c in sorted(cells, key=lambda c: c["started"]):
        c["first_on_worker"] = first_on_pid.setdefault(c["pid"], c["cell"]) == c["cell"]
    later = [c["start_to_first_step_s"] for c in cells if not c["online"] and not c["first_on_worker"]]
    return {"grid_wall_s": wall, "sum_steps_s": off + on, "ideal_s": ideal, "ratio": wall / ideal,
            "max_start_to_first_step_later_offline_s": max(later) if later else None, "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: the embedded default)")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the config's)")
    ap.add_argument("--slots", type=int, default=2, help="one-CPU slots of the box (its CPUs)")
    ap.add_argument("--only", choices=["shared", "fresh"], default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from wsg.core.session import session
    from wsg.rollouts.stage import run_rollouts

    modes = [m for m in ("shared", "fresh") if args.only in (None, m)]
    res = {}
    with session():
        base = tempfile.mkdtemp(prefix="wsg-bench-grid-", dir=args.workdir)
        rollouts = os.path.join(base, "rollouts")
        run_rollouts(_cfg(args.config, args.steps, True), rollouts, progress=False)
        for mode in modes:
            run = os.path.join(base, mode)
            os.makedirs(run)
            os.symlink(os.path.join(rollouts, "rollouts"), os.path.join(run, "rollouts"))
            r = res[mode] = measure(_cfg(args.config, args.steps, mode == "shared"), run, args.slots)
            print(f"{mode}: grid {r['grid_wall_s']:.0f} s, ideal {r['ideal_s']:.0f} s (Σ steps "
                  f"{r['sum_steps_s']:.0f} s): {r['ratio']:.2f}x the ideal; slowest start → first step of an "
                  f"offline cell after a worker's first: {r['max_start_to_first_step_later_offline_s']}", flush=True)
            for c in r["cells"]:
                print(f"  {c['cell']:<28} steps {c['steps_s']:6.1f} s  start → first step "
                      f"{c['start_to_first_step_s']:5.1f} s  pid {c['pid']}{'  (first on its worker)' if c['first_on_worker'] else ''}")
    if len(res) == 2:
        print(f"grid wall, shared / fresh: {res['shared']['grid_wall_s'] / res['fresh']['grid_wall_s']:.2f}x")
    print(json.dumps({"bench": "grid_overhead", "steps": args.steps,
                      "results": {m: {k: v for k, v in r.items() if k != "cells"} for m, r in res.items()}}))


if __name__ == "__main__":  # vLLM engines spawn processes: keep the guard.
    main()
