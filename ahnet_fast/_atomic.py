"""Atomic file writes: write a temporary file next to the destination, then ``os.replace``.

Bottom floor: imports only the standard library, so every layer (data, train, infer, cli,
bench) can use it. A reader of the destination sees either the complete old file or the
complete new one, never a half-written file, because ``os.replace`` within one folder is an
atomic rename on POSIX and Windows. A writer that raises (or is interrupted) leaves the old
file untouched and no temporary behind.

Usage::

    with atomic_path(out, suffix=".nii.gz") as tmp:
        image.to_filename(tmp)          # the writer picks its format from the suffix

    atomic_write_text(out / "result.json", json.dumps(result))
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which briefly changes it for every thread;
    Linux exposes it in ``/proc/self/status`` instead, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: str) -> None:
    # The writer may have closed its own handle; reopening and fsync-ing flushes the same inode.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(
    path: str | os.PathLike[str], suffix: str = "", *, fsync: bool = False, mkdir: bool = False
) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; on success move it over ``path``.

    Args:
        path: the destination file.
        suffix: kept at the end of the temporary name (e.g. ``".nii.gz"``, ``".png"``) for
            writers that choose a format from the file name.
        fsync: flush the file to disk before the rename (checkpoints: survive a power loss).
        mkdir: create the destination folder (and parents) if missing; otherwise a missing
            folder raises ``FileNotFoundError`` from ``tempfile.mkstemp``.

    The temporary file exists (empty) when the body starts. On success it gets the usual
    umask-based mode (``0o666 & ~umask``; ``mkstemp`` makes it ``0o600``), is optionally
    fsync-ed and then ``os.replace``-d over ``path``. On any exception, including
    ``KeyboardInterrupt``, the temporary is removed and the exception re-raised.
    """
    dest = os.fspath(path)
    folder = os.path.dirname(dest) or "."
    if mkdir:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, fsync: bool = False, mkdir: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync, mkdir=mkdir) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    encoding: str = "utf-8",
    fsync: bool = False,
    mkdir: bool = False,
) -> None:
    """Write ``text`` to ``path`` atomically with ``encoding`` (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync, mkdir=mkdir) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
