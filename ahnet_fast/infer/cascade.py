"""Coarse-to-fine cascade inference (after Roth et al. 2018).

Pass 1 runs the model on the volume downsampled in-plane (``factor`` along H
and W; D, already the coarse axis, is kept) and takes the bounding box of
its foreground. Pass 2 runs at full resolution only inside that box plus a
margin. Outside the box the result is the pass-1 output upsampled to full
resolution, so the returned logits always cover the whole volume.

If pass 1 finds no foreground, pass 2 is skipped (``stats.pass2_fraction ==
0``) and the upsampled pass-1 output is returned: a cascade trusts its
first stage, which is what saves the time; use ``empty="full"`` to run a
full-resolution pass in that case instead.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sliding_window import sliding_window_inference

__all__ = ["CascadeStats", "cascade_inference", "default_foreground"]


@dataclass
class CascadeStats:
    """What the cascade did.

    Attributes:
        roi: full-resolution ``((h0, h1), (w0, w1), (d0, d1))`` processed by
            pass 2 (half-open), or None when pass 2 was skipped.
        pass2_fraction: voxels in the ROI / voxels in the volume.
        time_pass1, time_pass2: seconds (wall clock, device synchronised).
        coarse_shape: spatial shape of the pass-1 input.
    """

    roi: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None
    pass2_fraction: float
    time_pass1: float
    time_pass2: float
    coarse_shape: tuple[int, int, int]

    @property
    def total_time(self) -> float:
        return self.time_pass1 + self.time_pass2


def default_foreground(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, ...)`` logits -> ``(B, ...)`` bool: argmax != 0 (K > 1) or logit > 0 (K == 1)."""
    if logits.shape[1] == 1:
        return logits[:, 0] > 0
    return logits.argmax(dim=1) != 0


def _sync(*devices: torch.device) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def cascade_inference(
    inputs: torch.Tensor,
    model: nn.Module,
    coarse_model: nn.Module | None = None,
    factor: int | Sequence[int] = 2,
    margin: Sequence[int] = (16, 16, 4),
    foreground: Callable[[torch.Tensor], torch.Tensor] = default_foreground,
    empty: Literal["coarse", "full"] = "coarse",
    **sw_kwargs: Any,
) -> tuple[torch.Tensor, CascadeStats]:
    """Two-pass inference: coarse in-plane pass for the ROI, full resolution inside it.

    Args:
        inputs: ``(B, C, H, W, D)``; the ROI is the union over the batch.
        model: full-resolution model (``(n, C, h, w, d) -> (n, K, h, w, d)``).
        coarse_model: model for pass 1 (default: ``model``, which then sees
            an image ``factor`` times coarser in-plane than in training).
        factor: in-plane downsampling of pass 1 (int or ``(fh, fw)``), >= 1.
        margin: full-resolution voxels added around the ROI per axis.
        foreground: maps pass-1 logits to a boolean foreground mask.
        empty: what to do when pass 1 finds no foreground (module docstring).
        **sw_kwargs: passed to :func:`sliding_window_inference` for both passes
            (window, overlap, blend, sw_batch_size, sw_device, device, ...).

    Returns:
        ``(logits (B, K, H, W, D) float32 on the stitching device, CascadeStats)``.
    """
    if inputs.ndim != 5:
        raise ValueError(f"inputs must be (B, C, H, W, D), got shape {tuple(inputs.shape)}")
    fh, fw = (factor, factor) if isinstance(factor, int) else tuple(int(f) for f in factor)
    if fh < 1 or fw < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if len(margin) != 3 or any(int(m) < 0 for m in margin):
        raise ValueError(f"margin must be 3 non-negative voxel counts, got {tuple(margin)}")
    if empty not in ("coarse", "full"):
        raise ValueError(f"empty must be 'coarse' or 'full', got {empty!r}")
    coarse_model = coarse_model or model
    H, W, D = (int(s) for s in inputs.shape[2:])
    ch, cw = max(1, round(H / fh)), max(1, round(W / fw))
    out_device = torch.device(sw_kwargs.get("device") or inputs.device)
    run_device = torch.device(sw_kwargs.get("sw_device") or inputs.device)

    t0 = time.perf_counter()
    small = F.interpolate(inputs, size=(ch, cw, D), mode="area") if (ch, cw) != (H, W) else inputs
    coarse = sliding_window_inference(small, coarse_model, **sw_kwargs)
    fg = foreground(coarse).any(dim=0)  # (ch, cw, D), union over the batch
    full = F.interpolate(coarse, size=(H, W, D), mode="trilinear", align_corners=False) \
        if (ch, cw) != (H, W) else coarse.clone()
    _sync(out_device, run_device)
    t1 = time.perf_counter()

    if not bool(fg.any()):
        if empty == "coarse":
            return full, CascadeStats(None, 0.0, t1 - t0, 0.0, (ch, cw, D))
        roi = ((0, H), (0, W), (0, D))
    else:
        idx = fg.nonzero()
        lo, hi = idx.min(dim=0).values.tolist(), idx.max(dim=0).values.tolist()
        scale = (H / ch, W / cw, 1.0)
        roi = tuple(
            (max(0, int(math.floor(l * s)) - m), min(n, int(math.ceil((h + 1) * s)) + m))
            for l, h, s, m, n in zip(lo, hi, scale, margin, (H, W, D))
        )  # type: ignore[assignment]
    (h0, h1), (w0, w1), (d0, d1) = roi
    fine = sliding_window_inference(inputs[:, :, h0:h1, w0:w1, d0:d1], model, **sw_kwargs)
    full[:, :, h0:h1, w0:w1, d0:d1] = fine.to(full.device)
    _sync(out_device, run_device)
    t2 = time.perf_counter()
    frac = (h1 - h0) * (w1 - w0) * (d1 - d0) / float(H * W * D)
    return full, CascadeStats(roi, frac, t1 - t0, t2 - t1, (ch, cw, D))  # type: ignore[arg-type]
