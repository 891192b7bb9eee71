"""The CPU path: which calls take the composite path, that torch.compile sees through it (no
ahnet_fast custom op in the graph, inductor freezing works), the oneDNN conv-backward defect
kept away from its gradients, BN folding cached and rebuilt, and layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.models.fast import FastAHNet
from ahnet_fast.nn import BNActConv3d, ConvBNAct3d, ZMaxPool3d
from ahnet_fast.ops import _backend, composite, conv_bn_act, use_backend
from ahnet_fast.ops.reference import onednn_conv_backward_unsafe, without_onednn

CL = torch.channels_last_3d


def test_auto_takes_the_composite_path_on_cpu_only_for_auto():
    x = torch.randn(1, 2, 3, 3, 4)
    assert _backend.composite_path(x)
    with use_backend("reference"):
        assert not _backend.composite_path(x)  # the explicit reference backend stays the custom-op oracle
    with use_backend("auto"):
        assert _backend.composite_path(x)


def _ops_in_graph(fn, *args) -> set[str]:
    """Every call_function target of the graphs dynamo hands to the backend."""
    seen: set[str] = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                seen.add(str(node.target))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def test_compiled_fast_ahnet_graph_has_no_custom_ops():
    """Dynamo traces the 2D AH-Net (the same blocks and ops as 3D) into one graph of plain
    torch ops: inductor can fold BN into the convs and fuse the elementwise tails.

    (Eval mode, the freezing case; dynamo only, inductor's C++ build would take minutes here.
    Autograd stays on: under no_grad the model's dense blocks write into a
    preallocated buffer with ``torch.add(..., out=slice)``, which dynamo cannot trace in one
    graph; bench/cpu.py compiles that path with graph breaks.)"""
    torch.manual_seed(0)
    net = FastAHNet(layers=(1, 1, 1, 1), spatial_dims=2, psp_block_num=1, upsample_mode="bilinear").eval()
    x = torch.randn(2, 1, 32, 32)
    ops = _ops_in_graph(net, x)
    assert not any("ahnet_fast" in op for op in ops), sorted(op for op in ops if "ahnet_fast" in op)
    assert any("batch_norm" in op for op in ops) and any("conv" in op for op in ops)


def test_inductor_freezing_of_the_composite_ops_matches_eager():
    """torch.compile with inductor's freezing (eval, no_grad) on a small block chain: same
    numbers as eager (the full-model compile is measured in bench/cpu.py; it takes minutes)."""
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ConvBNAct3d(2, 8, (3, 3, 1), padding=(1, 1, 0), zpool="before_bn")
            self.b = BNActConv3d(8, 8, (1, 1, 3), padding=(0, 0, 1))
            self.p = ZMaxPool3d()

        def forward(self, x):
            y = self.a(x)
            return self.p(self.b(y) + y)

    net = Net()
    with torch.no_grad():  # non-trivial running statistics, negative gammas included
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(-1.5, 1.5)
    net.eval()
    x = torch.randn(1, 2, 8, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        want = net(x)
        got = torch.compile(net, options={"freezing": True})(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_gradients_avoid_the_onednn_defect(dtype, monkeypatch):
    """A 3x3x1 conv on a 2x2 in-plane input (AH-Net's layer4 on 64x64 windows), channels-last:
    torch's oneDNN backward is garbage there; the composite path routes it around."""
    torch.manual_seed(2)
    x = torch.randn(2, 16, 2, 2, 4).to(dtype).contiguous(memory_format=CL).requires_grad_()
    w = (torch.randn(16, 16, 3, 3, 1) * 0.1).to(dtype).requires_grad_()
    g, b = torch.rand(16) + 0.5, torch.randn(16)
    assert onednn_conv_backward_unsafe(x, w)
    calls = []
    real = composite._SafeConv3d.apply
    monkeypatch.setattr(composite._SafeConv3d, "apply", lambda *a: calls.append(1) or real(*a))
    out = conv_bn_act(x, w, g, b, None, None, padding=(1, 1, 0), training=True)
    go = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, [x, w], go)
    assert calls, "the safe conv was not used"
    # float64 oracle of the same rounded inputs, with torch's non-oneDNN kernel
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    with without_onednn(True):
        c = F.conv3d(x64, w64, None, 1, (1, 1, 0))
        o64 = torch.relu(F.batch_norm(c, None, None, g.double(), b.double(), True))
        gx64, gw64 = torch.autograd.grad(o64, [x64, w64], go.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in ((gx, gx64), (gw, gw64)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= tol, err


def test_eval_fold_is_cached_and_rebuilt_when_a_parameter_changes():
    torch.manual_seed(3)
    m = ConvBNAct3d(4, 6, (3, 3, 1), padding=(1, 1, 0)).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 4, 5, 5, 3)

    def want():
        with use_backend("reference"), torch.no_grad():
            return m(x)

    composite.clear_cache()
    with torch.no_grad():
        y1 = m(x)
        assert len(composite._FOLDS) == 1
        key = composite._FOLDS[m.conv.weight][0]
        y2 = m(x)
        assert composite._FOLDS[m.conv.weight][0] == key  # reused, not rebuilt
        torch.testing.assert_close(y1, want(), rtol=1e-5, atol=1e-6)
        assert torch.equal(y1, y2)
        m.bn.weight.mul_(-1.0)  # an optimizer step / in-place edit bumps _version
        y3 = m(x)
        assert composite._FOLDS[m.conv.weight][0] != key
        torch.testing.assert_close(y3, want(), rtol=1e-5, atol=1e-6)
        m.bn.running_var.fill_(2.0)
        torch.testing.assert_close(m(x), want(), rtol=1e-5, atol=1e-6)


def test_negative_scale_never_folds_through_a_pool():
    """conv -> z-pool -> BN with a negative BN scale: max and the scale do not commute, so the
    fold is refused and BN runs after the pool (the result is the oracle's)."""
    torch.manual_seed(4)
    m = ConvBNAct3d(3, 4, (3, 3, 1), padding=(1, 1, 0), zpool="before_bn").eval()
    with torch.no_grad():
        m.bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -2.0]))
    x = torch.randn(1, 3, 4, 4, 6)
    composite.clear_cache()
    with torch.no_grad():
        got = m(x)
        assert composite._FOLDS[m.conv.weight][1] is None
        with use_backend("reference"):
            want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_channel_input_runs_channels_last_and_contiguous_input_follows():
    """A 1-channel input is both layouts: the stem answers channels-last (torch's CPU convs are
    several times slower in NCDHW); a C>1 contiguous input gets a contiguous output."""
    torch.manual_seed(5)
    stem = ConvBNAct3d(1, 8, (7, 7, 3), stride=(2, 2, 1), padding=(3, 3, 1), zpool="before_bn").eval()
    with torch.no_grad():
        y = stem(torch.randn(1, 1, 16, 16, 8))
        assert y.is_contiguous(memory_format=CL)
        z = ConvBNAct3d(8, 8, (3, 3, 1), padding=(1, 1, 0)).eval()(torch.randn(1, 8, 6, 6, 4))
        assert z.is_contiguous()


