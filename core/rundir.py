"""The run directory: the only state shared between stages (docs/design.md).

A run is a local folder or an object-store URI (`s3://`, `gs://`); all I/O
goes through `pyarrow.fs` so the same code serves both. Artifacts become
visible only when whole: local files are written to a temporary sibling and
renamed; on object stores a single PUT is atomic per object, and multi-file
artifacts (adapter folders) are completed by a `_COMPLETE` marker written last.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import WsgError

COMPLETE_MARKER = "_COMPLETE"
VOUCHES = "vouches"  # the marker key listing the files it vouches for (core/integrity.py)
TMP_TAG = ".tmp-"  # in the name of a file being written; never an artifact
_CHUNK = 4 << 20


class WriteError(WsgError, OSError):
    """An artifact could not be written (disk full, permissions): nothing
    complete was touched; the message names the file and the fix."""


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path or URI."""
    s = str(uri)
    if "://" in s and not s.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(s)
        return fs, path
    if s.startswith("file://"):
        s = s[len("file://"):]
    return pafs.LocalFileSystem(), str(Path(s).expanduser().absolute())


def canonical(uri: str | os.PathLike) -> str:
    """A local run path made absolute (`~` expanded); URIs unchanged.

    Stages run in Ray workers and Tune trials whose working directory is not
    the caller's, so a relative run path must never leave the CLI.
    """
    return resolve(uri)[1] if is_local(str(uri)) else str(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a run path or URI (always '/' separators)."""
    base = str(base)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return scheme + "://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (temp sibling + rename on local disks; one
    PUT on object stores, whose object appears only when whole). A failed
    write leaves the old file, if any, as it was, and no temp file."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    tmp = f"{path}{TMP_TAG}{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(parent, recursive=True)
        if is_local(uri):
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    _injected_fault(path)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            _injected_fault(path)
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as err:
        if isinstance(err, WriteError):
            raise
        raise WriteError(f"could not write {uri}: {err.strerror or err}; what was already complete is kept: "
                         "free space (or fix the folder's permissions) and rerun the same command to resume") from err


def _injected_fault(path: str) -> None:
    """The fault tests' hook: a write whose path ends with $WSG_FAULT_FAIL_WRITE
    fails as on a full disk (after its temp file got the bytes)."""
    tail = os.environ.get("WSG_FAULT_FAIL_WRITE")
    if tail and path.endswith(tail):
        raise OSError(errno.ENOSPC, "No space left on device (injected by WSG_FAULT_FAIL_WRITE)")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str):
    return json.loads(read_text(uri))


def write_table(uri: str, table: pa.Table) -> None:
    """Write a Parquet table atomically (whole file or nothing)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a folder; [] if it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def file_digest(uri: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    fs, path = resolve(uri)
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def relative(uri: str, root: str) -> str:
    """`uri` as a '/'-separated path under `root` (both as given to rundir)."""
    a, b = canonical(uri).rstrip("/"), canonical(root).rstrip("/")
    if a == b:
        return ""
    if not a.startswith(b + "/"):
        raise ValueError(f"{uri} is not under {root}")
    return a[len(b) + 1:]


def mark_complete(folder_uri: str, info: dict | None = None, *, files: Iterable[str] = (),
                  root: str | None = None) -> None:
    """Declare a multi-file artifact whole; readers ignore folders without it.

    files: the artifacts (URIs under `root`) the marker vouches for; each is
    listed by its path relative to `root` (the run; default the folder), size
    and sha256, and `at` says where the marker sits under `root`, so a copied
    run still checks (core/integrity.py)."""
    root = folder_uri if root is None else root
    listed = []
    for f in sorted(set(files)):
        size, sha = file_digest(f)
        listed.append({"path": relative(f, root), "size": size, "sha256": sha})
    write_json(join(folder_uri, COMPLETE_MARKER),
               {**(info or {}), VOUCHES: {"at": relative(folder_uri, root), "files": listed}})


def is_complete(folder_uri: str) -> bool:
    return exists(join(folder_uri, COMPLETE_MARKER))


def list_files(uri: str) -> list[str]:
    """Names of the plain files directly under a folder, files being written excluded."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pafs.FileType.File and TMP_TAG not in posixpath.basename(i.path))


def upload_dir(local_dir: str, dest_uri: str, files: Iterable[str] | None = None, *,
               vouch: Iterable[str] | None = None, root: str | None = None) -> None:
    """Copy a local folder's files to dest (local or URI), then mark it complete,
    vouching for `vouch` (default: every file copied); root: the run."""
    names = sorted(files) if files is not None else sorted(os.listdir(local_dir))
    copied = []
    for name in names:
        p = os.path.join(local_dir, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                write_bytes(join(dest_uri, name), f.read())
            copied.append(name)
    vouched = copied if vouch is None else [n for n in copied if n in set(vouch)]
    mark_complete(dest_uri, files=[join(dest_uri, n) for n in vouched], root=root)


def download_dir(src_uri: str, local_dir: str) -> str:
    """Copy a folder's files (non-recursive) to a local folder; return it.
    The completion marker, if the folder has one, is written last: "_COMPLETE"
    sorts before the files it vouches for."""
    os.makedirs(local_dir, exist_ok=True)
    if is_local(src_uri):
        fs, path = resolve(src_uri)
        src_uri = path
    for name in sorted(listdir(src_uri), key=lambda n: n == COMPLETE_MARKER):
        data = read_bytes(join(src_uri, name))
        with open(os.path.join(local_dir, name), "wb") as f:
            f.write(data)
    return local_dir
