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


def test_training_capture_refuses_what_it_cannot_replay():
    from ahnet_fast.train.graphed import graphed_training

    net = AHNet(**CFG)
    x = torch.randn(1, 1, 64, 64, 32)
    with pytest.raises(ValueError, match="eval mode"):
        graphed_training(net.eval(), x)
    with pytest.raises(ValueError, match="CUDA input"):
        graphed_training(net.train(), x)
    net.bn0.momentum = None
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="momentum=None"):
            graphed_training(net.cuda().train(), x.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_graphed_training_steps_equal_eager_steps():
    """Two SGD steps with the forward and backward replayed from CUDA graphs give the weights,
    running statistics and counters of two eager steps."""
    from ahnet_fast.train.graphed import graphed_training

    torch.manual_seed(0)
    eager = AHNet(**CFG).cuda().train()
    net = AHNet(**CFG).cuda().train()
    net.load_state_dict(eager.state_dict())
    xs = [torch.randn(2, 1, 64, 64, 32, device="cuda") for _ in range(2)]
    g = graphed_training(net, xs[0])
    # the warm-up iterations ran the model: restart both from the same state
    net.load_state_dict(eager.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, net)]
    for x in xs:
        for fn, opt in ((eager, opts[0]), (g, opts[1])):
            opt.zero_grad(set_to_none=False)
            fn(x).float().square().mean().backward()
            opt.step()
    for (name, a), b in zip(eager.state_dict().items(), net.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name
