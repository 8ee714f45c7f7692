"""Benchmark: a finished grid against the ideal schedule of its own step times.

Reads a local run's cells (`cells/*/status.json` timelines: worker entered,
set-up done, loop done; `metrics.parquet` step times; `cell.json`: online or
not) and prints the grid's span against its baseline, the ideal schedule
measured in the same run: the online cells (each holds both CPUs of the
2-core box) one after the other, plus the offline cells' step time spread
evenly over the slots. Also each cell's set-up (trial start -> first step):
after a worker's first cell it shows what a shared worker saves.

    .venv/bin/python bench/grid_vs_ideal.py RUN [RUN ...] [--slots 2]

Results: docs/benchmarks.md ("The default's grid against its ideal").
"""
from __future__ import annotations

import argparse

from wsg.core import rundir
from wsg.core.layout import RunLayout


def cells(run: str) -> list[dict]:
    """Every trained cell of the run with its timeline, in start order."""
    lay, out = RunLayout.of(run), []
    for cid in lay.cell_ids():
        cl = lay.cell(cid)
        if not all(rundir.exists(p) for p in (cl.status, cl.metrics, cl.spec)):
            continue
        status = rundir.read_json(cl.status)
        t = status.get("timeline") or {}
        if not {"worker_entered", "setup_done", "loop_done"} <= set(t):
            continue
        steps = rundir.read_table(cl.metrics, ["step_time_s"]).column(0).to_pylist()
        out.append({"id": cid, "pid": status.get("pid"), "entered": t["worker_entered"],
                    "setup": t["setup_done"] - t["worker_entered"], "done": t["loop_done"],
                    "steps": float(sum(steps)), "online": bool(rundir.read_json(cl.spec).get("online"))})
    return sorted(out, key=lambda c: c["entered"])


def report(run: str, slots: int) -> dict:
    cs = cells(run)
    if not cs:
        raise SystemExit(f"{run}: no trained cell with a timeline (cells/*/status.json)")
    t0 = cs[0]["entered"]
    span = max(c["done"] for c in cs) - t0
    online = sum(c["steps"] for c in cs if c["online"])
    offline = sum(c["steps"] for c in cs if not c["online"])
    ideal = online + offline / slots
    seen_pids, later = set(), []
    for c in cs:
        print(f"  {c['id']:28s} pid {c['pid']}  starts {c['entered'] - t0:7.1f} s  set-up {c['setup']:5.1f} s  "
              f"steps {c['steps']:6.1f} s  ends {c['done'] - t0:7.1f} s")
        if c["pid"] in seen_pids and not c["online"]:
            later.append(c["setup"])
        seen_pids.add(c["pid"])
    print(f"{run}: span {span:.0f} s, ideal {ideal:.0f} s (online {online:.0f} s in turn + offline "
          f"{offline:.0f} s over {slots} slots): span / ideal = {span / ideal:.2f}x; offline cells after a "
          f"worker's first start their first step in {min(later, default=0):.1f}-{max(later, default=0):.1f} s")
    return {"span": span, "ideal": ideal, "ratio": span / ideal, "later_setup": later}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished local run folders")
    ap.add_argument("--slots", type=int, default=2, help="one-CPU cell slots (default 2: the 2-core box)")
    a = ap.parse_args()
    for run in a.runs:
        report(run, a.slots)


if __name__ == "__main__":
    main()
