"""ahnet_fast.infer.graphed: one CUDA graph per inference forward (GPU tests) and its refusals."""
from __future__ import annotations

import pytest
import torch

from ahnet_fast import AHNet
from ahnet_fast.infer import graphed

CFG = dict(in_channels=1, out_channels=3, psp_block_num=1, upsample_mode="trilinear", layers=(1, 1, 1, 1))


def test_refuses_what_a_graph_cannot_replay():
    net = AHNet(**CFG)
    x = torch.randn(1, 1, 64, 64, 32)
    with pytest.raises(ValueError, match="need a CUDA input"):
        graphed(net.eval(), x)
    with pytest.raises(ValueError, match="training mode"):
        graphed(net.train(), x)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_replay_equals_eager_and_follows_weight_updates(layout):
    torch.manual_seed(0)
    net = AHNet(**CFG).cuda().eval()
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.randn(1, 1, 64, 64, 32, device="cuda").contiguous(memory_format=fmt)
    f = graphed(net, x)
    for _ in range(2):
        x = torch.randn_like(x)
        with torch.no_grad():
            want = net(x)
        got = f(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # in-place parameter/buffer updates are replayed too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_var.mul_(1.5)
        want = net(x)
    torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="captured for"):
        f(torch.randn(1, 1, 64, 64, 64, device="cuda"))


@pytest.mark.gpu
def test_sliding_window_replays_one_graph_per_window_shape():
    from ahnet_fast.infer import sliding_window_inference

    torch.manual_seed(0)
    net = AHNet(**CFG).cuda().eval()
    x = torch.randn(1, 1, 150, 90, 70, device="cuda")
    kw = dict(window=(64, 64, 32), overlap=0.25, sw_batch_size=2)
    plain = sliding_window_inference(x, net, cuda_graph=False, **kw)
    replayed = sliding_window_inference(x, net, cuda_graph=True, **kw)
    torch.testing.assert_close(replayed, plain, rtol=1e-5, atol=1e-5)
