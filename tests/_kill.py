"""`wsg` commands as processes of a test's own, SIGKILLed whole (tests/sweep/
test_fault_tolerance.py, test_random_kills.py, test_study.py).

`Wsg` starts `python -m wsg.sweep.cli ARGS` in a session of its own
(`start_new_session`, so its session id is its pid) with a tag in its
environment, `WSG_TEST_TAG=<uuid>`, that every process it starts inherits:
Ray's GCS, raylet, dashboard and workers, vLLM's engine processes. Its
console (wsg's own lines) is read line by line, each line with the moment it
came, and copied to a log file.

`Wsg.kill` SIGKILLs the process, its whole tree and every process of its
session, by pid, until none is left (a raylet may start a worker while the
others die). `Wsg.leftovers` names what of the command still runs after
that: any process the kill saw, any of its session, and any carrying the tag
(one that left the session, a daemon, and so escaped the kill; processes
that retitle themselves, as Ray's workers do, overwrite their environment,
so only the session and the tree find those). A test ends only what it
started: the tag is a fresh uuid per command.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

TAG = "WSG_TEST_TAG"


def tree_digest(folder: str) -> dict[str, tuple[float, str]]:
    """Every file of a finished cell but the adapters' model cards, which the
    eval stage completes with the measured accuracy (core/adapter_card.py):
    relative path -> (mtime, sha256)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == "README.md":
                continue
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest())
    return out


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _session(pid: int) -> list:
    """The live processes of session `pid` and of the tree under `pid`."""
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            out[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid:
                out[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return [p for p in out.values() if _alive(p)]


def _sigkill(procs: list, timeout: float = 30) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.05)


def kill_tree(proc: subprocess.Popen) -> list:
    """SIGKILL `proc`, its tree and its session (when it leads one), by pid,
    until none of them runs; then reap `proc`. The processes it killed."""
    seen = {}
    for _ in range(20):
        procs = _session(proc.pid)
        if not procs:
            break
        seen.update((p.pid, p) for p in procs)
        _sigkill(procs)
    proc.wait(timeout=30)
    return list(seen.values())


class Wsg:
    """One `wsg ARGS` command (see the module docstring)."""

    def __init__(self, *args: str, cwd: Path, log: Path, env: dict | None = None):
        self.tag = uuid.uuid4().hex
        e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray
        e.update({TAG: self.tag, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "wsg.sweep.cli", *args], cwd=cwd, env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.killed: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                with self._cv:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    @property
    def text(self) -> str:
        with self._cv:
            return "\n".join(s for _, s in self.lines)

    def find(self, pattern: str, start: int = 0) -> int | None:
        """Index of the first console line at or after `start` matching `pattern`."""
        with self._cv:
            for i in range(start, len(self.lines)):
                if re.search(pattern, self.lines[i][1]):
                    return i
        return None

    def at(self, i: int) -> float:
        return self.lines[i][0]

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Wait for a console line matching `pattern`; its index. Fails (with the
        console's tail) when the command ends first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                i = self.find(pattern, start)
                if i is not None:
                    return i
                ended = not self._reader.is_alive()
                if ended or time.monotonic() > deadline:
                    raise AssertionError(f"no line /{pattern}/ from wsg ({'it ended' if ended else 'timed out'}):\n"
                                         + self.text[-3000:])
                self._cv.wait(timeout=1.0)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"wsg did not end within {timeout:.0f} s:\n{self.text[-3000:]}") from None
        self._reader.join(timeout=30)
        return rc

    def kill(self) -> None:
        self.killed = kill_tree(self.proc)
        self._reader.join(timeout=30)

    def leftovers(self) -> list:
        """Processes of this command still running: killed ones (psutil tells a
        reused pid apart), its session's, or carrying its tag."""
        import psutil

        out = {p.pid: p for p in self.killed if p.is_running() and _alive(p)}
        out.update((p.pid, p) for p in _session(self.proc.pid))
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and _alive(p) and p.environ().get(TAG) == self.tag:
                    out[p.pid] = p
            except psutil.Error:
                continue
        return list(out.values())

    def end_leftovers(self) -> None:
        """Clean-up after a failed check: SIGKILL the tagged processes by pid."""
        _sigkill(self.leftovers())