def test_compiled_inference_policy_and_cache():
    from ahnet_fast.infer import compiled

    m = torch.nn.Conv3d(1, 2, 1).eval()
    assert compiled.maybe_compiled(m, "cpu") is m  # auto: measured not to pay (bench/results/cpu.md)
    assert compiled.maybe_compiled(m, "cpu", enabled=False) is m
    assert compiled.maybe_compiled(m, "cpu", enabled=True, autocast_dtype=torch.bfloat16) is m
    assert not compiled.should_compile(m, "cuda", enabled=True)
    if compiled.compile_available()[0]:
        first = compiled.maybe_compiled(m, "cpu", enabled=True)
        assert first is compiled.inference_model(m)  # once per process and model
        assert first.module is m and compiled.compile_seconds(m) == 0.0  # nothing compiled before a call
        assert compiled.inference_model(m, recompile=True) is not first
        compiled.forget(m)
    with pytest.raises(ValueError, match="eval mode"):
        compiled.inference_model(torch.nn.Conv3d(1, 2, 1).train())


def test_sliding_window_reads_size_rules_through_a_compiled_wrapper():
    from ahnet_fast.infer.sliding_window import sliding_window_inference

    net = FastAHNet(layers=(1, 1, 1, 1), psp_block_num=0, upsample_mode="trilinear").eval()
    seen = []

    class Wrapper:  # what ahnet_fast.infer.compiled returns: a callable with .module
        module = net

        def __call__(self, x):
            seen.append(tuple(x.shape))
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    sliding_window_inference(torch.randn(1, 1, 40, 40, 20), Wrapper(), window=(40, 40, 20))
    assert seen == [(1, 1, 64, 64, 32)]  # rounded up to the model's multiples, as for the model itself
