"""Shared inputs and float64 oracle for the kernel-level tests (imported by tests/test_kernels_conv.py,
tests/test_cuda_conv.py and tests/test_kernels_batchnorm.py).

The Triton launchers (kernels/*.py) and the CUDA C++ kernels (csrc/cuda/*.cu) implement one contract,
so they are checked with one oracle and one set of tolerances (DESIGN.md): float32 relative error
<= 1e-5 against float64 (TF32 off); bf16/fp16 error <= 2x that of the same-dtype torch composition,
never NaN. Relative error = ||a - ref||_2 / ||ref||_2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# "cuda" whenever a GPU exists (gpu-marked tests only run then), else the interpreter's "cpu"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CL = torch.channels_last_3d

# (kernel, stride, padding) of the AH-Net convs
K331 = ((3, 3, 1), (1, 1, 1), (1, 1, 0))
K331_S2 = ((3, 3, 1), (2, 2, 1), (1, 1, 0))
K113 = ((1, 1, 3), (1, 1, 1), (0, 0, 1))
K111 = ((1, 1, 1), (1, 1, 1), (0, 0, 0))
K111_S2 = ((1, 1, 1), (2, 2, 1), (0, 0, 0))


def rand(shape, dtype, channels_last, *, scale=1.0, shift=0.0):
    """A fresh normal draw (times `scale`, plus `shift`) rounded to `dtype`, on DEV, in the layout."""
    x = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(DEV)
    return x.contiguous(memory_format=CL) if channels_last else x.contiguous()


def vec(C, *, scale=1.0, shift=0.0):
    """A float32 per-channel vector of length C on DEV (BN scale/shift, bias)."""
    return (torch.randn(C, dtype=torch.float32) * scale + shift).to(DEV)


def _cv(v, dtype):
    return v.to(dtype).view(1, -1, 1, 1, 1)


def compose_conv(x, w, dtype, *, stride=(1, 1, 1), padding=(0, 0, 0), bias=None, in_scale=None,
                 in_shift=None, in_relu=True, out_scale=None, out_shift=None, zpool="none",
                 residual=None, relu=False):
    """The unfused torch composition of conv3d_fused, every step in `dtype` (float64 = the oracle)."""
    z = x.to(dtype)
    if in_scale is not None:
        z = z * _cv(in_scale, dtype) + _cv(in_shift, dtype)
        if in_relu:
            z = torch.relu(z)
    t = F.conv3d(z, w.to(dtype), bias.to(dtype) if bias is not None else None, stride=stride, padding=padding)
    if zpool == "before_affine":
        t = F.max_pool3d(t, (1, 1, 2))
    if out_scale is not None:
        t = t * _cv(out_scale, dtype)
    if out_shift is not None:
        t = t + _cv(out_shift, dtype)
    if zpool == "after_affine":
        t = F.max_pool3d(t, (1, 1, 2))
    if residual is not None:
        t = t + residual.to(dtype)
    return torch.relu(t) if relu else t


def rel(a, ref):
    """Relative L2 error of `a` against `ref` (in float64); fails on any NaN in `a`."""
    a, ref = a.double(), ref.double()
    assert not torch.isnan(a).any(), "NaN in kernel output"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_conv(out, x, w, **kw):
    """Assert a conv3d_fused result `out` against the float64 composition (shape, dtype, DESIGN.md
    tolerance); returns the float64 reference."""
    dtype = x.dtype
    ref = compose_conv(x, w, torch.float64, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    err = rel(out, ref)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        bound = 2 * rel(compose_conv(x, w, dtype, **kw), ref)
        assert err <= bound, (err, bound)
    return ref


def layout_ok(t, channels_last):
    return t.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
