"""One writer per run folder (issue 23): a second `wsg run` exits 2 naming
the holder; a holder killed with SIGKILL leaves a lock the next run takes
over (same host: its pid is gone); another host's lock is taken over only
when its heartbeat is stale. Local folders and moto's S3 server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wsg.core import rundir
from wsg.core.errors import WsgError
from wsg.core.runlock import LOCK, RunLock
from wsg.sweep.cli import main

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from wsg.core.runlock import RunLock
lock = RunLock(sys.argv[1], beat_s=0.2).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(run: str, env: dict | None = None) -> subprocess.Popen:
    """A real process that takes the run's lock and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _second_run_is_refused(run: str, proc: subprocess.Popen, capsys) -> None:
    code = main(["run", str(ROOT / "configs" / "tiny.yaml"), "--run", run])
    err = capsys.readouterr().err
    assert code == 2, err
    holder = json.loads(rundir.read_text(rundir.join(run, LOCK)))
    assert f"host {socket.gethostname()}, pid {proc.pid}, since {holder['since']}" in err
    assert holder["pid"] == proc.pid
    assert main(["status", run]) == 0
    assert f"being written by host {socket.gethostname()}, pid {proc.pid}" in capsys.readouterr().out


def _takeover_after_sigkill(run: str, proc: subprocess.Popen) -> None:
    _kill(proc)
    said = []
    with RunLock(run, say=said.append) as lock:
        assert json.loads(rundir.read_text(rundir.join(run, LOCK)))["token"] == lock.token
    assert len(said) == 1 and f"pid {proc.pid} no longer runs" in said[0] and "taking over" in said[0]
    assert not rundir.exists(rundir.join(run, LOCK))  # released on exit


def test_second_run_exits_2_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    run = str(tmp_path / "run")
    proc = _holder(run)
    try:
        _second_run_is_refused(run, proc, capsys)
        _takeover_after_sigkill(run, proc)
    finally:
        _kill(proc)


def test_on_s3(tmp_path, monkeypatch, capsys):
    from _cluster import S3Server

    s3 = S3Server(tmp_path / "s3").start()
    proc = None
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        s3.make_bucket("wsg")
        run = "s3://wsg/runs/locked"
        proc = _holder(run, s3.env)
        _second_run_is_refused(run, proc, capsys)
        _takeover_after_sigkill(run, proc)
    finally:
        if proc is not None:
            _kill(proc)
        s3.stop()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    run = str(tmp_path / "run")
    lock = {"host": "elsewhere-" + socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01T00:00:00+00:00",
            "token": "x", "beat": time.time()}
    rundir.write_text(rundir.join(run, LOCK), json.dumps(lock))
    with pytest.raises(WsgError, match="host elsewhere-.*since 2026-01-01"):
        RunLock(run, stale_s=60).acquire()
    rundir.write_text(rundir.join(run, LOCK), json.dumps({**lock, "beat": time.time() - 61}))
    said = []
    with RunLock(run, stale_s=60, say=said.append):
        pass
    assert "no heartbeat for 61 s (> 60 s)" in said[0]


def test_a_lock_copied_with_its_run_does_not_hold_the_copy(tmp_path):
    import shutil

    run = tmp_path / "run"
    with RunLock(str(run)):
        shutil.copytree(run, tmp_path / "copy")
        said = []
        with RunLock(str(tmp_path / "copy"), say=said.append):
            pass
        assert "copied with the run from another folder" in said[0]


def test_the_holder_beats_and_a_reused_pid_is_dead(tmp_path):
    run = str(tmp_path / "run")
    with RunLock(run, beat_s=0.1) as lock:
        first = json.loads(rundir.read_text(rundir.join(run, LOCK)))["beat"]
        time.sleep(0.5)
        assert json.loads(rundir.read_text(rundir.join(run, LOCK)))["beat"] > first
        with pytest.raises(WsgError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # alive on this host: however old its beat
        rec = json.loads(rundir.read_text(rundir.join(run, LOCK)))
        rundir.write_text(rundir.join(run, LOCK), json.dumps({**rec, "started": rec["started"] - 5}))
        said = []
        lock._stop.set()
        with RunLock(run, say=said.append):
            pass
        assert "now belongs to another process" in said[0]
