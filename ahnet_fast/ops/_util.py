"""Small helpers shared by the op wrappers, the fakes and every backend (no policy here)."""
from __future__ import annotations

import collections
import contextlib
from typing import Iterator, Optional, Sequence

import torch

ZPOOL_MODES = ("none", "before_bn", "after_bn")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triple(v: int | Sequence[int], name: str) -> list[int]:
    """(a, b, c) from an int or a 3-sequence of ints (as nn.Conv3d accepts)."""
    if isinstance(v, int):
        return [v, v, v]
    vals = [int(t) for t in v]
    if len(vals) != 3:
        raise ValueError(f"{name} must be an int or 3 ints (h, w, d), got {tuple(v)}")
    return vals


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """BN statistics are fp32, except for float64 inputs (gradcheck), which keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format outputs follow: channels_last_3d for a channels-last input (also a
    channel slice of one), contiguous for a contiguous one.

    A tensor that is both (C = 1, e.g. every AH-Net's 1-channel input) says nothing about the
    caller's layout: it gets channels_last_3d, the layout the fused GPU kernels are built for
    (16-byte channel vectors) and the one in which torch's CPU convs (oneDNN) are fastest.
    Following "the input" there would drag a whole network into NCDHW.
    """
    if x.dim() != 5:
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if x.is_contiguous():
        return torch.contiguous_format
    if x.size(1) > 1 and x.stride(1) == 1:
        return torch.channels_last_3d
    return torch.contiguous_format


def conv_grad_format(x: torch.Tensor) -> torch.memory_format:
    """The layout ``aten.convolution_backward`` returns 5-D gradients in for operands on
    ``x``'s device: torch's CPU 3-D conv backward (oneDNN and its own kernel alike) returns them
    NCDHW whatever the operands' layout; cuDNN follows the operands (channels-last in, channels-
    last out). Gradients the ops pass on from a conv backward are declared in this layout, so
    they are never copied into the other one just to be read by the next (layout-agnostic)
    kernel."""
    if x.device.type == "cpu" and not _GPU_GRADIENT_LAYOUTS:
        return torch.contiguous_format
    return memory_format(x)


_GPU_GRADIENT_LAYOUTS = False


@contextlib.contextmanager
def gpu_gradient_layouts() -> Iterator[None]:
    """Inside, CPU tensors get the GPU's gradient layouts (``conv_grad_format`` as for CUDA; the
    CPU's gradients are restrided to them): recording on a CPU what a GPU would launch and
    compile (the compile census and the static sm_90 report do)."""
    global _GPU_GRADIENT_LAYOUTS
    prev, _GPU_GRADIENT_LAYOUTS = _GPU_GRADIENT_LAYOUTS, True
    try:
        yield
    finally:
        _GPU_GRADIENT_LAYOUTS = prev


def next_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                       var: torch.Tensor, count: int, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The running statistics after one training batch, as nn.BatchNorm computes them:
    ``r + momentum*(batch - r)`` with the unbiased variance ``var*count/(count-1)``, in the
    statistics dtype, returned in the buffers' dtype (the buffers are not written)."""
    sdt = mean.dtype
    unbiased = var * (count / (count - 1))
    nm = torch.lerp(running_mean.to(sdt), mean, momentum).to(running_mean.dtype)
    nv = torch.lerp(running_var.to(sdt), unbiased, momentum).to(running_var.dtype)
    return nm, nv


def is_supported_layout(t: torch.Tensor) -> bool:
    """Dense contiguous or channels_last_3d, or a channel slice ``buf[:, a:b]`` of either
    (what the fused kernels address directly); anything else (permuted, expanded) is not."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return True
    if t.dim() != 5:
        return False
    n, c, h, w, d = t.shape
    sn, sc, sh, sw, sd = t.stride()
    if sd == 1 and sw == d and sh == w * d and sc == h * w * d:  # slice of a contiguous buffer
        return sn >= c * sc
    if sc == 1:  # slice of a channels_last_3d buffer with ctot = sd channels
        ctot = sd
        return ctot >= c and sw == d * ctot and sh == w * d * ctot and sn >= h * w * d * ctot
    return False


def empty5(shape: Sequence[int], like: torch.Tensor, fmt: torch.memory_format,
           dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


# Copies restride made, per device type: on a CPU, torch's conv backward returns some gradients
# in the other layout than the one declared (see conv_grad_format); the launch-budget test and
# bench report them apart from the pipeline's own launches.
RESTRIDE_COPIES: "collections.Counter[str]" = collections.Counter()


def restride(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """Return ``t`` with exactly the strides of ``torch.empty(t.shape, memory_format=fmt)``.

    The fakes allocate outputs that way, so real outputs must match stride for stride (this
    also fixes the ambiguous cases where a tensor is both contiguous and channels-last).
    A copy happens only when the strides differ.
    """
    want = torch.empty(t.shape, device="meta", memory_format=fmt).stride()
    if t.stride() == want:
        return t
    if t.is_contiguous(memory_format=fmt):
        # already dense in that order, differing only in the strides of size-1 dimensions
        # (which address nothing): the same memory under the exact strides, no copy
        return t.as_strided(t.shape, want, t.storage_offset())
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    out.copy_(t)
    RESTRIDE_COPIES[t.device.type] += 1
    return out


def conv_out_shape(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int]) -> list[int]:
    n, _, *sp = x_shape
    co, _, *k = w_shape
    outs = [(s + 2 * p - kk) // st + 1 for s, p, kk, st in zip(sp, padding, k, stride)]
    return [n, co, *outs]


def empty_marker(like: torch.Tensor) -> torch.Tensor:
    """A 0-element tensor standing for "not computed" in an op's fixed-arity outputs."""
    return torch.empty((0,), dtype=like.dtype, device=like.device)


def bn_affine(mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with BN(y) = y*scale + shift, in the dtype of ``invstd``."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    if bias is None:
        return scale, (mean * scale).neg_()
    # bias - mean*scale in one pass (one launch on a GPU instead of three)
    return scale, torch.addcmul(bias.to(invstd.dtype), mean, scale, value=-1.0)


def running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, invstd, var) from running statistics, as fresh tensors of ``dtype``."""
    mean = running_mean.detach().to(dtype=dtype, copy=True)
    var = running_var.detach().to(dtype=dtype, copy=True)
    return mean, torch.rsqrt(var + eps), var


def bcast(v: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C, 1, 1, 1) for broadcasting against (N, C, H, W, D)."""
    return v.view(1, -1, 1, 1, 1)
