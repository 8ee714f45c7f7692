"""Completion markers vouch for what they list (docs/design.md, "Run layout").

A `_COMPLETE` marker written by `rundir.mark_complete(..., files=, root=)`
lists the artifacts it vouches for under its `vouches` key: where the marker
sits under the run (`at`) and, per file, its run-relative path, size and
sha256. Resume checks a marker before trusting it (`check`, `revoke`): a file
that is missing, of another size or of other content makes the marker void,
so its stage or cell runs again. `wsg verify` checks every marker of a run
(`verify_run`). Markers written before markers listed files (no `vouches`
key) are trusted by their presence, as they always were.

Paths are relative, so a run copied to another folder or bucket checks as it
did where it was written.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from . import console, rundir
from .errors import WsgError
from .layout import RunLayout

# Folders of a run whose markers are not artifacts of the run: Ray's own
# resume state and the geometry cache (validated by content hash on read).
_SKIP = ("train_state", "tune", ".cache", "logs")


@dataclass(frozen=True)
class Problem:
    path: str    # run-relative file
    why: str     # "missing", "size 1000, marker says 2345", ...
    marker: str  # run-relative marker that vouches for it

    def line(self) -> str:
        return f"{self.path}: {self.why} (vouched for by {self.marker})"


@dataclass
class _Memo:
    """Digests of one check, so a file listed by two markers (a step folder's
    and its cell's) is read once."""

    digests: dict = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prefetch(self, wanted: list[tuple[str, int]]) -> None:
        """Hash files on a few threads (hashlib and pyarrow's reads release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [(u, s) for u, s in dict(wanted).items() if u not in self.digests]
        if len(todo) > 1:
            with ThreadPoolExecutor(max_workers=min(4, len(os.sched_getaffinity(0)), len(todo))) as ex:
                list(ex.map(lambda us: self.digest(*us), todo))

    def digest(self, uri: str, size: int) -> str:
        if uri not in self.digests:
            got, sha = rundir.file_digest(uri)
            with self.lock:
                self.digests[uri] = sha if got == size else None
                self.files, self.bytes = self.files + 1, self.bytes + got
        return self.digests[uri]


def _run_root(folder: str, at: str) -> str:
    """The run a marker belongs to: its folder less `at`'s parts."""
    root = folder.rstrip("/")
    for _ in [p for p in at.split("/") if p]:
        root = root.rsplit("/", 1)[0]
    return root


def check(folder: str, memo: _Memo | None = None, run: str | None = None) -> list[Problem] | None:
    """Problems of the marker of `folder` ([] when every file checks out);
    None when the folder has no marker. A marker without a file list (an old
    run's) is trusted by its presence: []. `run`: for the names in problems."""
    marker = rundir.join(folder, rundir.COMPLETE_MARKER)
    memo = memo or _Memo()
    if not rundir.exists(marker):
        return None
    try:
        info = rundir.read_json(marker)
    except (ValueError, OSError) as err:  # a truncated or garbled marker vouches for nothing
        return [Problem(_name(marker, run), f"unreadable marker ({type(err).__name__})", _name(marker, run))]
    vouches = info.get(rundir.VOUCHES) if isinstance(info, dict) else None
    if not isinstance(vouches, dict):
        return []
    root = _run_root(folder, vouches.get("at", ""))
    listed = [(rundir.join(root, *f["path"].split("/")), f) for f in vouches.get("files", [])]
    stats = [rundir.resolve(uri)[0].get_file_info(rundir.resolve(uri)[1]) for uri, _ in listed]
    memo.prefetch([(uri, f["size"]) for (uri, f), st in zip(listed, stats)
                   if st.type == pafs.FileType.File and st.size == f["size"]])
    problems = []
    for (uri, f), st in zip(listed, stats):
        why = None
        if st.type != pafs.FileType.File:
            why = "missing"
        elif st.size != f["size"]:
            why = f"size {st.size} bytes, its marker says {f['size']}"
        elif memo.digest(uri, f["size"]) != f["sha256"]:
            why = "content differs from its marker's sha256"
        if why:
            problems.append(Problem(_name(uri, run or root), why, _name(marker, run or root)))
    return problems


def _name(uri: str, run: str | None) -> str:
    if run is None:
        return uri
    try:
        return rundir.relative(uri, run)
    except ValueError:
        return uri


def info(folder: str) -> dict:
    """A marker's own content (the stage or cell summary), without its file list."""
    data = rundir.read_json(rundir.join(folder, rundir.COMPLETE_MARKER))
    return {k: v for k, v in data.items() if k != rundir.VOUCHES}


def revoke(folder: str, what: str, run: str | None = None, say=None) -> bool:
    """True if `folder` has a marker whose files check out. Otherwise a marker
    that does not is deleted (so what it covered is made again), with one
    console line naming the first bad file."""
    problems = check(folder, run=run)
    if problems is None:
        return False
    if not problems:
        return True
    if say is None:
        say = console.say
    p = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    say(f"wsg: {what}: {p.path} is damaged ({p.why}){more}; running it again")
    fs, path = rundir.resolve(rundir.join(folder, rundir.COMPLETE_MARKER))
    fs.delete_file(path)
    return False


@dataclass
class RunCheck:
    problems: list[Problem]
    markers: int
    legacy: int  # markers without a file list, trusted by presence
    files: int
    bytes: int


def _markers(run: str) -> list[str]:
    """Every `_COMPLETE` of the run (its folder's URI), outside _SKIP."""
    fs, base = rundir.resolve(run)
    base = base.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    out = []
    for i in infos:
        rel = i.path[len(base) + 1:]
        parts = rel.split("/")
        if parts[-1] == rundir.COMPLETE_MARKER and not set(parts[:-1]) & set(_SKIP):
            out.append(rundir.join(run, *parts[:-1]) if parts[:-1] else run)
    return sorted(out)


def verify_run(run: str) -> RunCheck:
    """Check every marker of a run (local or an object store)."""

    run = rundir.canonical(run)
    if not rundir.exists(RunLayout(run).config):
        raise WsgError(f"{run} is not a wsg run directory (no config.yaml)")
    memo, problems, legacy = _Memo(), [], 0
    markers = _markers(run)
    for folder in markers:
        found = check(folder, memo, run=run)
        problems.extend(found or [])
        try:
            legacy += rundir.VOUCHES not in rundir.read_json(rundir.join(folder, rundir.COMPLETE_MARKER))
        except (ValueError, OSError):
            pass
    return RunCheck(problems, len(markers), legacy, memo.files, memo.bytes)


def verify_text(run: str) -> tuple[int, str]:
    """(exit code, text) of `wsg verify RUN`: 0 and one line when clean, 1 and
    every problem otherwise."""
    r = verify_run(run)
    if not r.problems:
        old = f", {r.legacy} old marker(s) without a file list checked by presence" if r.legacy else ""
        return 0, (f"wsg verify: {run}: clean ({r.markers} markers, {r.files} files, "
                   f"{r.bytes / 1e6:.1f} MB checked{old})")
    lines = [f"wsg verify: {run}: {len(r.problems)} problem(s):"] + [f"  {p.line()}" for p in r.problems]
    lines.append(f"remake what is damaged: wsg run {RunLayout(run).config} --run {run}")
    return 1, "\n".join(lines)
