"""wsg's own voice on the terminal: stage lines, live progress of the grid's
cells and of per-unit stages (eval, functional), and nothing else.

Third-party output — Ray workers' logs (forwarded to the driver), vLLM,
transformers' loader bars, DeepSpeed — goes to `<run>/logs/wsg.log`: while a
`RunConsole` is open, the process's stdout and stderr file descriptors point
at that file and wsg writes to a copy of the terminal's. `--verbose` leaves
both on the terminal. Errors still reach the terminal whole: the CLI prints
WsgErrors through `error`, and any other exception's traceback is printed
after the descriptors are restored (docs/monitoring.md, "Console").

On a terminal (TTY) progress is drawn live with rich; elsewhere (CI, a pipe)
it is a line per finished cell or unit and a summary line a minute.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import Iterator, TextIO

from . import rundir

_current: "RunConsole | None" = None
SUMMARY_EVERY_S = 60.0


def _stream() -> TextIO:
    return _current.term if _current is not None else sys.stdout


def say(msg: str) -> None:
    """One line for the user (the terminal, whatever is redirected)."""
    s = _stream()
    s.write(msg.rstrip("\n") + "\n")
    s.flush()


def error(msg: str) -> None:
    s = _current.term if _current is not None else sys.stderr
    s.write(msg.rstrip("\n") + "\n")
    s.flush()


def verbose() -> bool:
    """True unless a quiet RunConsole is open (third-party output may show)."""
    return _current is None or _current.verbose


def is_tty() -> bool:
    return bool(getattr(_stream(), "isatty", lambda: False)())


class RunConsole:
    """Send third-party output to a log file for the length of a block."""

    def __init__(self, log_dir: str | None, *, verbose: bool = False, upload_to: str | None = None):
        self.log_dir, self.verbose, self.upload_to = log_dir, verbose, upload_to
        self.term: TextIO = sys.stdout
        self.log_path: str | None = None
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> "RunConsole":
        global _current
        if not self.verbose:
            sys.stdout.flush()
            sys.stderr.flush()
            folder = self.log_dir or tempfile.mkdtemp(prefix="wsg-logs-")
            os.makedirs(folder, exist_ok=True)
            self.log_path = os.path.join(folder, "wsg.log")
            saved = (os.dup(1), os.dup(2))
            self.term = os.fdopen(os.dup(saved[0]), "w", buffering=1)
            log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            self._saved = saved
        _current = self
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = None
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None
            self.term.close()
            self.term = sys.stdout
        if self.upload_to and self.log_path and os.path.exists(self.log_path):
            with contextlib.suppress(Exception):  # the log is a convenience: never fail the run for it
                with open(self.log_path, "rb") as f:
                    rundir.write_bytes(rundir.join(self.upload_to, "wsg.log"), f.read())


class Progress:
    """A counter with a bar on a TTY, lines elsewhere (at most ~10 per bar)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = max(0, int(total)), label, 0
        self._bar = None
        self._last_line = -1
        if is_tty() and self.total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=Console(file=_stream()), transient=True)
            self._task = self._bar.add_task(label, total=self.total)
            self._bar.start()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        decile = (10 * self.done) // max(self.total, 1)
        if decile != self._last_line or self.done == self.total:
            self._last_line = decile
            say(f"  {self.label}: {self.done}/{self.total}{' ' + note if note else ''}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Progress]:
    p = Progress(total, label)
    try:
        yield p
    finally:
        p.close()


def _fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Watcher:
    """A daemon thread that polls while a `with` block runs (the grid's
    watchers: GridWatch here, sweep/capacity.py's GroupWait); subclasses
    define `_run`, which returns once `_stop` is set."""

    def __init__(self, name: str, poll_s: float):
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class GridWatch(Watcher):
    """Polls the cells' progress.json files while the grid runs and shows the
    cells done / running / failed, each running cell's step, loss and tokens/s,
    and an ETA (mean finished-cell time × cells left / cells running)."""

    def __init__(self, layout, cell_ids: list[str], *, poll_s: float = 3.0):
        super().__init__("wsg-grid-watch", poll_s)
        self.layout, self.ids = layout, list(cell_ids)
        self.t0 = time.time()
        self._finished: dict[str, float] = {}
        self._seen_running: dict[str, float] = {}

    def snapshot(self) -> dict:
        done, failed, running = [], [], []
        for cid in self.ids:
            cl = self.layout.cell(cid)
            if rundir.is_complete(cl.root):
                done.append(cid)
                self._finished.setdefault(cid, time.time() - self._seen_running.get(cid, self.t0))
            elif rundir.exists(cl.failed):
                failed.append(cid)
            elif rundir.exists(cl.progress):
                with contextlib.suppress(Exception):  # mid-write on an object store: next poll
                    p = rundir.read_json(cl.progress)
                    self._seen_running.setdefault(cid, time.time())
                    running.append((cid, p))
        left = len(self.ids) - len(done) - len(failed)
        eta = None
        if self._finished and left:
            per = sum(self._finished.values()) / len(self._finished)
            eta = per * left / max(1, len(running))
        return {"done": done, "failed": failed, "running": running, "eta_s": eta}

    def render(self, snap: dict) -> list[str]:
        head = (f"  cells: {len(snap['done'])}/{len(self.ids)} done, {len(snap['running'])} running, "
                f"{len(snap['failed'])} failed" + (f", ETA {_fmt_s(snap['eta_s'])}" if snap["eta_s"] else ""))
        lines = [head]
        for cid, p in snap["running"]:
            lines.append(f"    {cid:<30} step {p.get('step', 0):>4}/{p.get('max_steps', '?'):<4} "
                         f"loss {p.get('loss', float('nan')):8.4f}  {p.get('tokens_per_s', 0):7.0f} tok/s")
        return lines

    def _run(self) -> None:
        tty = is_tty()
        live, last_line, reported = None, 0.0, set()
        if tty:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            live = Live(Text(""), console=Console(file=_stream()), refresh_per_second=2, transient=True)
            live.start()
        try:
            while not self._stop.is_set():
                snap = self.snapshot()
                if live is not None:
                    live.update(Text("\n".join(self.render(snap))))
                else:
                    for cid in snap["done"] + snap["failed"]:
                        state = "done" if cid in snap["done"] else "failed"
                        if (cid, state) not in reported:
                            reported.add((cid, state))
                            say(f"  cell {cid} done ({len(snap['done'])}/{len(self.ids)} done)" if state == "done"
                                else f"  cell {cid} failed (its reason: {self.layout.cell(cid).failed}); "
                                     "Tune retries it once")
                    if time.time() - last_line >= SUMMARY_EVERY_S and snap["running"]:
                        last_line = time.time()
                        say("\n".join(self.render(snap)))
                self._stop.wait(self.poll_s)
        finally:
            if live is not None:
                live.stop()
