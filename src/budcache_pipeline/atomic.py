"""Atomic writes: a file or folder is either its old content or its new content, never a part of one.

A job killed with `kill -9` (or a machine losing power) mid-write must not leave a truncated
policy, report or reference batch that a rerun or a deployment would read as finished. Every
writer here writes to a temporary name in the target's own folder (so the rename stays on one
file system), flushes it to disk, then renames it over the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk; folders are opened read-only, as POSIX allows."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is flushed and renamed over `path`.

    For writers that only take a path (safetensors, pandas, matplotlib). On an exception the
    temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        _fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """An empty staging folder beside `path`; on success it replaces `path` whole.

    The old folder is renamed aside before the new one takes its place and removed after, so a
    kill leaves the old folder, the new one, or (between the two renames) the old one under
    `<name>.old`, which the next write removes; never a mix of both.
    """
    path = Path(path)
    staging, retired = path.with_name(path.name + TEMP_SUFFIX), path.with_name(path.name + ".old")
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for item in staging.rglob("*"):
            _fsync_path(item)
        _fsync_path(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, retired)
    os.replace(staging, path)
    _fsync_path(path.parent)
    shutil.rmtree(retired, ignore_errors=True)
