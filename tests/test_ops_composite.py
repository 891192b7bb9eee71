"""Composite CPU path (ahnet_fast.ops.composite, what ``auto`` runs for CPU tensors) against the
float64 oracle: outputs, every gradient, running statistics, both layouts, float32/16/bf16."""
from __future__ import annotations

import pytest
import torch

from _ops_oracle import DTYPES, LAYOUTS, check_conv_op, check_zmaxpool, combos
from test_ops_reference import BAC_CASES, CBA_CASES

from ahnet_fast.ops import _backend, composite, conv_bn_act, use_backend


@pytest.mark.parametrize("spec,dtype,layout", combos(CBA_CASES))
def test_conv_bn_act_composite(spec, dtype, layout):
    check_conv_op("conv_bn_act", spec, DTYPES[dtype], layout, "auto")


@pytest.mark.parametrize("spec,dtype,layout", combos(BAC_CASES))
def test_bn_act_conv_composite(spec, dtype, layout):
    check_conv_op("bn_act_conv", spec, DTYPES[dtype], layout, "auto")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 3, 5, 3, 8), (2, 7, 3, 1, 2), (2, 5, 3, 3, 3)], ids=str)
def test_zmaxpool_composite(shape, dtype, layout):
    check_zmaxpool(shape, DTYPES[dtype], layout, "auto")


# ----------------------------------------------------------------------------- CPU training layout
CL = torch.channels_last_3d


@pytest.mark.parametrize("n,cin,cout,spatial,stride,padding,bias", [
    (1, 12, 7, (10, 9, 8), (1, 1, 1), (0, 0, 0), False),
    (2, 9, 16, (9, 8, 8), (2, 2, 1), (0, 0, 0), True),
    (1, 10, 1, (8, 8, 9), (1, 1, 1), (1, 1, 0), True),  # PSP's projection: padded, one channel
    (2, 5, 4, (9, 10, 8), (2, 2, 2), (0, 0, 0), True),
])
def test_pointwise_conv_gemm_backward(n, cin, cout, spatial, stride, padding, bias):
    """The 1x1x1 training conv on the CPU: oneDNN forward, GEMM backward, against float64
    F.conv3d; the input gradient stays channels_last_3d (torch's own backward returns NCDHW)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, *spatial, generator=g).contiguous(memory_format=CL).requires_grad_(True)
    w = (torch.randn(cout, cin, 1, 1, 1, generator=g) * 0.3).requires_grad_(True)
    b = torch.randn(cout, generator=g).requires_grad_(True) if bias else None
    if not composite._onednn(x):
        pytest.skip("oneDNN's CPU conv is not available in this torch build")
    y = composite.conv3d(x, w, b, stride, padding)
    assert type(y.grad_fn).__name__ == "_PointwiseConv3dBackward"
    gy = torch.randn(y.shape, generator=g)
    params = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad(y, params, gy)
    ref_params = [t.detach().double().requires_grad_(True) for t in params]
    yr = torch.nn.functional.conv3d(ref_params[0], ref_params[1], ref_params[2] if bias else None, stride, padding)
    want = torch.autograd.grad(yr, ref_params, gy.double())
    for name, a, r in zip(("out", "grad x", "grad w", "grad b"), (y, *got), (yr, *want)):
        err = ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert err < 2e-6, f"{name}: relative error {err:.2e}"
    assert got[0].is_contiguous(memory_format=CL), "the input gradient left channels_last_3d"


def test_cat_channels_is_channels_last_and_differentiable():
    """A 1-channel first part would make torch.cat NCDHW; cat_channels keeps channels-last."""
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(2, c, 5, 4, 3, generator=g).contiguous(memory_format=CL).requires_grad_(True)
             for c in (1, 1, 6)]
    assert not torch.cat(parts, dim=1).is_contiguous(memory_format=CL)  # why the helper exists
    out = composite.cat_channels(parts, CL)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, torch.cat(parts, dim=1), rtol=0, atol=0)
    gy = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, parts, gy)
    for t, gt, lo in zip(parts, got, (0, 1, 2)):
        torch.testing.assert_close(gt, gy[:, lo:lo + t.shape[1]], rtol=0, atol=0)


def test_cpu_training_backward_stays_channels_last():
    """One training forward+backward of the fast model on the CPU: the elementwise backward ops
    (ReLU, BN, residual adds) see gradients in the activations' layout. torch's conv backward
    answers some channels-last calls in NCDHW, and a 1-channel input asks for an NCDHW output;
    before the fix 30% of the elements these ops read came in mixed layouts at 1x1x64x64x32,
    1.7% after (AMD EPYC, torch 2.13; the budget leaves room for other oneDNN kernel choices)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ahnet_fast import AHNet

    torch.manual_seed(0)
    net = AHNet(in_channels=1, out_channels=3, psp_block_num=3, upsample_mode="trilinear").train()
    x = torch.randn(1, 1, 64, 64, 32)
    if not composite._onednn(x.expand(1, 8, 64, 64, 32)):
        pytest.skip("oneDNN's CPU conv is not available in this torch build")

    def kind(t):
        if t.is_contiguous(memory_format=CL) and not t.is_contiguous():
            return "cl"
        return "c" if t.is_contiguous() and not t.is_contiguous(memory_format=CL) else "any"

    seen = {"mixed": 0, "all": 0}

    class Layouts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("threshold_backward", "native_batch_norm_backward", "add", "add_"):
                ts = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 5 and a.shape[1] > 1]
                kinds = {kind(t) for t in ts} - {"any"}
                if ts:
                    seen["all"] += ts[0].numel()
                    seen["mixed"] += ts[0].numel() if len(kinds) > 1 else 0
            return func(*args, **(kwargs or {}))

    loss = torch.nn.functional.cross_entropy(net(x), torch.randint(0, 3, (1, 64, 64, 32)))
    with Layouts():
        loss.backward()
    frac = seen["mixed"] / max(seen["all"], 1)
    assert seen["all"] > 0 and frac < 0.06, f"{frac:.0%} of the elementwise backward elements in mixed layouts"
