"""Benchmark: what a cell costs beyond its training steps.

One offline cell (sft) and one online cell (online_grpo) of the embedded
default (SmolLM2-135M-Instruct, LoRA r=16, 12 steps), run one after the
other in one Ray session through `train.cell.run_cell` in a fresh Ray Train
worker group each (`wsg train`'s path; the grid now trains such cells in
shared worker processes: bench/grid_overhead.py measures both). For each:
the cell's wall time against the sum of its step times (ratio = wall / Σ steps: the baseline is the cell's own compute,
measured in the same run), and where the rest went, from the cell's
timeline (status.json): validation and data building on the driver, Ray
Train's start (controller, worker group, process group), the worker's setup
(model load, LoRA, resume, engine start for online cells), checkpoints, and
teardown. For the online cell also generation / reward / training / sync
and the ratio wall / (generation + training).

The rollouts are the scripted teacher's (not what is measured here; it saves
the rollouts stage's minute).

    .venv/bin/python bench/cell_overhead.py [--steps 12] [--skip-online]

Results: docs/benchmarks.md ("Cell overhead").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Run as a script, this folder is sys.path[0] and bench/rollouts.py would
# shadow the `rollouts` package: look packages up from the repo instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))


def make_cfg(steps: int):
    from wsg.core.config import default_config_path
    from wsg.sweep.config import load_config, parse_config

    d = load_config(default_config_path()).model_dump(mode="json")
    d["rollouts"].update(backend="scripted", scripted_error_rate=0.5)
    d["train"].update(max_steps=steps, checkpoint_steps=sorted({max(1, steps // 2), steps}))
    d["grid"].update(losses=["sft", "online_grpo"], controls={})
    return parse_config(d)


def _sum(rows: list[dict], key: str) -> float:
    return float(sum(r.get(key) or 0.0 for r in rows))


def measure(cfg, run: str, loss: str) -> dict:
    import pyarrow.parquet as pq
    from wsg.core.cells import CellKey
    from wsg.core.layout import RunLayout
    from wsg.train.cell import run_cell

    t0 = time.time()
    out = run_cell(cfg, run, CellKey.of(loss, 42, 1e-4))
    wall = time.time() - t0
    rows = pq.read_table(RunLayout.of(run).cell(out["cell_id"]).metrics).to_pylist()
    tl = out["timeline"]
    steps = _sum(rows, "step_time_s")
    res = {"loss": loss, "steps": len(rows), "wall_s": wall, "steps_s": steps, "overhead_s": wall - steps,
           "ratio": wall / steps,
           "validate_s": tl["fit_started"] - tl["started"],
           "train_start_s": tl["worker_entered"] - tl["fit_started"],
           "setup_s": tl["setup_done"] - tl["worker_entered"],
           "checkpoint_s": tl["checkpoint_s"],
           "teardown_s": tl["fit_done"] - tl["loop_done"],
           "summarise_s": t0 + wall - tl["fit_done"]}
    if loss.startswith("online"):
        res.update({k: _sum(rows, k) for k in ("gen_s", "reward_s", "train_s", "sync_s")})
        res["ratio_gen_train"] = wall / (res["gen_s"] + res["train_s"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from wsg.core.session import session
    from wsg.rollouts.stage import run_rollouts

    cfg = make_cfg(args.steps)
    run = tempfile.mkdtemp(prefix="wsg-bench-cell-", dir=args.workdir)
    results = []
    with session():
        run_rollouts(cfg, run, progress=False)
        for loss in ["sft"] + ([] if args.skip_online else ["online_grpo"]):
            r = measure(cfg, run, loss)
            results.append(r)
            print(f"{loss}: wall {r['wall_s']:.1f} s = steps {r['steps_s']:.1f} s + overhead {r['overhead_s']:.1f} s "
                  f"(wall / steps {r['ratio']:.2f}x)", flush=True)
            print(f"  validate {r['validate_s']:.1f} s, Ray Train start {r['train_start_s']:.1f} s, setup "
                  f"{r['setup_s']:.1f} s, checkpoints {r['checkpoint_s']:.1f} s, teardown {r['teardown_s']:.1f} s, "
                  f"summary {r['summarise_s']:.1f} s", flush=True)
            if "gen_s" in r:
                print(f"  generation {r['gen_s']:.1f} s, reward {r['reward_s']:.1f} s, training {r['train_s']:.1f} s, "
                      f"sync {r['sync_s']:.1f} s; wall / (generation + training) {r['ratio_gen_train']:.2f}x",
                      flush=True)
    print(json.dumps({"bench": "cell_overhead", "steps": args.steps, "results": results}))


if __name__ == "__main__":  # vLLM engines spawn processes: keep the guard.
    main()
