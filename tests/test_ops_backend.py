"""Backend policy: use_backend / env var, explicit-backend errors, auto fallback, argument checks."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.ops import (BackendUnavailableError, activated_conv, backend_status, bn_act_conv, conv_bn_act,
                            get_backend, triton_backend, use_backend, zmaxpool)
from ahnet_fast.ops import _backend


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("AHNET_FAST_BACKEND", raising=False)
    assert get_backend() == "auto"
    with use_backend("reference"):
        assert get_backend() == "reference"
        with use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "reference"
    assert get_backend() == "auto"
    with pytest.raises(ValueError, match="accepted: auto, reference, triton, cuda"):
        with use_backend("cudnn"):
            pass


def test_env_var_and_context_precedence(monkeypatch):
    monkeypatch.setenv("AHNET_FAST_BACKEND", "Reference")
    assert get_backend() == "reference"
    with use_backend("triton"):
        assert get_backend() == "triton"
    monkeypatch.setenv("AHNET_FAST_BACKEND", "")
    assert get_backend() == "auto"
    monkeypatch.setenv("AHNET_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="AHNET_FAST_BACKEND='fast'"):
        zmaxpool(_x(1, 2, 2, 2, 4))


def test_use_backend_is_context_local(monkeypatch):
    monkeypatch.delenv("AHNET_FAST_BACKEND", raising=False)
    seen = []
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(get_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_backend_status_shape():
    st = backend_status()
    assert set(st) == {"reference", "triton", "cuda"}
    assert st["reference"][0] is True
    for ok, why in st.values():
        assert isinstance(ok, bool) and isinstance(why, str) and why


def test_explicit_cuda_lists_every_reason():
    x = _x(1, 3, 3, 3, 4, dtype=torch.float64)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError) as err:
        zmaxpool(x)
    msg = str(err.value)
    assert "backend 'cuda' cannot serve" in msg
    if not torch.cuda.is_available():
        assert "needs CUDA tensors" in msg
    assert "float64 is not supported" in msg
    assert "'reference'" in msg  # tells the user what works


def test_explicit_triton_reasons(monkeypatch):
    x = _x(1, 3, 3, 3, 4, dtype=torch.float64).permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    with use_backend("triton"), pytest.raises(BackendUnavailableError) as err:
        zmaxpool(x)
    msg = str(err.value)
    assert "float64 is not supported" in msg and "neither contiguous nor channels_last_3d" in msg
    # interpreter off and a CPU tensor: say so
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        zmaxpool(_x(1, 3, 3, 3, 4))


def test_auto_uses_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("AHNET_FAST_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(triton_backend, "zmaxpool_forward", lambda x: calls.append("triton"))
    assert _backend.select("zmaxpool", "auto", [_x(1, 2, 2, 2, 4)]).NAME == "reference"
    zmaxpool(_x(1, 2, 2, 2, 4))
    assert calls == []


def test_backward_uses_the_forward_backend(monkeypatch):
    """The backend chosen at forward time travels with the graph (not the context at backward)."""
    calls = []
    real = triton_backend.zmaxpool_backward

    def spy(x, g):
        calls.append("triton")
        return real(x, g)

    monkeypatch.setattr(triton_backend, "zmaxpool_backward", spy)
    x = _x(1, 2, 3, 3, 4).requires_grad_(True)
    with use_backend("triton"):
        y = zmaxpool(x)
    with use_backend("reference"):
        y.sum().backward()
    assert calls == ["triton"]


def test_deterministic_mode_excludes_undeclared_atomics(monkeypatch):
    import ahnet_fast._cuda as cuda_loader

    monkeypatch.setattr(cuda_loader, "DETERMINISTIC_OPS", ("zmaxpool",))  # declares only the pool
    x = _x(1, 2, 3, 3, 4)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert any("deterministic mode" in r for r in _backend._reasons("cuda", "conv_bn_act", [x]))
        assert not any("deterministic mode" in r for r in _backend._reasons("cuda", "zmaxpool", [x]))
        assert not any("deterministic" in r for r in _backend._reasons("triton", "conv_bn_act", [x]))
        with use_backend("triton"):
            zmaxpool(x)  # the Triton kernels are atomics-free: still allowed
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.gpu
def test_auto_falls_back_quietly_and_logs_once(caplog):
    x = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, device="cuda")
    _backend._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="ahnet_fast.ops"), use_backend("auto"):
        zmaxpool(x)
        zmaxpool(x)
    skips = [r for r in caplog.records if "auto skips backend 'triton'" in r.getMessage()]
    assert len(skips) == 1 and "float64" in skips[0].getMessage()
    with use_backend("auto"):
        assert _backend.select("zmaxpool", "", [x.float()]).NAME in ("triton", "cuda")


# ----------------------------------------------------------------------------- argument checks
def _cba_args(d=4):
    return _x(2, 3, 3, 3, d), _x(4, 3, 3, 3, 1), _x(4), _x(4), torch.zeros(4), torch.ones(4)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: dict(a, x=a["x"][0]), "must be 5-D"),
    (lambda a: dict(a, weight=a["weight"].double()), "must match the input dtype"),
    (lambda a: dict(a, weight=_x(4, 2, 3, 3, 1)), "input channels"),
    (lambda a: dict(a, zpool="both"), "zpool='both'"),
    (lambda a: dict(a, x=_x(2, 3, 3, 3, 1), zpool="after_bn"), "depth >= 2"),
    (lambda a: dict(a, x=_x(1, 3, 1, 1, 1), padding=0, weight=_x(4, 3, 1, 1, 1), training=True),
     "more than 1 value per channel"),
    (lambda a: dict(a, training=False, running_mean=None, running_var=None), "running statistics"),
    (lambda a: dict(a, residual=_x(2, 4, 3, 3, 2)), "residual must have the output shape"),
    (lambda a: dict(a, bn_weight=_x(5)), r"bn_weight must have shape \(4,\)"),
])
def test_conv_bn_act_argument_errors(mutate, match):
    x, w, g, b, rm, rv = _cba_args()
    a = dict(x=x, weight=w, bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv, padding=(1, 1, 0),
             training=True, zpool="none", residual=None)
    a = mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        conv_bn_act(a.pop("x"), a.pop("weight"), a.pop("bn_weight"), a.pop("bn_bias"), a.pop("running_mean"),
                    a.pop("running_var"), **a)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bn_act_conv_into_slice_leaves_the_rest(backend):
    x, w = _x(2, 3, 3, 3, 4), _x(5, 3, 3, 3, 1)
    g, b, rm, rv = _x(3), _x(3), torch.zeros(3), torch.ones(3)
    buf = torch.full((2, 9, 3, 3, 4), float("nan"))
    with use_backend(backend), torch.no_grad():
        ref = bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0))
        view = bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0), out=buf, out_channel_offset=3)
    assert view.data_ptr() == buf[:, 3:].data_ptr() and view.shape == ref.shape
    torch.testing.assert_close(buf[:, 3:8], ref)
    assert torch.isnan(buf[:, :3]).all() and torch.isnan(buf[:, 8:]).all()


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_inference_fold_of_the_next_bn(backend):
    """bn_act_conv(out_affine=..., out_relu=True) then activated_conv == the unfolded chain
    relu(bn2(conv1(relu(bn1(x))))) -> conv2, in float32 against float64 (auto = the CPU
    composite path); the slices of the buffers around the results are left alone."""
    x, w1, w2 = _x(2, 6, 4, 3, 3), _x(8, 6, 1, 1, 1), _x(5, 8, 3, 3, 1)
    g1, b1, rm1, rv1 = _x(6), _x(6), _x(6) * 0.1, torch.rand(6) + 0.5
    g2, b2, rm2, rv2 = _x(8), _x(8), _x(8) * 0.1, torch.rand(8) + 0.5
    cb2 = _x(5)
    scale2 = g2 / torch.sqrt(rv2 + 1e-5)
    shift2 = b2 - rm2 * scale2

    def chain(t, dt):
        t = t.to(dt)
        a = F.conv3d(torch.relu((t - rm1.to(dt).view(1, -1, 1, 1, 1)) / torch.sqrt(rv1.to(dt) + 1e-5).view(1, -1, 1, 1, 1)
                                * g1.to(dt).view(1, -1, 1, 1, 1) + b1.to(dt).view(1, -1, 1, 1, 1)), w1.to(dt))
        z = torch.relu((a - rm2.to(dt).view(1, -1, 1, 1, 1)) / torch.sqrt(rv2.to(dt) + 1e-5).view(1, -1, 1, 1, 1)
                       * g2.to(dt).view(1, -1, 1, 1, 1) + b2.to(dt).view(1, -1, 1, 1, 1))
        return z, F.conv3d(z, w2.to(dt), cb2.to(dt), padding=(1, 1, 0))

    zbuf = torch.full((2, 10, 4, 3, 3), float("nan"))
    obuf = torch.full((2, 7, 4, 3, 3), float("nan"))
    with use_backend(backend), torch.no_grad():
        z = bn_act_conv(x, g1, b1, rm1, rv1, w1, out=zbuf, out_channel_offset=1, out_affine=(scale2, shift2),
                        out_relu=True)
        o = activated_conv(z, w2, conv_bias=cb2, padding=(1, 1, 0), out=obuf, out_channel_offset=2)
    z64, o64 = chain(x, torch.float64)
    assert (z - z64).abs().max() <= 1e-5 * z64.abs().max()
    assert (o - o64).abs().max() <= 1e-5 * o64.abs().max()
    assert torch.isnan(zbuf[:, :1]).all() and torch.isnan(zbuf[:, 9:]).all()
    assert torch.isnan(obuf[:, :2]).all()


def test_inference_fold_errors():
    x, w = _x(2, 3, 3, 3, 4), _x(5, 3, 3, 3, 1)
    g, b, rm, rv = _x(3), _x(3), torch.zeros(3), torch.ones(3)
    buf = torch.empty(2, 5, 3, 3, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="inference form"):
            bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0), out_affine=(torch.ones(5), torch.zeros(5)))
        with pytest.raises(ValueError, match="inference form"):
            bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0), out=buf, residual=torch.zeros(2, 5, 3, 3, 4),
                        out_affine=(torch.ones(5), torch.zeros(5)))
        with pytest.raises(ValueError, match=r"out_affine scale must be a floating \(5,\) tensor"):
            bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0), out=buf, out_affine=(torch.ones(3), torch.zeros(5)))
        with pytest.raises(TypeError, match="pair of tensors"):
            bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0), out=buf, out_affine=torch.ones(5))
        with pytest.raises(ValueError, match="cannot hold the result"):
            activated_conv(x, w, padding=(1, 1, 0), out=torch.empty(2, 4, 3, 3, 4))
    with pytest.raises(RuntimeError, match="not differentiable"):
        activated_conv(x.requires_grad_(True), w, padding=(1, 1, 0), out=buf)


def test_bn_act_conv_into_errors():
    x, w = _x(2, 3, 3, 3, 4), _x(5, 3, 3, 3, 1)
    g, b, rm, rv = _x(3), _x(3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="cannot hold the result"):
        with torch.no_grad():
            bn_act_conv(x, g, b, rm, rv, w, padding=(1, 1, 0), out=torch.empty(2, 6, 3, 3, 4), out_channel_offset=2)
    with pytest.raises(RuntimeError, match="not differentiable"):
        bn_act_conv(x, g.requires_grad_(True), b, rm, rv, w, padding=(1, 1, 0), out=torch.empty(2, 5, 3, 3, 4))
