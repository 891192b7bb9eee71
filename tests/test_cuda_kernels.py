"""The compiled CUDA kernels (csrc/) against the float64 torch composition. GPU only.

Oracle: the same math in float64 with torch ops (max_pool3d, batch statistics, autograd).
Tolerances (DESIGN.md): float32 relative error <= 1e-5 of the output's scale; bfloat16/float16 error
<= 2x the error of the same computation done by torch in that dtype, and never NaN where the oracle
has none. Outputs are poisoned (NaN) before out= calls; inputs are fresh random draws.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast import _cuda

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 3, 5, 3, 4), (2, 20, 7, 5, 3), (2, 64, 6, 6, 8), (1, 1, 3, 3, 2), (3, 17, 1, 9, 7))
EPS = 1e-5


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d) if channels_last else t.contiguous()


def _check_close(name: str, got: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor | None) -> None:
    """float32 results: rel 1e-5 of max|ref|; bf16/fp16 results: <= 2x the error of torch's own
    computation in that dtype (`same_dtype`)."""
    assert got.shape == ref64.shape, name
    assert not torch.isnan(got).any() or torch.isnan(ref64).any(), f"{name}: NaN where the oracle has none"
    err = (got.double() - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1e-30)
    if got.dtype == torch.float32 or same_dtype is None:
        assert err <= 1e-5 * scale, f"{name}: max error {err:.3e} vs scale {scale:.3e}"
    else:
        torch_err = (same_dtype.double() - ref64).abs().max().item()
        assert err <= 2 * torch_err + 1e-7 * scale, f"{name}: error {err:.3e} > 2x torch's {torch_err:.3e}"


def test_extension_loads_and_registers_kernels():
    ok, why = _cuda.status()
    assert ok, why
    assert {"zmaxpool_forward", "zmaxpool_backward", "channel_stats", "bn_act_apply",
            "bn_act_backward"} <= _cuda.implemented()
    info = _cuda.build_info()
    assert info["cuda_extension"] and info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    with pytest.raises(RuntimeError, match="dtype Double; accepted: float32, bfloat16, float16"):
        _cuda.zmaxpool_forward(torch.randn(1, 2, 2, 2, 4, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="depth D >= 2"):
        _cuda.zmaxpool_forward(torch.randn(1, 2, 2, 2, 1, device="cuda"))


# ------------------------------------------------------------------------------------------------
# z max-pool
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("shape", SHAPES)
def test_zmaxpool_matches_torch(dtype, channels_last, shape):
    x = torch.randn(shape, device="cuda").to(dtype)
    # ties and NaN: torch's rule is "first wins a tie, NaN wins"
    x[..., 1] = x[..., 0]
    x.view(-1)[::17] = float("nan")
    x = _layout(x, channels_last)
    y = _cuda.zmaxpool_forward(x)
    x64 = x.double().requires_grad_(True)
    ref = F.max_pool3d(x64, (1, 1, 2), (1, 1, 2))
    assert y.dtype == dtype and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last_3d) == channels_last or shape[1] == 1
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=0, equal_nan=True)  # selection is exact
    gy = torch.randn(ref.shape, device="cuda").to(dtype)
    gx = _cuda.zmaxpool_backward(x, _layout(gy, channels_last))
    ref.backward(gy.double())
    assert gx.shape == x.shape and gx.dtype == dtype
    torch.testing.assert_close(gx.double(), x64.grad, rtol=0, atol=0)
    if shape[4] % 2 == 1:
        assert (gx[..., -1] == 0).all()


# ------------------------------------------------------------------------------------------------
# batch norm pieces
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats(dtype, channels_last, shape):
    x = _layout((torch.randn(shape, device="cuda") * 3 + 5).to(dtype), channels_last)
    mean, var = _cuda.channel_stats(x)
    x64 = x.double()
    ref_mean = x64.mean(dim=(0, 2, 3, 4))
    ref_var = x64.var(dim=(0, 2, 3, 4), unbiased=False)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (shape[1],)
    # the inputs are exact in float64 and the kernel accumulates in float64: fp32-rounding close
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    again = _cuda.channel_stats(x)
    assert torch.equal(again[0], mean) and torch.equal(again[1], var)  # deterministic


def _bn_case(shape, dtype, channels_last, pool, use_res, *, scale=1.0, shift=0.0):
    """y (randn * scale + shift, in `dtype` and the layout), the output shape (depth halved when
    pooling) and the residual of that shape (None unless use_res)."""
    n, c, h, w, d = shape
    y = _layout((torch.randn(shape, device="cuda") * scale + shift).to(dtype), channels_last)
    oshape = (n, c, h, w, d // 2 if pool else d)
    res = _layout(torch.randn(oshape, device="cuda").to(dtype), channels_last) if use_res else None
    return y, oshape, res


def _pool_res_relu(t, residual, pool, relu):
    """The tail every BN apply shares: [z-pair max] -> [+ residual] -> [ReLU]."""
    if pool:
        t = F.max_pool3d(t, (1, 1, 2), (1, 1, 2))
    if residual is not None:
        t = t + residual
    return torch.relu(t) if relu else t


def _compose(y, scale, shift, residual, pool, relu):
    t = y * scale.view(1, -1, 1, 1, 1).to(y.dtype) + shift.view(1, -1, 1, 1, 1).to(y.dtype)
    return _pool_res_relu(t, residual, pool, relu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("pool,use_res,relu", [(False, False, True), (True, False, True), (False, True, True),
                                               (True, True, False)])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bn_act_apply(dtype, channels_last, pool, use_res, relu, shape):
    n, c = shape[:2]
    y, oshape, res = _bn_case(shape, dtype, channels_last, pool, use_res)
    scale = torch.randn(c, device="cuda")
    shift = torch.randn(c, device="cuda")
    zpool = "after_affine" if pool else "none"
    z = _cuda.bn_act_apply(y, scale, shift, zpool=zpool, residual=res, relu=relu)
    ref = _compose(y.double(), scale.double(), shift.double(), None if res is None else res.double(), pool, relu)
    same = _compose(y, scale, shift, res, pool, relu)
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last_3d if channels_last
                                                else torch.contiguous_format)
    _check_close("bn_act_apply", z, ref, same)
    # out=: a channel slice of a preallocated concatenation buffer in either layout, poisoned first
    for buf_cl in (True, False):
        buf = _layout(torch.full((n, c + 5, *oshape[2:]), float("nan"), device="cuda", dtype=dtype), buf_cl)
        view = _cuda.bn_act_apply(y, scale, shift, zpool=zpool, residual=res, relu=relu, out=buf,
                                  out_channel_offset=3)
        assert view.data_ptr() == buf[:, 3:].data_ptr()
        torch.testing.assert_close(buf[:, 3:3 + c], z, rtol=0, atol=0)
        assert torch.isnan(buf[:, :3]).all() and torch.isnan(buf[:, 3 + c:]).all()  # untouched


def _bn_forward(y, gamma, beta, residual, pool, relu, batch_stats, mean=None, invstd=None):
    """o = relu(pool(gamma*(y-mean)*invstd + beta) + residual), with batch statistics of y if
    batch_stats (differentiated through), else the given constants."""
    dims = (0, 2, 3, 4)
    if batch_stats:
        mean = y.mean(dim=dims)
        invstd = torch.rsqrt(y.var(dim=dims, unbiased=False) + EPS)
    v = lambda t: t.view(1, -1, 1, 1, 1)  # noqa: E731
    t = (y - v(mean)) * v(invstd) * v(gamma) + v(beta)
    return _pool_res_relu(t, residual, pool, relu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("pool,use_res,relu,batch_stats", [
    (False, False, True, True), (True, False, True, True), (False, True, True, True), (True, True, True, False),
    (False, False, False, False)])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bn_act_backward(dtype, channels_last, pool, use_res, relu, batch_stats, shape):
    c = shape[1]
    y, oshape, res = _bn_case(shape, dtype, channels_last, pool, use_res, scale=2.0, shift=1.0)
    gamma = torch.randn(c, device="cuda")
    beta = torch.randn(c, device="cuda")
    grad_out = _layout(torch.randn(oshape, device="cuda").to(dtype), channels_last)
    run_mean = torch.randn(c, device="cuda", dtype=torch.float64)
    run_invstd = torch.rand(c, device="cuda", dtype=torch.float64) + 0.5

    def reference(dt):
        yy = y.to(dt).detach().requires_grad_(True)
        g = gamma.to(dt).requires_grad_(True)
        b = beta.to(dt).requires_grad_(True)
        r = None if res is None else res.to(dt).detach().requires_grad_(True)
        o = _bn_forward(yy, g, b, r, pool, relu, batch_stats, run_mean.to(dt), run_invstd.to(dt))
        o.backward(grad_out.to(dt))
        return o.detach(), yy.grad, g.grad, b.grad, (None if r is None else r.grad)

    o64, gy64, gg64, gb64, gr64 = reference(torch.float64)
    same = reference(dtype) if dtype != torch.float32 else (None,) * 5
    if batch_stats:
        y64 = y.double()
        mean = y64.mean(dim=(0, 2, 3, 4)).float()
        invstd = torch.rsqrt(y64.var(dim=(0, 2, 3, 4), unbiased=False) + EPS).float()
    else:
        mean, invstd = run_mean.float(), run_invstd.float()
    gy, gg, gb, gr = _cuda.bn_act_backward(grad_out, y, mean, invstd, gamma, out=o64.to(dtype),
                                           zpool="after_affine" if pool else "none", relu=relu,
                                           batch_stats=batch_stats, residual_grad=use_res, beta=beta)
    assert gy.dtype == dtype and gg.dtype == gb.dtype == torch.float32
    _check_close("grad_y", gy, gy64, same[1])
    _check_close("grad_gamma", gg, gg64, None if dtype == torch.float32 else same[2].float())
    _check_close("grad_beta", gb, gb64, None if dtype == torch.float32 else same[3].float())
    if use_res:
        _check_close("grad_residual", gr, gr64, same[4])
    else:
        assert gr is None
    # affine=False BN: gamma None -> grad_gamma None; deterministic reruns
    again = _cuda.bn_act_backward(grad_out, y, mean, invstd, gamma, out=o64.to(dtype),
                                  zpool="after_affine" if pool else "none", relu=relu,
                                  batch_stats=batch_stats, residual_grad=use_res, beta=beta)
    assert torch.equal(again[0], gy) and torch.equal(again[1], gg) and torch.equal(again[2], gb)


def test_bn_act_backward_without_out_recomputes_mask():
    y = torch.randn(2, 8, 4, 4, 6, device="cuda")
    gamma, beta = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    mean, invstd = torch.randn(8, device="cuda"), torch.rand(8, device="cuda") + 0.5
    grad_out = torch.randn_like(y)
    scale = gamma * invstd
    shift = beta - mean * scale
    out = _cuda.bn_act_apply(y, scale, shift, relu=True)
    with_out = _cuda.bn_act_backward(grad_out, y, mean, invstd, gamma, out=out, batch_stats=True)
    without = _cuda.bn_act_backward(grad_out, y, mean, invstd, gamma, beta=beta, batch_stats=True)
    for a, b in zip(with_out[:3], without[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    no_gamma = _cuda.bn_act_backward(grad_out, y, mean, invstd, None, out=out, batch_stats=False)
    assert no_gamma[1] is None
    with pytest.raises(RuntimeError, match="needs `beta`"):
        _cuda.bn_act_backward(grad_out, y, mean, invstd, gamma, batch_stats=True)

