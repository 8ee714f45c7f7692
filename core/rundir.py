"""The run directory: the only state shared between stages (docs/design.md).

A run is a local folder or an object-store URI (`s3://`, `gs://`); all I/O
goes through `pyarrow.fs` so the same code serves both. Artifacts become
visible only when whole: local files are written to a temporary sibling and
renamed; on object stores a single PUT is atomic per object, and multi-file
artifacts (adapter folders) are completed by a `_COMPLETE` marker written last.
"""
from __future__ import annotations

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

COMPLETE_MARKER = "_COMPLETE"


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
    """Write a whole file atomically (temp sibling + rename on local disks)."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if is_local(uri):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


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


def mark_complete(folder_uri: str, info: dict | None = None) -> None:
    """Declare a multi-file artifact whole; readers ignore folders without it."""
    write_json(join(folder_uri, COMPLETE_MARKER), info or {})


def is_complete(folder_uri: str) -> bool:
    return exists(join(folder_uri, COMPLETE_MARKER))


def upload_dir(local_dir: str, dest_uri: str, files: Iterable[str] | None = None) -> None:
    """Copy a local folder's files to dest (local or URI), then mark it complete."""
    names = sorted(files) if files is not None else sorted(os.listdir(local_dir))
    for name in names:
        p = os.path.join(local_dir, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                write_bytes(join(dest_uri, name), f.read())
    mark_complete(dest_uri)


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
