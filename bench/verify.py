"""Benchmark: what checking a run's completion markers costs (docs/integrity.md).

A run folder shaped like the embedded default's (configs/smoke.yaml:
SmolLM2-135M, 30 layers, hidden 576, k/v 192, LoRA r=16 on q/k/v/o in fp32;
8 losses + 3 controls = 11 cells × checkpoints 6 and 12), written with the
markers the stages write (random bytes stand in for the weights: hashing
does not look at them). Measured: `wsg verify`'s check of every marker, and
the grid's resume check of every cell (`integrity.revoke`), against the
baseline of reading the same bytes once (ratio = check / read).

    .venv/bin/python bench/verify.py [--cells 11] [--repeat 3]

Results: docs/benchmarks.md ("Verifying a run").
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from wsg.core import integrity, rundir

LAYERS, HIDDEN, KV, R = 30, 576, 192, 16
ADAPTER_BYTES = 4 * LAYERS * (2 * R * (HIDDEN + HIDDEN) + 2 * R * (HIDDEN + KV))


def build(run: str, cells: int) -> None:
    rundir.write_text(rundir.join(run, "config.yaml"), "# a default-sized run\n")
    for c in range(cells):
        cell = rundir.join(run, "cells", f"c{c}")
        files = []
        for s in (6, 12):
            with tempfile.TemporaryDirectory() as src:
                with open(os.path.join(src, "adapter_model.safetensors"), "wb") as f:
                    f.write(os.urandom(ADAPTER_BYTES))
                with open(os.path.join(src, "adapter_config.json"), "w") as f:
                    f.write("{}" * 400)
                rundir.upload_dir(src, rundir.join(cell, f"step_{s}"), root=run)
            files += [rundir.join(cell, f"step_{s}", n) for n in ("adapter_model.safetensors", "adapter_config.json")]
        rundir.write_bytes(rundir.join(cell, "metrics.parquet"), os.urandom(20_000))
        rundir.mark_complete(cell, {}, files=files + [rundir.join(cell, "metrics.parquet")], root=run)


def read_all(run: str) -> int:
    n = 0
    for dirpath, _, names in os.walk(run):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while chunk := f.read(4 << 20):
                    n += len(chunk)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=11)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="wsg-bench-verify-")
    try:
        run = os.path.join(tmp, "run")
        build(run, args.cells)
        read_all(run)  # warm the page cache, as a resume right after a run finds it
        for _ in range(args.repeat):
            t = time.perf_counter()
            n = read_all(run)
            base = time.perf_counter() - t
            t = time.perf_counter()
            check = integrity.verify_run(run)
            verify = time.perf_counter() - t
            t = time.perf_counter()
            ok = all(integrity.revoke(rundir.join(run, "cells", f"c{c}"), "cell", run=run) for c in range(args.cells))
            resume = time.perf_counter() - t
            assert ok and not check.problems
            print(f"read {n / 1e6:.1f} MB {base:.3f}s | verify {check.markers} markers, {check.files} files, "
                  f"{check.bytes / 1e6:.1f} MB {verify:.3f}s ({verify / base:.1f}x) | resume check of "
                  f"{args.cells} cells {resume:.3f}s ({resume / base:.1f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
