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

A checkpoint is data, not code: before anything is built, ``model_config`` is checked
against the AH-Net constructor's arguments and ranges (:func:`check_model_config`: known
keys only, 4 block counts in 1..64, channels in 1..1024, ...), and ``pretrained`` is
refused, since following a path or URL named by a file is not the file's business. The
content hash written by :func:`ahnet_fast.train.checkpoint.save_checkpoint` is verified,
and weights holding NaN/Inf are refused (they give an all-background segmentation).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


__all__ = [
    "CheckpointError",
    "MODEL_CONFIG_LIMITS",
    "check_model_config",
    "load_model",
    "default_model_class",
    "save_model_checkpoint",
]

#: what a checkpoint's ``model_config`` may hold for AH-Net, and the accepted range of each
#: entry. The constructor documents the lower bounds; the upper bounds are far beyond any
#: published AH-Net/ResNet (ResNet-152: 3, 8, 36, 3 blocks; tens of classes) and stop a
#: corrupt or hostile file from making the loader allocate gigabytes or build for minutes.
MODEL_CONFIG_LIMITS: dict[str, str] = {
    "layers": "4 integers in 1..64 (blocks of layer1..layer4)",
    "spatial_dims": "2 or 3",
    "in_channels": "an integer in 1..64",
    "out_channels": "an integer in 1..1024",
    "psp_block_num": "an integer in 0..4",
    "upsample_mode": "'transpose', 'nearest', 'trilinear' or 'bilinear'",
    "pretrained": "False or None (a checkpoint never names weights to fetch or open)",
    "progress": "True or False",
    "activation_checkpointing": "True or False",
    "sync_bn": "True or False",
}

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


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_model_config(config: Any, where: str = "model_config") -> dict[str, Any]:
    """Check a checkpoint's AH-Net ``model_config`` against :data:`MODEL_CONFIG_LIMITS`.

    Returns the config (``layers`` as a tuple). Raises :class:`CheckpointError` naming the
    entry, its value and what is accepted; nothing is built or opened before this passes.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: 'model_config' must be a dict of constructor arguments, "
                              f"got {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in MODEL_CONFIG_LIMITS)
    if unknown:
        raise CheckpointError(f"{where}: model_config has unknown entries {unknown}; accepted: "
                              f"{', '.join(MODEL_CONFIG_LIMITS)}")
    checks = {
        "layers": lambda v: isinstance(v, (list, tuple)) and len(v) == 4 and all(_int_in(n, 1, 64) for n in v),
        "spatial_dims": lambda v: _int_in(v, 2, 3),
        "in_channels": lambda v: _int_in(v, 1, 64),
        "out_channels": lambda v: _int_in(v, 1, 1024),
        "psp_block_num": lambda v: _int_in(v, 0, 4),
        "upsample_mode": lambda v: v in ("transpose", "nearest", "trilinear", "bilinear"),
        "pretrained": lambda v: v is None or v is False,
        "progress": lambda v: isinstance(v, bool),
        "activation_checkpointing": lambda v: isinstance(v, bool),
        "sync_bn": lambda v: isinstance(v, bool),
    }
    for key, value in config.items():
        if not checks[key](value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise CheckpointError(f"{where}: model_config[{key!r}] = {shown} is not accepted; expected "
                                  f"{MODEL_CONFIG_LIMITS[key]}")
    out = dict(config)
    if "layers" in out:
        out["layers"] = tuple(out["layers"])
    return out


def _nonfinite_entries(state: dict[str, Any]) -> list[str]:
    bad = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})")
    return bad


def _read_failure(path: str, exc: BaseException, allow_pickle: bool) -> CheckpointError:
    """The message for a file the safe loader could not read: advice only where it applies."""
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    legacy = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    refused = "Weights only load failed" in str(exc) or "weights_only" in str(exc)
    if refused and (is_zip or legacy) and not allow_pickle:
        return CheckpointError(
            f"{path}: the safe loader (weights_only=True) refused objects in it ({str(exc).splitlines()[0]}); "
            "load it with --allow-pickle (allow_pickle=True) only if you trust where the file came from"
        )
    if not (is_zip or legacy):
        return CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a legacy "
                               "pickle); expected a file written by `ahnet-fast train` or torch.save")
    return CheckpointError(f"{path}: cannot read the checkpoint, it is damaged or truncated "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


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
    from ahnet_fast.train.checkpoint import verify_content

    path = str(checkpoint_path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        problem = _read_failure(path, exc, allow_pickle)
        if not allow_pickle or "not a PyTorch" in str(problem):
            raise problem from exc
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise _read_failure(path, exc2, True) from exc2
    except Exception as exc:
        raise _read_failure(path, exc, allow_pickle) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        keys = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: expected a dict with 'model_config' (constructor kwargs) and 'model' (state_dict), "
            f"found {keys}"
        )
    try:
        verify_content(ckpt, path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' must be a state_dict, got {type(state).__name__}")
    cls = model_class or default_model_class()
    config = ckpt["model_config"]
    if model_class is None:
        config = check_model_config(config, path)
    elif not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'model_config' must be a dict of constructor kwargs, "
                              f"got {type(config).__name__}")
    elif config.get("pretrained"):
        raise CheckpointError(f"{path}: model_config['pretrained'] = {config['pretrained']!r} is refused: a "
                              "checkpoint never names weights to fetch or open")
    state = _strip_prefixes(state)
    bad = _nonfinite_entries(state)
    if bad:
        raise CheckpointError(f"{path}: the weights hold NaN/Inf values in {len(bad)} tensor(s): "
                              f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''} (a diverged or damaged "
                              "training run); use an earlier checkpoint")
    try:
        model = cls(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model_config {config} is not valid for {getattr(cls, '__name__', cls)}: {exc}") from exc
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
    """Write ``{"model_config", "model", **extra}`` atomically, with its content hash (exports, tests)."""
    from ahnet_fast.train.checkpoint import save_checkpoint

    return save_checkpoint(path, {"model_config": dict(model_config), "model": model.state_dict(), **extra})
