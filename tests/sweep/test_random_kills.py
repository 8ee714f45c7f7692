"""Random kills (issue 23): `wsg run configs/tiny.yaml` SIGKILLed at nine
seeded random moments, at least one in every stage (rollouts, grid, eval,
functional, geometry, report), and rerun after each, ends with the adapters
and tables of an uninterrupted run, byte for byte.

One uninterrupted reference run gives each stage's duration on this machine
(from its console lines). Then one run folder is started, killed, started
again, and so on (`KILLS`): each time the command's process, its whole tree
and its session (Ray's GCS, raylet, dashboard, workers, vLLM's processes)
get SIGKILL, by pid (tests/_kill.py), at a seeded random delay after the
console line that starts the targeted stage, a fraction of that stage's
reference duration (several kills of one stage each take a smaller one, so
every one lands before the stage ends). After each kill: nothing of that
command still runs (a leftover raylet or GCS would break the rerun), the
targeted stage was cut short (it has no completion marker), and every cell
complete at that moment is left untouched by all the reruns that follow
(mtime and bytes; this folds in the earlier "SIGKILL mid-grid, then rerun"
test: one kill waits for a finished cell, so it lands mid-grid). After the
last kill the same command runs to the end.

Compared byte for byte with the reference (`compared_files`):
  - every adapter folder's files: cells/*/step_*/adapter_model.safetensors,
    adapter_config.json and the model card README.md (with eval's accuracy);
  - each cell's cell.json and fingerprint.json, and the run's config.yaml;
  - every Parquet table of rollouts/ (rollouts, pairs, shards), eval/
    (predictions, accuracy, mcnemar, models/*), analysis/ (lmc, cka,
    logit_lens and their parts/, with the hidden-state .npz parts), and
    geometry/ (adapter_modules, *_pairs, convergence, noise_floors, claims);
  - the report's figures (report/figures/*.png).
Compared by value: each cell's training history, cells/*/metrics.parquet,
less its timing columns (`*_s`, `peak_rss_mb`): those are wall-clock.
Not compared, as they record wall-clock times, hosts or pids, or are
caches named at random: report/index.html (the run's folder name and the
time it was built), stage and cell `_COMPLETE` markers, status.json and
progress.json (times, pids, summaries with timings), logs/, tune/ (Ray
Tune's experiment state), train_state/ (resume state), geometry/.cache/.
The step folders' `_COMPLETE` markers (hashes of the adapter files) are
compared through the files they vouch for.

Wall time on an idle 2-core box: about 5 minutes (reference ~1.5 min, the
ten commands of the killed run ~3.5 min).
"""
from __future__ import annotations

import glob
import os
import random
import time
from pathlib import Path

import pandas as pd
import pytest
from _kill import Wsg, tree_digest
from wsg.core import rundir

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
SEED = 23
N_CELLS = 8
pytestmark = pytest.mark.slow

_STARTS = {s: rf"^wsg: \[{s}\] starting$" for s in ("rollouts", "grid", "eval", "functional", "geometry")}
# the report is built once the geometry stage is done (or found complete)
_STARTS["report"] = r"^wsg: \[geometry\] (done in|complete, skipped)"
_ENDS = {s: rf"^wsg: \[{s}\] done in" for s in ("rollouts", "grid", "eval", "functional", "geometry")}
_ENDS["report"] = r"^wsg: finished in"
# (stage, the console line after which the delay starts, share of the stage's
# reference duration the delay is drawn from: kills of a stage add up to at
# most 3/4 of it, so the last one still lands inside)
KILLS = [("rollouts", _STARTS["rollouts"], 0.75),
         ("grid", _STARTS["grid"], 0.25),
         ("grid", _STARTS["grid"], 0.25),
         ("grid", r"^  cell \S+ done", 0.25 / N_CELLS),  # just after a cell finished: mid-grid
         ("eval", _STARTS["eval"], 0.375),
         ("eval", _STARTS["eval"], 0.375),
         ("functional", _STARTS["functional"], 0.75),
         ("geometry", _STARTS["geometry"], 0.75),
         ("report", _STARTS["report"], 0.75)]
TIMING = ("peak_rss_mb",)
PATTERNS = ("config.yaml", "cells/*/cell.json", "cells/*/fingerprint.json", "cells/*/step_*/adapter_model.safetensors",
            "cells/*/step_*/adapter_config.json", "cells/*/step_*/README.md", "rollouts/**/*.parquet",
            "eval/**/*.parquet", "analysis/**/*.parquet", "analysis/parts/hidden/*.npz", "geometry/*.parquet",
            "report/figures/*.png")


