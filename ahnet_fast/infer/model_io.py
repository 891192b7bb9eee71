"""Loading a trained model for inference from a checkpoint file.

Checkpoint format (shared with training): a dict saved with ``torch.save``
holding at least

* ``"model_config"``: the AHNet constructor keyword arguments
  (e.g. ``{"in_channels": 1, "out_channels": 4, "psp_block_num": 3,
  "upsample_mode": "trilinear"}``);
* ``"model"``: the model's ``state_dict``.

Extra keys (optimizer, scaler, step, RNG state, preprocessing description,
...) are tolerated. Prefixes added by ``DataParallel`` (``module.``) and
``torch.compile`` (``_orig_mod.``) are stripped from state_dict keys.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ahnet_fast._atomic import atomic_path

__all__ = ["CheckpointError", "load_model", "default_model_class", "save_model_checkpoint"]

_BIG_KEYS = {"model", "optimizer", "scaler", "scheduler", "rng", "rng_state"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def default_model_class() -> Callable[..., nn.Module]:
    """``ahnet_fast.AHNet`` (the drop-in model)."""
    import ahnet_fast

    try:
        return ahnet_fast.AHNet
    except (ImportError, AttributeError):
        # the top-level re-export may not exist in a partial install; the topology itself does
        from ahnet_fast.models.ahnet import AHNet

        return AHNet


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _mismatch(path: str, config: dict, model: nn.Module, state: dict[str, Any]) -> str | None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {few(shapes)}")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {few(unexpected)}")
    return (
        f"{path}: the weights do not fit {type(model).__name__}(**{config}): " + "; ".join(parts)
        + " (was the checkpoint saved from a model of another configuration, or is model_config wrong?)"
    )


def load_model(
    checkpoint_path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    model_class: Callable[..., nn.Module] | None = None,
    allow_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model described by a checkpoint and load its weights.

    Args:
        checkpoint_path: file written by training (see module docstring).
        map_location: where tensors are loaded.
        model_class: constructor taking ``**model_config`` (default
            :func:`default_model_class`).
        allow_pickle: load with ``weights_only=False`` if the safe loader
            refuses the file (only for checkpoints you trust: unpickling can
            run code).

    Returns:
        ``(model in eval mode, metadata)``: metadata holds ``model_config``
        and the checkpoint's other small entries (not the weights, optimizer
        or RNG state).
    """
    path = str(checkpoint_path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: the safe loader (weights_only=True) refused it ({exc}); if you trust the file, "
                "load it with allow_pickle=True"
            ) from exc
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: expected a dict with 'model_config' (constructor kwargs) and 'model' (state_dict), "
            f"found {keys}"
        )
    config = ckpt["model_config"]
    state = ckpt["model"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'model_config' must be a dict of constructor kwargs, got {type(config).__name__}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' must be a state_dict, got {type(state).__name__}")
    cls = model_class or default_model_class()
    try:
        model = cls(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model_config {config} is not valid for {getattr(cls, '__name__', cls)}: {exc}") from exc
    state = _strip_prefixes(state)
    problem = _mismatch(path, config, model, state)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k not in _BIG_KEYS}
    return model, meta


def save_model_checkpoint(
    path: str | os.PathLike, model: nn.Module, model_config: dict[str, Any], **extra: Any
) -> Path:
    """Write ``{"model_config", "model", **extra}`` atomically (for exports and tests)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"model_config": dict(model_config), "model": model.state_dict(), **extra}, tmp)
    return path
