"""Atomic training checkpoints and RNG state capture.

A checkpoint is a dict saved with ``torch.save`` that the inference side
(:func:`ahnet_fast.infer.model_io.load_model`) can read directly:

* ``model_config``: the model constructor's keyword arguments;
* ``model``: state_dict;
* ``optimizer``, ``scaler``, ``schedule`` (loss switch, plateau counters),
  ``rng`` (python, numpy, torch CPU and CUDA generator states), ``step``,
  ``epoch``, ``stage`` and anything else the trainer adds.

Everything is stored as tensors, numbers, strings, lists, tuples and dicts, so
``torch.load(..., weights_only=True)`` (the safe loader) reads it.

Writes are atomic: the checkpoint goes to a temporary file in the destination
folder, is flushed to disk, and then ``os.replace``-d over the destination, so a
run killed at any moment leaves either the previous or the new checkpoint,
never a truncated one. A write that fails (full disk, read-only folder) raises
:class:`CheckpointWriteError` (an ``OSError``) naming the file.

Integrity: :func:`save_checkpoint` stores ``content_sha256``, a SHA-256 over every
entry (tensor bytes, dtypes and shapes included); :func:`load_checkpoint` and
:func:`ahnet_fast.infer.model_io.load_model` recompute it, so bytes corrupted inside a
weight tensor (which ``torch.load`` reads without complaint) are refused. Checkpoints
written before the hash existed load without the check.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahnet_fast._atomic import atomic_path

__all__ = [
    "HASH_KEY",
    "CheckpointWriteError",
    "capture_rng",
    "content_hash",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "verify_content",
]

#: the payload entry holding :func:`content_hash` of the other entries
HASH_KEY = "content_sha256"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file, the reason and the free space."""


def capture_rng() -> dict[str, Any]:
    """Python, numpy (global legacy generator), torch CPU and all CUDA generator states."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(_to_tuple(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _feed(h: Any, x: Any) -> None:
    """Hash ``x`` with its type and structure, so equal hashes mean equal contents."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(x, np.ndarray):
        h.update(f"A{x.dtype.str}{x.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(x)).cast("B"))
    elif isinstance(x, dict):
        h.update(f"D{len(x)}".encode())
        for k in sorted(x, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):  # the safe loader may return a tuple as a list
        h.update(f"L{len(x)}".encode())
        for v in x:
            _feed(h, v)
    else:
        h.update(f"S{type(x).__name__}:{x!r};".encode())


def content_hash(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of every entry of ``payload`` except :data:`HASH_KEY`."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != HASH_KEY})
    return h.hexdigest()


def verify_content(ckpt: Any, path: str | os.PathLike) -> None:
    """Raise ``ValueError`` if ``ckpt`` records a content hash that its contents do not match."""
    if not isinstance(ckpt, dict) or HASH_KEY not in ckpt:
        return
    if content_hash(ckpt) != ckpt[HASH_KEY]:
        raise ValueError(
            f"{path}: the checkpoint is corrupted (its contents do not match the SHA-256 recorded when it was "
            "written); use another copy, or the previous checkpoint (best.pt / last.pt)"
        )


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` with its content hash (see module docstring)."""
    path = Path(path)
    payload = {**payload, HASH_KEY: content_hash(payload)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
    except (OSError, RuntimeError) as exc:
        # torch's zip writer reports a full disk as RuntimeError("[enforce fail at inline_container.cc...")
        if isinstance(exc, RuntimeError) and "inline_container" not in str(exc) and "write" not in str(exc):
            raise
        raise CheckpointWriteError(errno.EIO, _write_failure(path, exc)) from exc
    return path


def _write_failure(path: Path, exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free there"
    except OSError:
        free = ""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif isinstance(exc, RuntimeError):
        reason = f"the write stopped part way ({reason}): most likely the disk is full"
    return f"{path}: cannot write the checkpoint: {reason}{free}; the previous checkpoint there is unchanged"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (safe loader), checking its content hash.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable checkpoint, or corrupted (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a training checkpoint (expected a dict with 'model', 'model_config', ...)")
    verify_content(ckpt, path)
    return ckpt
