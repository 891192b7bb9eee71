"""torch.library integration: gradcheck (float64), opcheck, torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

from ahnet_fast.nn import BNActConv3d, ConvBNAct3d, ZMaxPool3d
from ahnet_fast.ops import bn_act_conv, conv_bn_act, triton_backend, use_backend, zmaxpool

OPS = torch.ops.ahnet_fast


def _p(*shape, dtype=torch.float64, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=dtype) * scale + shift).requires_grad_(True)


@pytest.mark.parametrize("zpool", ["none", "before_bn", "after_bn"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_conv_bn_act(zpool, training):
    x, w = _p(2, 3, 3, 3, 4), _p(4, 3, 3, 3, 1, scale=0.5)
    g, b, cb = _p(4, scale=0.8), _p(4), _p(4)
    dout = 2 if zpool != "none" else 4
    res = _p(2, 4, 3, 3, dout)
    rm, rv = torch.randn(4, dtype=torch.float64) * 0.1, torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, w, g, b, cb, res):
        return conv_bn_act(x, w, g, b, None if training else rm, None if training else rv, conv_bias=cb,
                           padding=(1, 1, 0), training=training, zpool=zpool, residual=res)

    with use_backend("reference"):
        # fast mode (random projections of the Jacobian): a few calls instead of one per element
        assert torch.autograd.gradcheck(f, (x, w, g, b, cb, res), fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_bn_act_conv(training):
    x, w = _p(2, 3, 3, 3, 3, shift=0.2), _p(4, 3, 1, 1, 3, scale=0.5)
    g, b, cb = _p(3, scale=0.8), _p(3), _p(4)
    rm, rv = torch.randn(3, dtype=torch.float64) * 0.1, torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, g, b, w, cb):
        return bn_act_conv(x, g, b, None if training else rm, None if training else rv, w, conv_bias=cb,
                           padding=(0, 0, 1), training=training)

    with use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x, g, b, w, cb), fast_mode=True)


def test_gradcheck_zmaxpool():
    x = _p(2, 3, 2, 3, 5)
    with use_backend("reference"):
        assert torch.autograd.gradcheck(zmaxpool, (x,))


def test_gradcheck_conv_bn_act_full_jacobian_tiny():
    """Element-by-element Jacobian (slow mode) on the smallest pooled, residual case."""
    x, w = _p(1, 2, 2, 2, 4), _p(2, 2, 1, 1, 1)
    g, b, res = _p(2), _p(2), _p(1, 2, 2, 2, 2)

    def f(x, w, g, b, res):
        return conv_bn_act(x, w, g, b, None, None, training=True, zpool="after_bn", residual=res)

    with use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x, w, g, b, res))


@pytest.mark.interpreter
def test_gradcheck_triton_interpreter_tiny():
    """Finite differences through the Triton kernels (float32: Triton has no float64)."""
    if not torch.cuda.is_available() and not triton_backend.interpreting():
        pytest.fail("the Triton interpreter is off")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    x = _p(1, 2, 3, 2, 4, dtype=torch.float32).detach().to(dev).requires_grad_(True)
    w = _p(3, 2, 3, 3, 1, dtype=torch.float32, scale=0.5).detach().to(dev).requires_grad_(True)
    g = _p(3, dtype=torch.float32, scale=0.8).detach().to(dev).requires_grad_(True)
    b = _p(3, dtype=torch.float32).detach().to(dev)
    res = _p(1, 3, 3, 2, 2, dtype=torch.float32).detach().to(dev).requires_grad_(True)

    def f(x, w, g, res):
        return conv_bn_act(x, w, g, b, None, None, padding=(1, 1, 0), training=True, zpool="after_bn",
                           residual=res)

    with use_backend("triton"):
        assert torch.autograd.gradcheck(f, (x, w, g, res), eps=1e-3, atol=2e-2, rtol=2e-2, fast_mode=True)


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_conv_bn_act():
    x, w = _p(2, 3, 3, 3, 4, dtype=torch.float32), _p(4, 3, 3, 3, 1, dtype=torch.float32)
    g, b = _p(4, dtype=torch.float32), _p(4, dtype=torch.float32)
    res = _p(2, 4, 3, 3, 2, dtype=torch.float32)
    rm, rv = torch.zeros(4), torch.ones(4)
    for training, zpool, r in ((True, "after_bn", res), (False, "before_bn", None)):
        # training: the running statistics are advanced (their next values are outputs)
        upd = (rm, rv) if training else (None, None)
        _opcheck(OPS.conv_bn_act.default, (x, w, None, g, b, None if training else rm, None if training else rv, r,
                                           [1, 1, 1], [1, 1, 0], training, 1e-5, zpool, True, True, *upd, 0.1,
                                           "reference"))
    # save=False is the no-grad path (inference): inputs do not require grad there
    xc = x.detach().contiguous(memory_format=torch.channels_last_3d)
    _opcheck(OPS.conv_bn_act.default, (xc, w.detach(), None, g.detach(), b.detach(), None, None, None, [2, 2, 1],
                                       [1, 1, 0], True, 1e-5, "none", False, False, None, None, 0.1, "reference"))


def test_opcheck_bn_act_conv_and_zmaxpool():
    x, w = _p(2, 3, 3, 3, 4, dtype=torch.float32), _p(5, 3, 1, 1, 3, dtype=torch.float32)
    g, b, cb = _p(3, dtype=torch.float32), _p(3, dtype=torch.float32), _p(5, dtype=torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    no_chain = (None, None, None, None, None, 0.0, 0.0, False)
    _opcheck(OPS.bn_act_conv.default, (x, g, b, None, None, w, cb, None, [1, 1, 1], [0, 0, 1], True, 1e-5, True,
                                       rm, rv, 0.1, *no_chain, "reference"))
    # a chain link: x's statistics given, the next BN's statistics and running statistics returned
    stats = torch.stack([torch.zeros(3), torch.ones(3), torch.ones(3), torch.ones(3), torch.zeros(3)])
    g5, b5 = _p(5, dtype=torch.float32), _p(5, dtype=torch.float32)
    chain = (stats, g5, b5, torch.zeros(5), torch.ones(5), 1e-5, 0.1, True)
    _opcheck(OPS.bn_act_conv.default, (x, g, b, None, None, w, cb, None, [1, 1, 1], [0, 0, 1], True, 1e-5, True,
                                       None, None, 0.1, *chain, "reference"))
    res = _p(2, 5, 3, 3, 4, dtype=torch.float32)  # the residual added in the epilogue
    _opcheck(OPS.bn_act_conv.default, (x, g, b, None, None, w, None, res, [1, 1, 1], [0, 0, 1], True, 1e-5, True,
                                       None, None, 0.1, *no_chain, "reference"))
    buf = torch.randn(2, 9, 3, 3, 4)
    with torch.no_grad():
        _opcheck(OPS.bn_act_conv_into.default, (x.detach(), g.detach(), b.detach(), torch.zeros(3), torch.ones(3),
                                                w.detach(), None, res.detach(), [1, 1, 1], [0, 0, 1], False, 1e-5,
                                                True, buf, 2, None, None, 0.1, False, None, None, False,
                                                "reference"))
        # the inference fold: the next layer's eval BN+ReLU in the epilogue, and a conv of an
        # already activated input (no BN arguments, statistics come back as markers)
        _opcheck(OPS.bn_act_conv_into.default, (x.detach(), g.detach(), b.detach(), torch.zeros(3), torch.ones(3),
                                                w.detach(), None, None, [1, 1, 1], [0, 0, 1], False, 1e-5,
                                                True, buf, 2, None, None, 0.1, False, torch.rand(5), torch.randn(5),
                                                True, "reference"))
        _opcheck(OPS.bn_act_conv_into.default, (x.detach(), None, None, None, None, w.detach(), cb.detach(),
                                                res.detach(), [1, 1, 1], [0, 0, 1], False, 1e-5, False, buf, 2,
                                                None, None, 0.1, True, None, None, False, "reference"))
    _opcheck(OPS.zmaxpool.default, (_p(2, 3, 3, 3, 5, dtype=torch.float32), "reference"))


def test_torch_compile_fullgraph_training_matches_eager(monkeypatch):
    """One compiled training step (forward + backward + running stats) equals eager, through the
    custom ops. (Under torch.compile a use_backend context cannot be read while tracing: the
    environment variable keeps the compiled CPU calls on the custom ops instead of the
    composite path; tests/test_cpu_path.py compiles that one.)"""
    monkeypatch.setenv("AHNET_FAST_BACKEND", "reference")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ConvBNAct3d(2, 4, (3, 3, 1), padding=(1, 1, 0), zpool="before_bn")
            self.b = BNActConv3d(4, 4, (1, 1, 3), padding=(0, 0, 1))
            self.p = ZMaxPool3d()

        def forward(self, x):
            y = self.a(x)
            return self.p(self.b(y) + y)

    eager = Net()
    comp = Net()
    comp.load_state_dict(eager.state_dict())
    x = torch.randn(2, 2, 5, 3, 8)
    with use_backend("reference"):
        ye = eager(x)
        ye.square().sum().backward()
        # aot_eager: dynamo (fullgraph) + fakes + AOTAutograd exactly as inductor would see them,
        # without inductor's C++ codegen, which takes minutes on a 2-core CPU
        fn = torch.compile(comp, fullgraph=True, backend="aot_eager")
        yc = fn(x)
        yc.square().sum().backward()
    torch.testing.assert_close(yc, ye)
    for (n, pe), (_, pc) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, msg=n)
    for (n, be), (_, bc) in zip(eager.named_buffers(), comp.named_buffers()):
        torch.testing.assert_close(bc, be, msg=n)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("zpool,residual", [("none", False), ("before_bn", False), ("after_bn", True)])
def test_saves_less_than_the_unfused_chain(zpool, residual):
    import torch.nn.functional as F

    x = torch.randn(2, 8, 9, 9, 8, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, 1, requires_grad=True)
    g, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    r = torch.randn(2, 8, 9, 9, 4 if zpool != "none" else 8) if residual else None

    def unfused():
        c = F.conv3d(x, w, None, 1, (1, 1, 0))
        if zpool == "before_bn":
            c = F.max_pool3d(c, (1, 1, 2))
        y = F.batch_norm(c, None, None, g, b, True)
        if zpool == "after_bn":
            y = F.max_pool3d(y, (1, 1, 2))
        if r is not None:
            y = y + r
        return torch.relu_(y)  # in-place ReLU: the leanest unfused chain

    def fused():
        with use_backend("reference"):
            return conv_bn_act(x, w, g, b, None, None, padding=(1, 1, 0), training=True, zpool=zpool, residual=r)

    assert _saved_bytes(fused) < _saved_bytes(unfused)
