"""``zmaxpool``: max-pool (1, 1, 2) / (1, 1, 2) along the slice axis D, with no index tensor."""
from __future__ import annotations

import torch

from . import _backend, _checks, composite
from ._library import zmaxpool_op

__all__ = ["zmaxpool"]


def zmaxpool(x: torch.Tensor) -> torch.Tensor:
    """Max over z-pairs: ``y[..., j] = max(x[..., 2j], x[..., 2j+1])``, like nn.MaxPool3d((1,1,2)).

    Args:
        x: (N, C, H, W, D), D >= 2, float32/float16/bfloat16 (float64 on the reference backend);
           contiguous or channels_last_3d (the output follows the input's memory format).
    Returns:
        (N, C, H, W, D // 2); an odd last slice is dropped (floor, like nn.MaxPool3d).

    Ties and NaN follow torch's max_pool3d: the first element of a pair wins a tie, a NaN
    propagates and takes the gradient. Saves for backward: x only; backward recomputes the
    pair argmax from x (no int64 index tensor, unlike F.max_pool3d's 8 bytes per output).
    """
    _checks.tensor5("x", x)
    if x.shape[-1] < 2:
        raise ValueError(f"zmaxpool needs D >= 2 (pairs along the last axis), got shape {tuple(x.shape)}")
    if _backend.composite_path(x):
        return composite.zmaxpool(x)
    return zmaxpool_op(x, _backend.call_arg())
