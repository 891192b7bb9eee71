"""zmaxpool_forward / zmaxpool_backward against torch's max_pool3d((1,1,2)).

The pool only selects values, so the kernel must match torch bit for bit in every dtype,
including tie-breaking (first element wins) and NaN propagation (NaN takes the gradient).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.kernels.zpool import zmaxpool_backward, zmaxpool_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CL = torch.channels_last_3d


def _make(shape, dtype, channels_last, *, ties=True, nans=True):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 0.5).to(dtype)
    N, C, H, W, D = shape
    if ties and D >= 2:
        x[0, 0, 0, :, 0] = 1.25          # exact tie within the first pair of a whole row
        x[0, 0, 0, :, 1] = 1.25
        x[-1, -1, -1, 0, D - 2] = -2.0   # tie of negatives
        x[-1, -1, -1, 0, D - 1] = -2.0
    if nans and D >= 4:
        x[0, C - 1, 0, 0, 1] = float("nan")   # NaN second element
        x[0, C - 1, 0, 0, 2] = float("nan")   # NaN first element
        x[-1, 0, H - 1, W - 1, 0] = float("nan")   # both NaN
        x[-1, 0, H - 1, W - 1, 1] = float("nan")
    x = x.to(DEV)
    return x.contiguous(memory_format=CL) if channels_last else x.contiguous()


def _torch_pool(x, g):
    xr = x.detach().clone().requires_grad_(True)
    y = F.max_pool3d(xr, (1, 1, 2))
    y.backward(g)
    return y.detach(), xr.grad


def _same(a, b):
    """Bitwise equality treating NaN == NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn)
    assert torch.equal(a[~an], b[~bn])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 5, 3, 5, 2), (2, 20, 3, 1, 3), (2, 7, 5, 3, 8)])
def test_zpool_matches_torch(dtype, channels_last, shape):
    x = _make(shape, dtype, channels_last)
    y = zmaxpool_forward(x)
    g = (torch.randn(y.shape, dtype=torch.float64) + 2.0).to(dtype).to(DEV)
    y_ref, gx_ref = _torch_pool(x, g)
    _same(y, y_ref)
    fmt = CL if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    gx = zmaxpool_backward(x, g)
    assert gx.is_contiguous(memory_format=fmt)
    _same(gx, gx_ref)
    if shape[-1] % 2:   # the odd tail slice gets exactly zero gradient
        assert torch.all(gx[..., -1] == 0)


def test_zpool_tie_and_nan_routing_explicit():
    x = torch.tensor([1.0, 1.0, 2.0, 3.0, float("nan"), 5.0, 5.0, float("nan"), -1.0, -1.0],
                     device=DEV).view(1, 1, 1, 1, 10)
    y = zmaxpool_forward(x)
    assert y[0, 0, 0, 0, :2].tolist() == [1.0, 3.0]
    assert torch.isnan(y[0, 0, 0, 0, 2]) and torch.isnan(y[0, 0, 0, 0, 3])
    assert y[0, 0, 0, 0, 4].item() == -1.0
    gx = zmaxpool_backward(x, torch.full_like(y, 7.0))
    assert gx.view(-1).tolist() == [7.0, 0.0, 0.0, 7.0, 7.0, 0.0, 0.0, 7.0, 7.0, 0.0]


def test_zpool_depth_one_is_empty_and_grad_zero():
    x = _make((2, 5, 3, 3, 1), torch.float32, True, ties=False, nans=False)
    y = zmaxpool_forward(x)
    assert y.shape == (2, 5, 3, 3, 0)
    gx = zmaxpool_backward(x, y)
    assert gx.shape == x.shape and torch.all(gx == 0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_zpool_strided_views(channels_last):
    """Channel slices (kept strided) and non-collapsible views (copied) give the same result."""
    base = _make((2, 9, 5, 4, 6), torch.float32, channels_last, nans=False)
    for x in (base[:, 2:7], base[:, :, ::2], base[..., 1:5]):
        y = zmaxpool_forward(x)
        g = torch.randn(y.shape, device=DEV) + 1.5
        y_ref, gx_ref = _torch_pool(x, g)
        _same(y, y_ref)
        _same(zmaxpool_backward(x, g), gx_ref)


def test_zpool_rejects_bad_input():
    with pytest.raises(ValueError, match="5-D"):
        zmaxpool_forward(torch.randn(2, 3, 4, 4, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        zmaxpool_forward(torch.ones(1, 2, 2, 2, 2, dtype=torch.int32, device=DEV))
    x = torch.randn(1, 2, 3, 3, 4, device=DEV)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        zmaxpool_backward(x, torch.randn(1, 2, 3, 3, 3, device=DEV))
    with pytest.raises(TypeError, match="must match"):
        zmaxpool_backward(x, torch.randn(1, 2, 3, 3, 2, device=DEV, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_zpool_gpu_large(dtype, channels_last):
    """AH-Net stem shape (2x64x96x96x64), compiled kernels, bit-exact against max_pool3d."""
    x = _make((2, 64, 96, 96, 64), dtype, channels_last)
    y = zmaxpool_forward(x)
    g = torch.randn(y.shape, device=DEV, dtype=dtype)
    y_ref, gx_ref = _torch_pool(x, g)
    _same(y, y_ref)
    _same(zmaxpool_backward(x, g), gx_ref)
