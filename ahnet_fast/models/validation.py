"""Input checks for AH-Net: which tensors the network can take, with readable errors.

The rules below are derived from the layer arithmetic of MONAI's AHNet (and checked
against it by running MONAI on a grid of sizes, see tests/test_model_inputs.py).
Input is ``(B, C, H, W, D)`` for ``spatial_dims=3`` and ``(B, C, H, W)`` for 2D.

* The last axis (depth D in 3D, width W in 2D) goes through five halvings (stem
  z-pool, max-pool, three encoder z-pools) that the decoder's five doublings must
  undo exactly, so it must be a multiple of 32.
* The first axes (H, W in 3D; H in 2D) are halved five times as well (multiple of
  32). The pyramid pooling (PSP) branch pools the half-resolution map with windows
  of up to ``2**(psp_block_num + 2)``; with transposed-convolution upsampling the
  pooled map must tile it exactly, so these axes must be multiples of
  ``2**max(5, psp_block_num + 3)``; with interpolation they only have to be at least
  ``2**(psp_block_num + 3)``.
* Sizes the arithmetic lets through but which would give an output of another size
  (odd sizes: MONAI returns H+1) are rejected too.
* In training mode BatchNorm needs more than one value per channel at the deepest
  level: ``B * prod(size // 32) > 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["UPSAMPLE_MODES", "InputSpec", "check_input", "valid_spatial_shape"]

#: every upsample mode AHNet accepts, and the spatial_dims each one works with
UPSAMPLE_MODES: dict[str, tuple[int, ...]] = {
    "transpose": (2, 3),
    "nearest": (2, 3),
    "bilinear": (2,),
    "trilinear": (3,),
}

_AXIS_NAMES = {3: ("height", "width", "depth"), 2: ("height", "width")}


@dataclass(frozen=True)
class InputSpec:
    """What an AHNet accepts; built by ``AHNet.input_spec`` from its constructor arguments."""

    spatial_dims: int
    in_channels: int
    psp_block_num: int
    upsample_mode: str

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.psp_block_num not in (0, 1, 2, 3, 4):
            raise ValueError(f"psp_block_num must be an integer in 0..4, got {self.psp_block_num!r}")
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {self.in_channels!r}")
        dims = UPSAMPLE_MODES.get(self.upsample_mode)
        if dims is None:
            raise ValueError(
                f"upsample_mode must be one of {sorted(UPSAMPLE_MODES)}, got {self.upsample_mode!r}"
            )
        if self.spatial_dims not in dims:
            other = "trilinear" if self.spatial_dims == 3 else "bilinear"
            raise ValueError(
                f"upsample_mode {self.upsample_mode!r} does not work with spatial_dims={self.spatial_dims}; "
                f"use 'transpose', 'nearest' or {other!r}"
            )

    @property
    def axis_names(self) -> tuple[str, ...]:
        return _AXIS_NAMES[self.spatial_dims]

    def multiples(self) -> tuple[int, ...]:
        """Required multiple per spatial axis (the last axis is the anisotropic one)."""
        if self.upsample_mode == "transpose":
            first = 2 ** max(5, self.psp_block_num + 3)
        else:
            first = 32
        return (first,) * (self.spatial_dims - 1) + (32,)

    def minimums(self) -> tuple[int, ...]:
        """Smallest size per spatial axis (always a multiple of :meth:`multiples`)."""
        mins = []
        for i, m in enumerate(self.multiples()):
            low = m
            if i < self.spatial_dims - 1 and self.psp_block_num > 0:
                low = max(low, 2 ** (self.psp_block_num + 3))
            mins.append(-(-low // m) * m)
        return tuple(mins)


def _problems(spec: InputSpec, spatial: tuple[int, ...], batch: int, training: bool) -> list[str]:
    out = []
    for name, size, mult, low in zip(spec.axis_names, spatial, spec.multiples(), spec.minimums()):
        if size % mult:
            out.append(f"{name} {size} must be divisible by {mult}")
        elif size < low:
            out.append(f"{name} {size} must be at least {low}")
    if not out and training:
        deepest = batch
        for size in spatial:
            deepest *= size // 32
        if deepest <= 1:
            out.append(
                f"in training mode BatchNorm needs more than one value per channel at the deepest level "
                f"(batch {batch} x sizes {'x'.join(str(s // 32) for s in spatial)}): use a batch of 2 or more, "
                f"a spatial size of at least 64, or eval mode"
            )
    return out


def check_input(spec: InputSpec, x: torch.Tensor, training: bool = False) -> None:
    """Raise ``ValueError`` unless AHNet described by ``spec`` can take ``x``.

    Only shapes and dtype are looked at (no device sync). ``x`` must be
    ``(B, in_channels, H, W, D)`` (3D) or ``(B, in_channels, H, W)`` (2D), floating point,
    with spatial sizes following :meth:`InputSpec.multiples` and :meth:`InputSpec.minimums`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"AHNet expects a torch.Tensor, got {type(x).__name__}")
    want_ndim = spec.spatial_dims + 2
    layout = "(B, C, H, W, D)" if spec.spatial_dims == 3 else "(B, C, H, W)"
    if x.ndim != want_ndim:
        raise ValueError(
            f"AHNet(spatial_dims={spec.spatial_dims}) expects a {want_ndim}-D tensor {layout}, "
            f"got {x.ndim}-D with shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"AHNet expects a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}; "
            f"convert it, e.g. x.float()"
        )
    if x.shape[1] != spec.in_channels:
        raise ValueError(
            f"AHNet(in_channels={spec.in_channels}) got {x.shape[1]} channels (input shape {tuple(x.shape)}, "
            f"layout {layout})"
        )
    if x.shape[0] < 1:
        raise ValueError(f"AHNet got an empty batch (input shape {tuple(x.shape)})")
    spatial = tuple(int(s) for s in x.shape[2:])
    problems = _problems(spec, spatial, int(x.shape[0]), training)
    if problems:
        raise ValueError(
            f"AHNet(spatial_dims={spec.spatial_dims}, psp_block_num={spec.psp_block_num}, "
            f"upsample_mode={spec.upsample_mode!r}) cannot take input of shape {tuple(x.shape)}: "
            + "; ".join(problems)
            + " (ahnet_fast.models.padding.run_padded pads to a valid shape and crops the output back)"
        )


def valid_spatial_shape(
    spec: InputSpec, spatial: tuple[int, ...], batch: int = 1, training: bool = False
) -> tuple[int, ...]:
    """Smallest valid spatial shape that is >= ``spatial`` on every axis."""
    if len(spatial) != spec.spatial_dims:
        raise ValueError(f"expected {spec.spatial_dims} spatial sizes, got {tuple(spatial)}")
    if any(int(s) < 1 for s in spatial):
        raise ValueError(f"spatial sizes must be positive, got {tuple(spatial)}")
    out = [
        max(low, -(-int(s) // mult) * mult) for s, mult, low in zip(spatial, spec.multiples(), spec.minimums())
    ]
    if _problems(spec, tuple(out), batch, training):
        # only the training-mode BatchNorm rule can still fail: grow the first axis one step
        out[0] += spec.multiples()[0]
    return tuple(out)
