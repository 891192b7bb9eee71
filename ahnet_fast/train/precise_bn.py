"""BatchNorm statistics re-estimated on the windows inference sees ("precise BN").

Why: while training, each BatchNorm keeps an exponential moving average (momentum 0.1) of its
batch statistics, which is mostly the last ten or so batches. With the small batches of 3D
training (two patches) drawn mostly around foreground, that is a noisy estimate, and of a
distribution inference never sees: ``segment`` tiles whole volumes, background included, with
windows of the training patch and their mirror images. On the MNI task (bench/results/
unet_budget.md) the held-out Dice of one set of weights moved by 0.01 with nothing changed but
these running statistics.

:func:`recalibrate_batchnorm` replaces them with the plain average over batches of exactly those
windows, drawn from the training cases (never the cases a result is reported on): every
BatchNorm's running mean and variance are reset and re-accumulated with momentum
``1 / (batches seen)``, a cumulative average that the fused kernels of the fast model compute as
they do in training. Only the running statistics change; the learned weights do not. The result
depends on the weights alone (the old statistics are discarded), so re-running it is harmless.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ahnet_fast.infer.sliding_window import window_starts

__all__ = ["inference_windows", "recalibrate_batchnorm", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def inference_windows(images: Sequence[np.ndarray], window: Sequence[int], overlap: float = 0.25,
                      mirror_axes: Sequence[int] = (), limit: int = 256, seed: int = 0) -> list[np.ndarray]:
    """The windows sliding-window inference cuts from ``images``, with their mirror images.

    Args:
        images: volumes ``(H, W, D)`` (already normalised and at the training spacing).
        window: window size ``(h, w, d)`` (the training patch, as ``segment`` uses by default).
        overlap: window overlap, as in inference (0.25).
        mirror_axes: spatial axes (0 = H, 1 = W, 2 = D) mirrored at test time: every combination
            of them is added, as test-time mirroring runs the net on each.
        limit: at most this many windows, picked evenly over all of them (large datasets).
        seed: order of the windows (shuffled, so a batch mixes windows of different places, as
            training batches mix patches).

    Returns:
        ``float32`` arrays of shape ``window``; a volume smaller than the window on an axis is
        padded symmetrically with its minimum, as inference pads it.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    win = tuple(int(w) for w in window)
    mirrors = [()] + [tuple(c) for n in range(1, len(mirror_axes) + 1)
                      for c in itertools.combinations(sorted(mirror_axes), n)]
    places: list[tuple[int, tuple[int, int, int], tuple[int, ...]]] = []
    padded: list[np.ndarray] = []
    for idx, image in enumerate(images):
        if image.ndim != 3:
            raise ValueError(f"expected volumes (H, W, D), got shape {image.shape}")
        extra = [max(0, w - s) for s, w in zip(image.shape, win)]
        if any(extra):
            image = np.pad(image, [(e // 2, e - e // 2) for e in extra], mode="constant",
                           constant_values=float(image.min()))
        padded.append(image)
        starts = [window_starts(s, w, overlap) for s, w in zip(image.shape, win)]
        places += [(idx, (i, j, k), m) for i, j, k in itertools.product(*starts) for m in mirrors]
    if len(places) > limit:
        places = [places[int(i)] for i in np.linspace(0, len(places) - 1, limit).round().astype(int)]
    order = np.random.default_rng(seed).permutation(len(places))
    out = []
    for p in order:
        idx, (i, j, k), m = places[int(p)]
        w = padded[idx][i:i + win[0], j:j + win[1], k:k + win[2]]
        if m:
            w = np.flip(w, axis=m)
        out.append(np.ascontiguousarray(w, dtype=np.float32))
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, windows: Sequence[np.ndarray], batch_size: int,
                          device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None
                          ) -> dict[str, Any]:
    """Set every BatchNorm's running statistics to their average over batches of ``windows``.

    Args:
        model: the network (``(B, 1, h, w, d)`` in); left in eval mode.
        windows: inputs ``(h, w, d)`` (:func:`inference_windows`).
        batch_size: windows per forward pass (the training batch: the statistics of deeper layers
            depend on the batch statistics of the layers before them, as in training).
        device: where the model runs.
        autocast_dtype: bf16/fp16 autocast as in training (None: fp32).

    Returns:
        ``{"layers", "batches", "windows"}``: what was re-estimated from what. A remainder smaller
        than ``batch_size`` is left out when there is at least one full batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    layers = batchnorm_layers(model)
    n = len(windows)
    if not layers or n == 0:
        return {"layers": len(layers), "batches": 0, "windows": 0}
    usable = n if n < batch_size else n - n % batch_size
    momenta = [m.momentum for m in layers]
    device = torch.device(device)
    # the windows in the parameters' precision (autocast, if any, lowers it per op as in training)
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
    model.train()
    batches = 0
    try:
        for lo in range(0, usable, batch_size):
            batches += 1
            for m in layers:
                m.momentum = 1.0 / batches  # cumulative average: batch b weighs 1/b
            x = torch.from_numpy(np.stack(windows[lo:lo + batch_size]))[:, None].to(device, dtype)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                model(x)
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        model.train(was_training)
    model.eval()
    return {"layers": len(layers), "batches": batches, "windows": min(usable, n)}
