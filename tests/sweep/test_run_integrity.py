"""A finished tiny run, end to end (issue 23): copied to another folder it
verifies, and `wsg status`, `wsg report` and `wsg run` (nothing to do) work
there; a truncated adapter is found by `wsg verify` and made again by
`wsg run`, byte for byte; a write that fails (an injected ENOSPC) exits 2
naming the file, keeps what was complete, and the rerun completes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from wsg.core import integrity, rundir

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
CELL = "dpo-s42-lr1e-04"  # tiny's dpo lr_scale 0.1 of 1e-3
ADAPTER = f"cells/{CELL}/step_4/adapter_model.safetensors"


def _wsg(*args, env=None, timeout=1200) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WSG_FAULT_FAIL_WRITE")}
    return subprocess.run([sys.executable, "-m", "wsg.sweep.cli", *args], cwd=ROOT, env={**e, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run of two offline losses (sft, dpo) and its config."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["grid"]["losses"] = ["sft", "dpo"]
    cpath = tmp / "tiny2.yaml"
    cpath.write_text(yaml.safe_dump(cfg))
    run = tmp / "run"
    out = _wsg("run", str(cpath), "--run", str(run))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cpath, run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_a_copied_run_works_where_it_lands(finished, tmp_path):
    cpath, run = finished
    copy = _copy(run, tmp_path / "moved" / "run")
    hidden = run.with_name("run-hidden")
    run.rename(hidden)  # nothing may read the original folder
    try:
        for dirpath, dirs, names in os.walk(copy):
            dirs[:] = [d for d in dirs if d not in ("logs", "tune")]  # wsg.log and Ray Tune's own state
            for n in names:
                assert str(run).encode() not in (Path(dirpath) / n).read_bytes(), f"{dirpath}/{n} names {run}"
        t = time.perf_counter()
        check = integrity.verify_run(str(copy))
        took = time.perf_counter() - t
        print(f"\nverify: {check.markers} markers, {check.files} files, {check.bytes / 1e6:.2f} MB in {took:.3f} s")
        assert not check.problems and check.legacy == 0 and check.files > 0
        st = _wsg("status", str(copy))
        assert st.returncode == 0 and "not complete" not in st.stdout and f"{CELL}" in st.stdout, st.stdout
        rep = _wsg("report", str(copy))
        assert rep.returncode == 0 and str(copy / "report" / "index.html") in rep.stdout, rep.stderr
        again = _wsg("run", str(cpath), "--run", str(copy))
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        for stage in ("rollouts", "eval", "functional", "geometry"):
            assert f"[{stage}] complete, skipped" in again.stdout
        assert "2 complete, 0 to run" in again.stdout
    finally:
        hidden.rename(run)


def test_a_truncated_adapter_is_found_and_made_again(finished, tmp_path):
    cpath, run = finished
    copy = _copy(run, tmp_path / "damaged")
    want = (copy / ADAPTER).read_bytes()
    with open(copy / ADAPTER, "r+b") as f:
        f.truncate(1000)  # the damage
    ver = _wsg("verify", str(copy))
    assert ver.returncode == 1 and f"{ADAPTER}: size 1000 bytes" in ver.stdout, ver.stdout
    out = _wsg("run", str(cpath), "--run", str(copy))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    said = [ln for ln in out.stdout.splitlines() if ADAPTER in ln]
    assert len(said) == 1 and f"cell {CELL}" in said[0] and "running it again" in said[0], out.stdout
    assert "1 to run" in out.stdout and "[eval] starting" in out.stdout and "[geometry] starting" in out.stdout
    assert (copy / ADAPTER).read_bytes() == want  # deterministic training gives it back whole
    assert _wsg("verify", str(copy)).returncode == 0


# (the write that fails, what is removed first so that the rerun writes it again)
SITES = [
    ("geometry/global_pairs.parquet", ["stages/geometry/_COMPLETE", "geometry/global_pairs.parquet"]),
    ("eval/accuracy.parquet", ["stages/eval/_COMPLETE", "eval/accuracy.parquet"]),
    ("stages/functional/_COMPLETE", ["stages/functional/_COMPLETE"]),
    (ADAPTER, [f"cells/{CELL}/_COMPLETE", f"cells/{CELL}/step_4"]),  # in the Ray Train worker
]


@pytest.mark.parametrize("site,remove", SITES, ids=[s for s, _ in SITES])
def test_a_failed_write_exits_2_keeps_what_is_complete_and_resumes(finished, tmp_path, site, remove):
    cpath, run = finished
    copy = _copy(run, tmp_path / "full")
    target = copy / site
    want = target.read_bytes()
    for r in remove:
        shutil.rmtree(copy / r) if (copy / r).is_dir() else os.unlink(copy / r)
    out = _wsg("run", str(cpath), "--run", str(copy), env={"WSG_FAULT_FAIL_WRITE": site})
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"could not write {target}" in out.stderr and "No space left on device" in out.stderr, out.stderr[-3000:]
    assert not target.exists()
    assert not target.parent.exists() or not [p for p in target.parent.iterdir() if rundir.TMP_TAG in p.name]
    for marker in (copy / "stages").iterdir():  # what is still marked complete still checks out
        assert integrity.check(str(marker), run=str(copy)) in ([], None), marker
    out = _wsg("run", str(cpath), "--run", str(copy))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if site.endswith(".parquet"):
        assert pq.read_table(target).equals(pq.read_table(run / site))
    elif site == ADAPTER:
        assert target.read_bytes() == want
    assert _wsg("verify", str(copy)).returncode == 0
