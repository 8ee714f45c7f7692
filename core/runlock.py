"""One writer per run directory: `<run>/_LOCK` (docs/design.md, "One writer").

`wsg run` (and the stage commands) hold the lock for as long as they write
the run. It is a JSON file naming the holder: host, pid, the process's start
time, since when it holds the lock, a random token, and a heartbeat the
holder rewrites every `BEAT_S` seconds. A second writer exits 2 naming the
holder. A lock is taken over (with one console line) when its holder is dead
or the lock was copied with the run from another folder (it records a digest
of the folder it was taken for):

- on the same host: its pid no longer runs, or runs another process (a start
  time other than the recorded one: the pid was reused);
- on another host (its pid cannot be checked from here): its heartbeat is
  older than `STALE_S` seconds.

Local folders create the lock with O_EXCL; object stores (no conditional
write through pyarrow) write it and read it back after a short settle, so
two writers starting within that settle on one bucket both may see the
other's token and both give way; neither writes the run.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from . import rundir
from .layout import LOCK, RunLayout
from .console import say as _say
from .errors import WsgError

BEAT_S = 30.0
STALE_S = 300.0
_SETTLE_S = 0.5


def _started(pid: int) -> float | None:
    """The start time (clock ticks since boot, from /proc) of a running
    process; None when no live process has that pid; -1 when it runs but its
    start time cannot be read (no /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # runs, as another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0
    return None if fields[0] in ("Z", "X") else float(fields[19])


def run_digest(run: str) -> str:
    """Which folder a lock was taken for, without naming it (runs are copied)."""
    return hashlib.sha256(rundir.canonical(run).encode()).hexdigest()[:16]


def dead_reason(holder: dict, now: float, stale_s: float = STALE_S, run: str | None = None) -> str | None:
    """Why a lock's holder counts as dead (the takeover rule), or None if it may live."""
    if run is not None and holder.get("run", run_digest(run)) != run_digest(run):
        return "the lock was copied with the run from another folder"
    if holder.get("host") == socket.gethostname():
        started = _started(int(holder.get("pid", -1)))
        if started is None:
            return f"pid {holder.get('pid')} no longer runs"
        if started >= 0 and started != float(holder.get("started", started)):
            return f"pid {holder.get('pid')} now belongs to another process"
        return None
    age = now - float(holder.get("beat", 0))
    return f"no heartbeat for {age:.0f} s (> {stale_s:.0f} s)" if age > stale_s else None


def describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


class RunLock:
    """`with RunLock(run): ...` holds the run's lock, or raises WsgError."""

    def __init__(self, run: str, *, stale_s: float = STALE_S, beat_s: float = BEAT_S, say=None):
        self.uri = RunLayout.of(run).lock
        self.run, self.stale_s, self.beat_s = run, stale_s, beat_s
        self.say = say
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        pid = os.getpid()
        self.record = {"host": socket.gethostname(), "pid": pid, "started": _started(pid),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": self.token,
                       "run": run_digest(run)}

    def _read(self) -> dict | None:
        try:
            return json.loads(rundir.read_text(self.uri)) if rundir.exists(self.uri) else None
        except (ValueError, OSError):
            return {}  # a half-written lock of a killed holder: no host, no heartbeat

    def _data(self) -> bytes:
        return json.dumps({**self.record, "beat": time.time()}, sort_keys=True).encode()

    def _create(self) -> bool:
        """Write the lock where there is none; False if another writer won."""
        if rundir.is_local(self.run):
            path = rundir.resolve(self.uri)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._data())
            return True
        rundir.write_bytes(self.uri, self._data())
        return True

    def acquire(self) -> "RunLock":
        for _ in range(3):
            held = self._read()
            if held is None:
                if not self._create():
                    continue
            else:
                why = dead_reason(held, time.time(), self.stale_s, self.run)
                if why is None:
                    raise WsgError(f"{self.run} is in use by another wsg process ({describe(held)}); wait for it "
                                   f"to end, or stop it. A lock whose holder died is taken over ({self.uri})")
                self._say(f"wsg: taking over the lock of {self.run} from {describe(held)}: {why}")
                rundir.write_bytes(self.uri, self._data())
            time.sleep(_SETTLE_S)  # a writer racing us may have replaced it: the lock is whoever reads back
            mine = self._read() or {}
            if mine.get("token") == self.token:
                self._thread = threading.Thread(target=self._beat, name="wsg-run-lock", daemon=True)
                self._thread.start()
                return self
        held = self._read() or {}
        raise WsgError(f"{self.run} is in use by another wsg process ({describe(held)}); it took the lock first")

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                if (self._read() or {}).get("token") != self.token:
                    self._say(f"wsg: warning: the lock of {self.run} was taken over by another process")
                    return
                rundir.write_bytes(self.uri, self._data())
            except OSError:
                pass  # a missed beat; the next one may land

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self._read() or {}).get("token") == self.token:
                fs, path = rundir.resolve(self.uri)
                fs.delete_file(path)
        except OSError:
            pass

    def _say(self, text: str) -> None:
        if self.say is None:
            _say(text)
        else:
            self.say(text)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
