"""Atomic file writes: write a temporary file next to the destination, then ``os.replace``.

Bottom floor: imports only the standard library, so every layer (data, train, infer, cli,
bench) can use it. A reader of the destination sees either the complete old file or the
complete new one, never a half-written file, because ``os.replace`` within one folder is an
atomic rename on POSIX and Windows. A writer that raises (or is interrupted) leaves the old
file untouched and no temporary behind.

Temporaries are hidden and named ``.<dest name>.<host>-<pid>.<random>.tmp`` (a file) or, when
the writer needs a file-name suffix to pick its format, a hidden folder of that name ending in
``.tmpd`` holding ``out<suffix>``. No name ends in an input extension (``*.nii.gz``,
``*.pt``, ...), so a folder scan for inputs never picks one up. A process killed with
SIGKILL cannot remove its temporaries; the next write into the same folder (and
:func:`clean_stale_temps`, which the commands call on their output folders) removes those
whose writer, identified by host and pid, is no longer running.

Usage::

    with atomic_path(out, suffix=".nii.gz") as tmp:
        image.to_filename(tmp)          # the writer picks its format from the suffix

    atomic_write_text(out / "result.json", json.dumps(result))

    with atomic_group([probs, labels], suffixes=[".nii.gz", ".nii.gz"]) as (tp, tl):
        ...                             # both written; published together, labels last
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

__all__ = [
    "atomic_path",
    "atomic_group",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_stale_temps",
    "current_umask",
    "is_temp_name",
]

# ".<dest>.<host>-<pid>.<random>.tmp" or ".tmpd" (folder); mkstemp's random part is [a-z0-9_]
_TEMP_RE = re.compile(r"^\.(?P<dest>.+)\.(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmpd?$")
# what earlier versions wrote (".<dest>.<random>.tmp<suffix>"): no pid to ask, so only removed
# once untouched for LEGACY_AGE_S (a live writer keeps its file's mtime fresh)
_LEGACY_RE = re.compile(r"^\.(?P<dest>.+)\.[a-z0-9_]{8}\.tmp(\.nii|\.nii\.gz|\.png)?$")
LEGACY_AGE_S = 3600.0


def _host() -> str:
    # only characters that cannot clash with the name's separators
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24]


def _temp_prefix(dest_name: str) -> str:
    return f".{dest_name}.{_host()}-{os.getpid()}."


def is_temp_name(name: str) -> bool:
    """True for a temporary written by :func:`atomic_path` (any process, any host)."""
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never ask, keep its files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


def clean_stale_temps(folder: str | os.PathLike[str], dest_name: str | None = None) -> list[str]:
    """Remove temporaries in ``folder`` left by writers on this host that no longer run.

    Args:
        folder: the destination folder (a missing folder is fine: nothing to clean).
        dest_name: only temporaries of this destination file name.

    Returns the removed names. Temporaries of running processes and of other hosts (a
    shared file system) are kept: their writer may still be busy. Temporaries named by
    earlier versions (no pid in the name) are removed once unmodified for an hour.
    """
    host = _host()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        legacy = None if m else _LEGACY_RE.match(entry.name)
        found = m or legacy
        if found is None or (dest_name is not None and found.group("dest") != dest_name):
            continue
        if m is not None and (m.group("host") != host or _pid_alive(int(m.group("pid")))):
            continue
        if legacy is not None:
            try:
                if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < LEGACY_AGE_S:
                    continue
            except FileNotFoundError:
                continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


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


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def _staged(path: str | os.PathLike[str], suffix: str, mkdir: bool) -> Iterator[tuple[str, str, str]]:
    """Create the temporary for ``path``; yield ``(dest, tmp file, what to remove)``; remove on error."""
    dest = os.fspath(path)
    folder = os.path.dirname(dest) or "."
    if mkdir:
        os.makedirs(folder, exist_ok=True)
    base = os.path.basename(dest)
    clean_stale_temps(folder, base)  # a killed earlier write of the same file
    if suffix:
        # the writer needs the suffix at the end of the name: a hidden folder keeps it off input globs
        holder = tempfile.mkdtemp(prefix=_temp_prefix(base), suffix=".tmpd", dir=folder)
        tmp = os.path.join(holder, "out" + suffix)
        open(tmp, "wb").close()
    else:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(base), suffix=".tmp", dir=folder)
        os.close(fd)
        holder = tmp
    try:
        yield dest, tmp, holder
    except BaseException:
        _remove(holder)
        raise


def _finish(tmp: str, fsync: bool) -> None:
    os.chmod(tmp, 0o666 & ~current_umask())
    if fsync:
        _fsync_file(tmp)


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
            folder raises ``FileNotFoundError`` from ``tempfile``.

    The temporary file exists (empty) when the body starts. On success it gets the usual
    umask-based mode (``0o666 & ~umask``; ``mkstemp`` makes it ``0o600``), is optionally
    fsync-ed and then ``os.replace``-d over ``path``. On any exception, including
    ``KeyboardInterrupt``, the temporary is removed and the exception re-raised.
    """
    with _staged(path, suffix, mkdir) as (dest, tmp, holder):
        yield tmp
        _finish(tmp, fsync)
        os.replace(tmp, dest)
        if holder != tmp:
            _remove(holder)


@contextmanager
def atomic_group(
    paths: Sequence[str | os.PathLike[str]],
    suffixes: Sequence[str] | None = None,
    *,
    fsync: bool = False,
) -> Iterator[list[str]]:
    """Write several files that belong together (e.g. probabilities and labels of one case).

    Yields one temporary per path (see :func:`atomic_path`). Nothing is published until the
    body has written all of them. Then the **last** path is the commit marker: its old
    version is removed first, the others are moved into place, and the last one last. So
    whenever the last file exists, every file of the group comes from the same write; an
    interruption in between leaves the marker missing, never new files beside old ones.
    """
    suffixes = list(suffixes) if suffixes is not None else [""] * len(paths)
    if len(suffixes) != len(paths) or not paths:
        raise ValueError("atomic_group needs one suffix per path and at least one path")
    with ExitStack() as stack:
        staged = [stack.enter_context(_staged(p, s, False)) for p, s in zip(paths, suffixes)]
        yield [tmp for _, tmp, _ in staged]
        for _, tmp, _ in staged:
            _finish(tmp, fsync)
        marker = staged[-1][0]
        try:
            os.unlink(marker)
        except FileNotFoundError:
            pass
        for dest, tmp, holder in staged:
            os.replace(tmp, dest)
            if holder != tmp:
                _remove(holder)


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
