"""ahnet_fast.nn: state_dict keys, loading from Conv3d/BatchNorm3d pairs, and exact BatchNorm
bookkeeping (train/eval, num_batches_tracked, momentum=None, track_running_stats=False)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ahnet_fast.nn import BNActConv3d, ConvBNAct3d, ZMaxPool3d, bn_act_conv_modules, conv_bn_act_modules
from ahnet_fast.ops import use_backend


def _pair(cin=3, cout=4, k=(3, 3, 1), pad=(1, 1, 0), stride=1, bias=False, bn_ch=None, **bn_kw):
    conv = nn.Conv3d(cin, cout, k, stride=stride, padding=pad, bias=bias).double()
    bn = nn.BatchNorm3d(bn_ch or cout, **bn_kw).double()
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.normal_()
    return conv, bn


def test_state_dict_keys_and_loading_from_a_pair():
    conv, bn = _pair(bias=True)
    m = ConvBNAct3d(3, 4, (3, 3, 1), padding=(1, 1, 0), bias=True).double()
    want = {f"conv.{k}" for k in conv.state_dict()} | {f"bn.{k}" for k in bn.state_dict()}
    assert set(m.state_dict()) == want
    sd = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    sd.update({f"bn.{k}": v for k, v in bn.state_dict().items()})
    m.load_state_dict(sd, strict=True)
    m.eval()
    bn.eval()
    x = torch.randn(2, 3, 5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), torch.relu(bn(conv(x))))

    p = BNActConv3d(4, 3, (1, 1, 3), padding=(0, 0, 1)).double()
    assert set(p.state_dict()) == {f"bn.{k}" for k in nn.BatchNorm3d(4).state_dict()} | {"conv.weight"}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("zpool", ["none", "before_bn", "after_bn"])
def test_conv_bn_act_module_matches_plain_modules_over_steps(momentum, zpool):
    conv, bn = _pair(momentum=momentum)
    m = ConvBNAct3d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), zpool=zpool)
    pool = nn.MaxPool3d((1, 1, 2))
    for step in range(3):
        x = torch.randn(2, 3, 5, 3, 4, dtype=torch.float64)
        c = conv(x)
        y = bn(pool(c) if zpool == "before_bn" else c)
        ref = torch.relu(pool(y) if zpool == "after_bn" else y)
        with use_backend("reference"):
            out = m(x)
        torch.testing.assert_close(out, ref)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(m.bn.state_dict()[k], v, msg=k)
    assert int(m.bn.num_batches_tracked) == 3
    m.eval()
    bn.eval()
    x = torch.randn(2, 3, 5, 3, 4, dtype=torch.float64)
    c = conv(x)
    y = bn(pool(c) if zpool == "before_bn" else c)
    torch.testing.assert_close(m(x), torch.relu(pool(y) if zpool == "after_bn" else y))
    assert int(m.bn.num_batches_tracked) == 3


def test_untracked_statistics_and_residual_and_gradients():
    conv, bn = _pair(track_running_stats=False)
    m = ConvBNAct3d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=False)
    m.eval()
    bn.eval()  # no running stats: batch statistics in eval too, as nn.BatchNorm3d
    x = torch.randn(2, 3, 5, 3, 4, dtype=torch.float64)
    r = torch.randn(2, 4, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    ref = bn(conv(x)) + r
    out = m(x, r, relu=False)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, [conv.weight, bn.weight, bn.bias, r], g)
    go = torch.autograd.grad(out, [m.conv.weight, m.bn.weight, m.bn.bias, r], g)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_bn_act_conv_module_and_slice_output(training):
    conv, bn = _pair(cin=4, cout=3, k=(1, 1, 3), pad=(0, 0, 1), bn_ch=4)
    m = BNActConv3d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    m.train(training)
    bn.train(training)
    x = torch.randn(2, 4, 3, 5, 4, dtype=torch.float64)
    ref = conv(torch.relu(bn(x)))
    torch.testing.assert_close(m(x), ref)
    torch.testing.assert_close(m.bn.running_mean, bn.running_mean)
    m.eval()
    bn.eval()
    buf = torch.full((2, 7, 3, 5, 4), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        view = m(x, out=buf, out_channel_offset=4)
    torch.testing.assert_close(view, conv(torch.relu(bn(x))).detach())
    assert torch.isnan(buf[:, :4]).all()


def test_functional_helpers_accept_2d_modules():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    bn = nn.BatchNorm2d(4).double()
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    ref = torch.relu(bn(conv(x)))
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    bn.running_mean.zero_()
    bn.running_var.fill_(1)
    bn.num_batches_tracked.zero_()
    out = conv_bn_act_modules(x, conv, bn)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(bn.running_var, bn2.running_var)
    pre_bn, pre_conv = nn.BatchNorm2d(3).double().eval(), nn.Conv2d(3, 5, 3, padding=1).double()
    torch.testing.assert_close(bn_act_conv_modules(x, pre_bn, pre_conv), pre_conv(torch.relu(pre_bn(x))))
    with pytest.raises(ValueError, match="zpool needs a depth axis"):
        conv_bn_act_modules(x, conv2, bn2, zpool="after_bn")


def test_from_modules_validation():
    conv, bn = _pair()
    with pytest.raises(ValueError, match="bn has 4 features but the conv's in_channels is 3"):
        BNActConv3d.from_modules(conv, bn)
    with pytest.raises(TypeError, match="nn.BatchNorm3d"):
        ConvBNAct3d.from_modules(conv, conv)
    with pytest.raises(ValueError, match="groups=1"):
        ConvBNAct3d.from_modules(nn.Conv3d(4, 4, 1, groups=2), nn.BatchNorm3d(4))
    with pytest.raises(ValueError, match="zpool="):
        ConvBNAct3d.from_modules(conv, bn, zpool="max")


def test_zmaxpool_module():
    assert isinstance(ZMaxPool3d.from_modules(nn.MaxPool3d((1, 1, 2))), ZMaxPool3d)
    with pytest.raises(ValueError, match="z-pool"):
        ZMaxPool3d.from_modules(nn.MaxPool3d((2, 2, 2)))
    x = torch.randn(2, 3, 3, 3, 5)
    torch.testing.assert_close(ZMaxPool3d()(x), nn.MaxPool3d((1, 1, 2))(x))
