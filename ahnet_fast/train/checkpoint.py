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
never a truncated one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahnet_fast._atomic import atomic_path

__all__ = ["capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint"]


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


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` (see module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (safe loader).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable checkpoint (the message names the file).
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
    return ckpt
