"""BatchNorm statistics re-estimated on inference windows (ahnet_fast.train.precise_bn)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from ahnet_fast.infer.sliding_window import window_starts
from ahnet_fast.train.precise_bn import batchnorm_layers, inference_windows, recalibrate_batchnorm


def test_windows_are_the_tiles_inference_cuts_with_their_mirror_images():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 37, 20)).astype(np.float32)
    win = (16, 16, 8)
    wins = inference_windows([image], win, 0.25, mirror_axes=(0, 1), limit=10_000, seed=3)
    starts = [window_starts(s, w, 0.25) for s, w in zip(image.shape, win)]
    n_tiles = int(np.prod([len(s) for s in starts]))
    assert len(wins) == 4 * n_tiles and all(w.shape == win and w.dtype == np.float32 for w in wins)
    # every tile appears as is and mirrored along H, W and both
    expected = []
    for i, j, k in itertools.product(*starts):
        t = image[i:i + 16, j:j + 16, k:k + 8]
        expected += [t, t[::-1], t[:, ::-1], t[::-1, ::-1]]
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, wins)) == sorted(map(key, expected))
    # the order is shuffled (a batch mixes places) and reproducible from the seed
    assert [key(w) for w in wins] != [key(w) for w in expected]
    assert [key(w) for w in inference_windows([image], win, 0.25, (0, 1), 10_000, seed=3)] == [key(w) for w in wins]


def test_small_volumes_are_padded_with_their_minimum_and_the_limit_holds():
    image = np.arange(10 * 12 * 6, dtype=np.float32).reshape(10, 12, 6) + 5.0
    (w,) = inference_windows([image], (16, 16, 8), mirror_axes=())
    # symmetric padding, as sliding-window inference pads: 3 + 3 in H, 2 + 2 in W, 1 + 1 in D
    np.testing.assert_array_equal(w[3:13, 2:14, 1:7], image)
    assert w[0, 0, 0] == 5.0 and w[15, 15, 7] == 5.0
    big = np.zeros((64, 64, 32), np.float32)
    assert len(inference_windows([big, big], (16, 16, 8), mirror_axes=(0, 1), limit=50)) == 50
    with pytest.raises(ValueError, match="limit must be at least 1"):
        inference_windows([big], (16, 16, 8), limit=0)
    with pytest.raises(ValueError, match=r"expected volumes \(H, W, D\)"):
        inference_windows([big[0]], (16, 16, 8))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.conv2 = nn.Conv3d(3, 2, 1)
        self.bn2 = nn.BatchNorm3d(2, momentum=0.3)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def test_running_statistics_become_the_plain_average_over_the_batches():
    torch.manual_seed(0)
    net = _Net().double()
    net.bn.running_mean.fill_(7.0)  # stale statistics: discarded, not blended
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    rng = np.random.default_rng(1)
    wins = [rng.normal(loc=i % 3, size=(6, 5, 4)) for i in range(7)]  # 7 windows, batch 2: 3 batches, 1 left out
    info = recalibrate_batchnorm(net, wins, batch_size=2)
    assert info == {"layers": 2, "batches": 3, "windows": 6}
    # expected: per batch, the batch statistics of each BN input (in train mode), averaged over batches
    means, vars_ = {"bn": [], "bn2": []}, {"bn": [], "bn2": []}
    ref = _Net().double()
    ref.load_state_dict(net.state_dict())
    ref.train()
    for b in range(3):
        x = torch.from_numpy(np.stack(wins[2 * b:2 * b + 2]))[:, None]
        h = ref.conv(x)
        means["bn"].append(h.mean((0, 2, 3, 4)))
        vars_["bn"].append(h.var((0, 2, 3, 4), unbiased=True))
        h2 = ref.conv2(torch.relu(nn.functional.batch_norm(h, None, None, ref.bn.weight, ref.bn.bias, True)))
        means["bn2"].append(h2.mean((0, 2, 3, 4)))
        vars_["bn2"].append(h2.var((0, 2, 3, 4), unbiased=True))
    for name in ("bn", "bn2"):
        layer = getattr(net, name)
        torch.testing.assert_close(layer.running_mean, torch.stack(means[name]).mean(0))
        torch.testing.assert_close(layer.running_var, torch.stack(vars_[name]).mean(0))
    # only the statistics changed; momenta restored; the model is left for inference
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert net.bn.momentum == 0.1 and net.bn2.momentum == 0.3 and not net.training
    # the result depends on the weights alone: a second run gives the same statistics
    first = net.bn.running_var.clone()
    recalibrate_batchnorm(net, wins, batch_size=2)
    torch.testing.assert_close(net.bn.running_var, first)
    # nothing to do: no windows, or no BatchNorm
    assert recalibrate_batchnorm(net, [], 2)["batches"] == 0
    assert recalibrate_batchnorm(nn.Conv3d(1, 1, 1), wins, 2) == {"layers": 0, "batches": 0, "windows": 0}
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        recalibrate_batchnorm(net, wins, 0)


def test_fast_ahnet_re_estimates_what_the_reference_does():
    """The fused model updates its running statistics in its own kernels: re-estimated, they match the
    plain-PyTorch reference's from the same weights."""
    from ahnet_fast.train.models import build_ahnet

    cfg = {"in_channels": 1, "out_channels": 3, "layers": (1, 1, 1, 1), "psp_block_num": 0,
           "upsample_mode": "trilinear"}
    torch.manual_seed(0)
    # float64: the deepest BatchNorms see a few voxels per channel, where float32 rounding of two
    # different (correct) summation orders shows in the fourth digit
    ref = build_ahnet(cfg, fast=False).double()
    fast = build_ahnet(cfg, fast=True).double()
    fast.load_state_dict(ref.state_dict())
    rng = np.random.default_rng(2)
    wins = inference_windows([rng.normal(size=(40, 40, 32)).astype(np.float32)], (32, 32, 32), mirror_axes=(0,),
                             limit=4)
    a = recalibrate_batchnorm(ref, wins, 2)
    b = recalibrate_batchnorm(fast, wins, 2)
    assert a == b and a["layers"] == len(batchnorm_layers(ref)) > 10
    sa, sb = ref.state_dict(), fast.state_dict()
    for k in sa:
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-9, atol=1e-9, msg=k)
