"""Pad a volume to a shape AH-Net can take, and crop the output back.

    padded, info = pad_to_valid(x, model.input_spec)        # (B, C, *valid spatial)
    y = crop_to_original(model(padded), info)                # (B, out, *original spatial)
    # or simply
    y = run_padded(model, x)

Padding is split evenly between the two ends of each axis (the extra voxel goes to the
end), so the content stays centred. Default fill is the constant 0; ``mode="replicate"``
or ``"reflect"`` repeat the border instead (``reflect`` needs the padding to be smaller
than the axis).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahnet_fast.models.validation import InputSpec, valid_spatial_shape

__all__ = ["PadInfo", "crop_to_original", "pad_to_valid", "run_padded"]

_MODES = ("constant", "replicate", "reflect")


@dataclass(frozen=True)
class PadInfo:
    """Where the original volume sits inside the padded one."""

    original: tuple[int, ...]  # original spatial sizes
    before: tuple[int, ...]  # voxels added in front of each spatial axis

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(b, b + n) for b, n in zip(self.before, self.original))


def pad_to_valid(
    x: torch.Tensor,
    spec: InputSpec,
    *,
    mode: str = "constant",
    value: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, PadInfo]:
    """Pad ``x`` (B, C, *spatial) to the smallest spatial shape ``spec`` accepts.

    Returns ``(padded, info)``; ``x`` itself when it already fits (no copy).
    ``training=True`` also satisfies the training-mode BatchNorm rule for this batch size.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if x.ndim != spec.spatial_dims + 2:
        raise ValueError(
            f"expected a {spec.spatial_dims + 2}-D tensor (B, C, *spatial) for spatial_dims={spec.spatial_dims}, "
            f"got shape {tuple(x.shape)}"
        )
    spatial = tuple(int(s) for s in x.shape[2:])
    target = valid_spatial_shape(spec, spatial, batch=int(x.shape[0]), training=training)
    before = tuple((t - s) // 2 for s, t in zip(spatial, target))
    info = PadInfo(original=spatial, before=before)
    if target == spatial:
        return x, info
    pads: list[int] = []
    for s, t, b in reversed(list(zip(spatial, target, before))):  # F.pad wants the last axis first
        pads += [b, t - s - b]
    if mode == "constant":
        return F.pad(x, pads, mode="constant", value=value), info
    if mode == "reflect" and any(t - s >= s for s, t in zip(spatial, target)):
        raise ValueError(f"reflect padding from {spatial} to {target} needs pads smaller than each axis; use 'replicate'")
    return F.pad(x, pads, mode=mode), info


def crop_to_original(y: torch.Tensor, info: PadInfo) -> torch.Tensor:
    """Crop a network output ``(B, C_out, *padded spatial)`` back to ``(B, C_out, *info.original)`` (a view)."""
    if y.ndim != 2 + len(info.original):
        raise ValueError(f"expected a {2 + len(info.original)}-D output, got shape {tuple(y.shape)}")
    for size, b, n in zip(y.shape[2:], info.before, info.original):
        if size < b + n:
            raise ValueError(f"output spatial shape {tuple(y.shape[2:])} is smaller than the padded input")
    return y[(slice(None), slice(None), *info.slices())]


def run_padded(
    model: nn.Module,
    x: torch.Tensor,
    *,
    spec: InputSpec | None = None,
    mode: str = "constant",
    value: float = 0.0,
) -> torch.Tensor:
    """``model`` applied to ``x`` of any spatial size: pad, run, crop.

    ``spec`` defaults to ``model.input_spec`` (every ahnet_fast AHNet has one); pass it for
    other models with AHNet's size rules (e.g. MONAI's AHNet).
    Returns ``(B, out_channels, *x.shape[2:])``.
    """
    if spec is None:
        spec = getattr(model, "input_spec", None)
        if not isinstance(spec, InputSpec):
            raise TypeError(f"{type(model).__name__} has no input_spec; pass spec=InputSpec(...)")
    padded, info = pad_to_valid(x, spec, mode=mode, value=value, training=model.training)
    return crop_to_original(model(padded), info)