def compared_files(run: Path) -> dict[str, bytes]:
    """The files compared byte for byte (the module docstring says which and why)."""
    out = {}
    for pat in PATTERNS:
        for p in glob.glob(str(run / pat), recursive=True):
            out[os.path.relpath(p, run)] = Path(p).read_bytes()
    return out


def history(run: Path, cell: str) -> pd.DataFrame:
    df = pd.read_parquet(run / "cells" / cell / "metrics.parquet")
    return df.drop(columns=[c for c in df.columns if c.endswith("_s") or c in TIMING])


def durations(ref: Wsg) -> dict[str, float]:
    """Each stage's duration in the reference run, from its console lines."""
    out = {}
    for stage in _STARTS:
        i, j = ref.find(_STARTS[stage]), ref.find(_ENDS[stage])
        assert i is not None and j is not None, (stage, ref.text[-2000:])
        out[stage] = ref.at(j) - ref.at(i)
    return out


def complete_cells(run: Path) -> list[str]:
    return sorted(c.name for c in (run / "cells").glob("*") if (c / rundir.COMPLETE_MARKER).exists())


def _kill_once(tmp_path: Path, n: int, stage: str, trigger: str, delay: float) -> Wsg:
    """Start `wsg run`, wait for `trigger`, wait `delay` s, SIGKILL it whole."""
    w = Wsg("run", CONFIG, "--run", "run", cwd=tmp_path, log=tmp_path / f"kill{n}.log")
    try:
        w.wait_for(trigger, timeout=600)
        time.sleep(delay)
        assert w.proc.poll() is None, f"kill {n} ({stage}): wsg ended first:\n{w.text[-3000:]}"
    finally:
        w.kill()
    left = w.leftovers()
    if left:
        w.end_leftovers()
    assert not left, f"kill {n} ({stage}): processes of the killed run still run: {[p.pid for p in left]}"
    return w


def test_random_kills_end_with_the_uninterrupted_run(tmp_path):
    t0 = time.monotonic()
    ref = Wsg("run", CONFIG, "--run", "ref", cwd=tmp_path, log=tmp_path / "ref.log")
    assert ref.wait(timeout=1200) == 0, ref.text[-3000:]
    took = durations(ref)
    t_ref = time.monotonic() - t0

    rng = random.Random(SEED)
    run = tmp_path / "run"  # relative --run from another working directory: Tune trials chdir
    untouched: dict[str, dict] = {}  # cell -> its digest when it was first seen complete after a kill
    mid_grid = 0
    for n, (stage, trigger, share) in enumerate(KILLS):
        delay = rng.uniform(0.05, 1.0) * share * took[stage]
        w = _kill_once(tmp_path, n, stage, trigger, delay)
        if stage == "report":
            assert w.find(_ENDS["report"]) is None, f"kill {n} came after the run finished"
        else:
            assert not rundir.is_complete(str(run / "stages" / stage)), f"kill {n} came after [{stage}] ended"
        done = complete_cells(run)
        mid_grid += 0 < len(done) < N_CELLS
        for c in done:
            untouched.setdefault(c, tree_digest(str(run / "cells" / c)))
        print(f"kill {n}: [{stage}] +{delay:.2f}s, {len(done)} cells complete")
    assert mid_grid, "no kill came while the grid was part done"

    last = Wsg("run", CONFIG, "--run", "run", cwd=tmp_path, log=tmp_path / "last.log")
    assert last.wait(timeout=1200) == 0, last.text[-3000:]
    assert last.find(r"\[rollouts\] complete, skipped") is not None  # it resumed, not restarted
    t_all = time.monotonic() - t0
    print(f"\nreference run {t_ref:.0f} s; with {len(KILLS)} kills and the reruns {t_all:.0f} s in all")

    for c, digest in untouched.items():
        after = tree_digest(str(run / "cells" / c))
        assert {k: v for k, v in after.items() if k in digest} == digest, f"finished cell {c} was rewritten"
    cells = complete_cells(run)
    assert cells == complete_cells(tmp_path / "ref") and len(cells) == N_CELLS
    assert (run / "report" / "index.html").exists()

    want, got = compared_files(tmp_path / "ref"), compared_files(run)
    assert sorted(got) == sorted(want)
    assert sum(k.endswith("adapter_model.safetensors") for k in want) == 2 * N_CELLS
    assert all(k in want for k in ("rollouts/rollouts.parquet", "eval/predictions.parquet",
                                   "analysis/lmc.parquet", "geometry/global_pairs.parquet",
                                   "geometry/claims.parquet"))
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"not byte-identical to the uninterrupted run: {differ}"
    for c in cells:
        pd.testing.assert_frame_equal(history(run, c), history(tmp_path / "ref", c), check_exact=True)
