"""channel_stats / bn_act_apply / bn_act_backward against float64 torch compositions.

Tolerances (DESIGN.md): float32 relative error <= 1e-5 against float64; bf16/fp16 error <= 2x
that of the same-dtype torch composition (plus a 1e-7 floor for fp32-exact cases).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.kernels import batchnorm as bnk
from ahnet_fast.kernels.batchnorm import bn_act_apply, bn_act_backward, channel_stats
from ahnet_fast.launches import record_launches

from _kernel_cases import CL, DEV, DTYPES, rand, rel

EPS = 1e-5


def _vec(C, *, positive=False, lo=0.5):
    v = torch.randn(C, dtype=torch.float32)
    if positive:
        v = v.abs() + lo
    return v.to(DEV)


def _check(out, ref64, dtype, torch_same_dtype=None):
    err = rel(out, ref64)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        bound = 2 * rel(torch_same_dtype, ref64) + 1e-7
        assert err <= bound, (err, bound)


def _cvec(v):
    return v.view(1, -1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ stats

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 5, 3, 5, 1), (2, 20, 3, 3, 3), (2, 7, 5, 3, 8)])
def test_channel_stats(dtype, channels_last, shape):
    # a large common offset makes a naive sum/sum-of-squares formula lose the variance
    x = rand(shape, dtype, channels_last, scale=2.0, shift=300.0)
    mean, var = channel_stats(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (shape[1],)
    vr, mr = torch.var_mean(x.double(), dim=(0, 2, 3, 4), unbiased=False)
    # the input values are exact in every dtype, so fp32 accuracy is expected for all of them
    assert ((mean.double() - mr).abs() / mr.abs()).max().item() <= 1e-6
    assert ((var.double() - vr).abs() / vr).max().item() <= 1e-5


def test_channel_stats_multi_chunk_merge(monkeypatch):
    """Force many chunks per program and many merge steps (the paths big tensors take)."""
    monkeypatch.setattr(bnk, "_MAX_PARTIALS", 3)
    monkeypatch.setattr(bnk, "_MERGE_BLOCK_P", 2)
    for cl in (False, True):
        x = rand((2, 6, 9, 7, 8), torch.float32, cl, scale=0.5, shift=-40.0)
        mean, var = channel_stats(x[:, 1:])       # channel slice, strided
        vr, mr = torch.var_mean(x[:, 1:].double(), dim=(0, 2, 3, 4), unbiased=False)
        assert ((mean.double() - mr).abs() / mr.abs()).max().item() <= 1e-6
        assert ((var.double() - vr).abs() / vr).max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ apply

def _apply_ref(y, scale, shift, zpool, residual, relu, dtype):
    """Composition in `dtype` (float64 gives the oracle)."""
    t = y.to(dtype) * _cvec(scale.to(dtype)) + _cvec(shift.to(dtype))
    if zpool == "after_affine":
        t = F.max_pool3d(t, (1, 1, 2))
    if residual is not None:
        t = t + residual.to(dtype)
    return torch.relu(t) if relu else t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool,residual,relu", [("none", False, True), ("none", True, False),
                                                 ("after_affine", False, True),
                                                 ("after_affine", True, True)])
def test_bn_act_apply(dtype, channels_last, zpool, residual, relu):
    N, C, H, W, D = 2, 7, 3, 5, 3
    y = rand((N, C, H, W, D), dtype, channels_last, scale=2.0, shift=0.5)
    scale = _vec(C)
    scale[0] = -1.5          # negative scale: after-affine pooling must pick the minimum of y
    shift = _vec(C)
    Do = D // 2 if zpool != "none" else D
    res = rand((N, C, H, W, Do), dtype, not channels_last) if residual else None  # mixed layouts
    o = bn_act_apply(y, scale, shift, zpool=zpool, residual=res, relu=relu)
    assert o.shape == (N, C, H, W, Do) and o.dtype == dtype
    assert o.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    ref = _apply_ref(y, scale, shift, zpool, res, relu, torch.float64)
    _check(o, ref, dtype, _apply_ref(y, scale, shift, zpool, res, relu, dtype))


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_act_apply_into_channel_slice(channels_last):
    N, C, H, W, D = 1, 5, 3, 3, 2
    y = rand((N, C, H, W, D), torch.float32, channels_last)
    scale, shift = _vec(C), _vec(C)
    buf = torch.full((N, 11, H, W, D), float("nan"), device=DEV)
    buf = buf.contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    view = bn_act_apply(y, scale, shift, out=buf, out_channel_offset=4)
    assert view.data_ptr() == buf[:, 4:9].data_ptr()
    assert rel(buf[:, 4:9], _apply_ref(y, scale, shift, "none", None, True, torch.float64)) <= 1e-6
    assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 9:]).all()  # untouched


def test_bn_act_apply_rejects_bad_input():
    y = torch.randn(1, 3, 2, 2, 2, device=DEV)
    s = torch.ones(3, device=DEV)
    with pytest.raises(TypeError, match="float32"):
        bn_act_apply(y, s.half(), s)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bn_act_apply(y, torch.ones(4, device=DEV), s)
    with pytest.raises(ValueError, match="zpool"):
        bn_act_apply(y, s, s, zpool="before_affine")
    with pytest.raises(ValueError, match="residual"):
        bn_act_apply(y, s, s, residual=torch.randn(1, 3, 2, 2, 1, device=DEV))
    with pytest.raises(ValueError, match="does not fit"):
        bn_act_apply(y, s, s, out=torch.empty(1, 4, 2, 2, 2, device=DEV), out_channel_offset=2)


# ------------------------------------------------------------------------------------------ backward

def _bwd_case(dtype, channels_last, zpool, residual, batch_stats, affine, N=2, C=7, H=3, W=5, D=3):
    y = rand((N, C, H, W, D), dtype, channels_last, scale=2.0, shift=1.0)
    gamma = _vec(C) if affine else None
    if gamma is not None:
        gamma[1] = -0.75     # negative gamma: routing follows the minimum of y
    beta = _vec(C)
    Do = D // 2 if zpool != "none" else D
    res = rand((N, C, H, W, Do), dtype, channels_last) if residual else None
    if batch_stats:
        var, mean = torch.var_mean(y.double(), dim=(0, 2, 3, 4), unbiased=False)
    else:
        mean, var = torch.randn(C, dtype=torch.float64).to(DEV), (torch.rand(C, dtype=torch.float64) + 0.5).to(DEV)
    invstd = 1.0 / torch.sqrt(var + EPS)
    return y, gamma, beta, res, mean, invstd


def _bwd_ref(y, gamma, beta, res, mean, invstd, go, zpool, batch_stats, dtype):
    """Autograd through the composition in `dtype`; batch statistics are recomputed from y."""
    yd = y.detach().to(dtype).requires_grad_(True)
    C = y.shape[1]
    g = (gamma if gamma is not None else torch.ones(C, device=y.device)).to(dtype).requires_grad_(True)
    b = beta.to(dtype).requires_grad_(True)
    r = res.to(dtype).requires_grad_(True) if res is not None else None
    if batch_stats:
        var, m = torch.var_mean(yd, dim=(0, 2, 3, 4), unbiased=False)
        xhat = (yd - _cvec(m)) / torch.sqrt(_cvec(var) + EPS)
    else:
        xhat = (yd - _cvec(mean.to(dtype))) * _cvec(invstd.to(dtype))
    t = _cvec(g) * xhat + _cvec(b)
    if zpool == "after_affine":
        t = F.max_pool3d(t, (1, 1, 2))
    if r is not None:
        t = t + r
    o = torch.relu(t)
    o.backward(go.to(dtype))
    return o.detach(), yd.grad, g.grad, b.grad, (r.grad if r is not None else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool,residual", [("none", False), ("none", True), ("after_affine", False),
                                            ("after_affine", True)])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_act_backward(dtype, channels_last, zpool, residual, batch_stats):
    y, gamma, beta, res, mean, invstd = _bwd_case(dtype, channels_last, zpool, residual, batch_stats, True)
    yd = y.double()
    Do = y.shape[-1] // 2 if zpool != "none" else y.shape[-1]
    go = rand((y.shape[0], y.shape[1], y.shape[2], y.shape[3], Do), dtype, channels_last)
    out64, gy64, gg64, gb64, gr64 = _bwd_ref(yd, gamma.double(), beta.double(),
                                             res.double() if res is not None else None,
                                             mean, invstd, go.double(), zpool, batch_stats, torch.float64)
    out_t, gy_t, gg_t, gb_t, gr_t = _bwd_ref(y, gamma, beta, res, mean, invstd, go, zpool, batch_stats, dtype)
    # out: the forward output in the test dtype (what the ops layer saves for the ReLU mask)
    gy, gg, gb, gr = bn_act_backward(go, y, mean.float(), invstd.float(), gamma, out=out64.to(dtype),
                                     zpool=zpool, relu=True, batch_stats=batch_stats,
                                     residual_grad=residual)
    assert gy.shape == y.shape and gy.dtype == dtype
    assert gy.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    _check(gy, gy64, dtype, gy_t)
    _check(gg, gg64, dtype, gg_t)
    _check(gb, gb64, dtype, gb_t)
    if residual:
        _check(gr, gr64, dtype, gr_t)
    else:
        assert gr is None


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_act_backward_mask_recomputed_and_no_affine(batch_stats, channels_last):
    """Without `out`, the ReLU mask is t > 0 (needs beta); gamma=None means affine=False."""
    for affine in (True, False):
        y, gamma, beta, _, mean, invstd = _bwd_case(torch.float32, channels_last, "none", False,
                                                    batch_stats, affine, N=1, D=2)
        if not affine:
            beta = torch.zeros_like(beta)
        go = rand(y.shape, torch.float32, channels_last)
        _, gy64, gg64, gb64, _ = _bwd_ref(y.double(), gamma.double() if affine else None, beta.double(),
                                          None, mean, invstd, go.double(), "none", batch_stats,
                                          torch.float64)
        gy, gg, gb, gr = bn_act_backward(go, y, mean.float(), invstd.float(), gamma, beta=beta,
                                         batch_stats=batch_stats)
        assert rel(gy, gy64) <= 1e-5 and rel(gb, gb64) <= 1e-5 and gr is None
        if affine:
            assert rel(gg, gg64) <= 1e-5
        else:
            assert gg is None


def test_bn_act_backward_rejects_ambiguous_mask():
    y = torch.randn(1, 3, 2, 2, 4, device=DEV)
    v = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="pass `out`"):
        bn_act_backward(torch.randn(1, 3, 2, 2, 2, device=DEV), y, v, v, v, zpool="after_affine")
    with pytest.raises(ValueError, match="needs `beta`"):
        bn_act_backward(torch.randn_like(y), y, v, v, v)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        bn_act_backward(torch.randn_like(y), y, v, v, v, zpool="after_affine", relu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bn_gpu_large(dtype):
    """Compiled kernels at an AH-Net decoder shape (2x80x96x96x32), channels_last_3d."""
    x = rand((2, 80, 96, 96, 32), dtype, True, scale=2.0, shift=3.0)
    mean, var = channel_stats(x)
    vr, mr = torch.var_mean(x.double(), dim=(0, 2, 3, 4), unbiased=False)
    assert ((var.double() - vr).abs() / vr).max().item() <= 1e-5
    scale, shift = _vec(80), _vec(80)
    o = bn_act_apply(x, scale, shift, zpool="after_affine")
    ref = _apply_ref(x, scale, shift, "after_affine", None, True, torch.float64)
    _check(o, ref, dtype, _apply_ref(x, scale, shift, "after_affine", None, True, dtype))
    go = torch.randn(o.shape, device=DEV, dtype=dtype)
    invstd = torch.rsqrt(var + EPS)
    gy, gg, gb, _ = bn_act_backward(go, x, mean, invstd, scale, out=o, zpool="after_affine")
    assert not torch.isnan(gy).any() and torch.isfinite(gg).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("C", [1, 20, 130])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("running", [torch.float32, torch.float16, None])
def test_stats_finalize_matches_the_float64_batchnorm(C, affine, running):
    """channel_stats(finalize=): one merge launch gives the statistics, the training BN affine
    (invstd = 1/sqrt(var + eps), scale = gamma*invstd, shift = beta - mean*scale) and the next
    running statistics as nn.BatchNorm computes them (unbiased variance, momentum), in new
    tensors of the buffers' dtype, leaving the buffers untouched."""
    gen = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, 5, 3, 4, generator=gen) * 3 + 1
    x = x.to(DEV).contiguous(memory_format=CL)
    gamma = torch.randn(C, generator=gen) if affine else None  # negative gammas too
    beta = torch.randn(C, generator=gen) if affine else None
    rm = rv = None
    if running is not None:
        rm = torch.randn(C, generator=gen).to(DEV, running)
        rv = (torch.rand(C, generator=gen) + 0.5).to(DEV, running)
        rm0, rv0 = rm.clone(), rv.clone()
    dev = (lambda t: None if t is None else t.to(DEV))
    fin = bnk.BNFinalize(dev(gamma), dev(beta), 1e-5, rm, rv, 0.3)
    with record_launches(run_triton=True) as log:
        mean, var, invstd, scale, shift, nrm, nrv = channel_stats(x, finalize=fin)
    assert [r.kernel for r in log.triton] == ["_stats_partial_kernel", "stats_merge_kernel"], log.summary()
    xd = x.double().cpu()
    vr, mr = torch.var_mean(xd, dim=(0, 2, 3, 4), unbiased=False)
    want_inv = 1.0 / torch.sqrt(vr + 1e-5)
    want_scale = want_inv * (gamma.double() if affine else 1.0)
    want_shift = -mr * want_scale + (beta.double() if affine else 0.0)
    for got, want in ((mean, mr), (var, vr), (invstd, want_inv), (scale, want_scale), (shift, want_shift)):
        assert got.dtype == torch.float32 and got.shape == (C,)
        assert torch.allclose(got.double().cpu(), want, rtol=1e-5, atol=1e-5), (got, want)
    if running is None:
        assert nrm is None and nrv is None
        return
    n = x.numel() // C
    want_rm = rm0.double().cpu() * 0.7 + 0.3 * mr
    want_rv = rv0.double().cpu() * 0.7 + 0.3 * vr * n / (n - 1)
    tol = 1e-5 if running == torch.float32 else 2e-3
    for got, want in ((nrm, want_rm), (nrv, want_rv)):
        assert got.dtype == running and got.shape == (C,)
        assert torch.allclose(got.double().cpu(), want, rtol=tol, atol=tol), (got, want)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # functional: the buffers are untouched


@pytest.mark.parametrize("affine", [True, False])
def test_apply_from_stats_equals_apply_of_the_affine(affine):
    """bn_act_apply(y, gamma, beta, mean=, invstd=) forms the affine in the kernel: the same
    values as bn_act_apply(y, scale, shift) with scale/shift computed in float64."""
    gen = torch.Generator().manual_seed(5)
    C = 20
    y = torch.randn(2, C, 4, 3, 6, generator=gen).to(DEV).contiguous(memory_format=CL)
    mean, invstd = torch.randn(C, generator=gen).to(DEV), (torch.rand(C, generator=gen) + 0.5).to(DEV)
    gamma = torch.randn(C, generator=gen).to(DEV) if affine else None
    beta = torch.randn(C, generator=gen).to(DEV) if affine else None
    scale = invstd.double() * (gamma.double() if affine else 1.0)
    shift = -mean.double() * scale + (beta.double() if affine else 0.0)
    got = bn_act_apply(y, gamma, beta, relu=True, mean=mean, invstd=invstd)
    want = torch.relu(y.double() * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="together"):
        bn_act_apply(y, gamma, beta, mean=mean)
