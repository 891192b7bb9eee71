"""Sliding-window inference: window rules, coverage, equality with whole-volume inference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ahnet_fast.infer.sliding_window import (
    importance_map,
    sliding_window_inference,
    valid_window,
    window_rules,
    window_starts,
)


class Pointwise(nn.Module):
    """1x1x1 convs: every output voxel depends on its own input voxel only."""

    def __init__(self, cin=2, cout=3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(cin, 8, 1), nn.ReLU(), nn.Conv3d(8, cout, 1))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.net(x)


class Divisible(nn.Module):
    """Conv net (3x3x1 + 1x1x3, zero padding) that, like AH-Net, takes only sizes divisible by (8, 8, 4)."""

    input_spec = None

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, 4, (3, 3, 1), padding=(1, 1, 0)), nn.ReLU(), nn.Conv3d(4, 2, (1, 1, 3), padding=(0, 0, 1))
        )

    def forward(self, x):
        if any(s % m for s, m in zip(x.shape[2:], (8, 8, 4))):
            raise ValueError(f"bad size {tuple(x.shape)}")
        return self.net(x)


def test_window_starts_cover_and_end_at_size():
    for size, win, ov in [(10, 4, 0.25), (10, 4, 0.0), (7, 7, 0.5), (33, 8, 0.5), (9, 8, 0.9)]:
        s = window_starts(size, win, ov)
        covered = set()
        for a in s:
            covered |= set(range(a, a + win))
        assert covered == set(range(size)) and s[0] == 0 and s[-1] == size - win
    assert window_starts(33, 8, 0.5) == [0, 4, 8, 12, 16, 20, 24, 25]
    with pytest.raises(ValueError):
        window_starts(3, 4, 0.1)


def test_importance_map_shapes_and_positivity():
    g = importance_map((9, 8, 5), "gaussian")
    assert g.shape == (9, 8, 5) and g.dtype == torch.float32
    assert 0.8 < float(g.max()) <= 1.0 and float(g.min()) >= 1e-3  # MONAI's map: unnormalised, floored
    assert float(g[4, 3, 2]) > float(g[0, 0, 0])  # centre weighs more than a corner
    assert torch.equal(importance_map((2, 3, 4), "constant"), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="gaussian"):
        importance_map((2, 2, 2), "box")


def test_window_rules_for_ahnet_configs():
    from ahnet_fast.models.validation import InputSpec

    class Fake(nn.Module):
        def __init__(self, psp, mode):
            super().__init__()
            self.input_spec = InputSpec(3, 1, psp, mode)

    assert window_rules(Fake(4, "transpose")) == ((128, 128, 32), (128, 128, 32))
    assert window_rules(Fake(0, "trilinear")) == ((32, 32, 32), (32, 32, 32))
    assert valid_window((100, 150, 20), window_rules(Fake(4, "transpose"))) == (128, 256, 32)
    assert valid_window((100, 150, 20), window_rules(Fake(3, "trilinear"))) == (128, 160, 32)
    assert window_rules(Pointwise()) is None
    assert valid_window((5, 6, 7), None) == (5, 6, 7)
    with pytest.raises(ValueError, match="window"):
        valid_window((5, 6), None)


def test_window_rules_match_monai_ahnet():
    monai_nets = pytest.importorskip("monai.networks.nets")
    m = monai_nets.AHNet(layers=(1, 1, 1, 1), psp_block_num=3, upsample_mode="transpose")
    assert window_rules(m) == ((64, 64, 32), (64, 64, 32))
    m = monai_nets.AHNet(layers=(1, 1, 1, 1), psp_block_num=2, upsample_mode="trilinear")
    assert window_rules(m) == ((32, 32, 32), (32, 32, 32))


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_pointwise_equals_whole_volume(blend, sw_batch_size):
    model = Pointwise().eval()
    x = torch.randn(2, 2, 11, 9, 7)
    out = sliding_window_inference(x, model, window=(6, 5, 4), overlap=0.3, blend=blend,
                                   sw_batch_size=sw_batch_size)
    with torch.no_grad():
        ref = model.net(x)
    assert out.shape == (2, 3, 11, 9, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(c[0] <= sw_batch_size and c[2:] == (6, 5, 4) for c in model.calls[1:])


def test_single_window_equals_padded_whole_volume():
    """Volume smaller than the window: padded to a valid size, run once, cropped: same as running padded."""
    model = Divisible().eval()
    model.input_spec = None  # rules given explicitly below
    x = torch.randn(1, 1, 13, 10, 6)
    out = sliding_window_inference(x, model, window=(16, 16, 8), rules=((8, 8, 4), (8, 8, 4)), blend="gaussian")
    # whole volume padded to the smallest valid size (16, 16, 8), symmetric zero padding
    xp = torch.nn.functional.pad(x, (1, 1, 3, 3, 1, 2))
    with torch.no_grad():
        ref = model(xp)[:, :, 1:14, 3:13, 1:7]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_overlapping_windows_constant_blend_equal_whole_where_receptive_field_fits():
    """Windows span H and W fully and overlap along D. The net reaches one voxel along D, so a
    window's output equals the whole-volume output except on its first/last slice (unless that is
    also the volume's). Where every covering window is exact, the constant blend must be exact."""
    model = Divisible().eval()
    x = torch.randn(1, 1, 16, 16, 24)
    out = sliding_window_inference(x, model, window=(16, 16, 8), overlap=0.5, blend="constant",
                                   rules=((8, 8, 4), (8, 8, 4)))
    with torch.no_grad():
        ref = model(x)
    # D-slices whose every covering window sees both z-neighbours equal the whole-volume result
    starts = window_starts(24, 8, 0.5)
    good = [z for z in range(24) if all(0 < z - s < 7 or (z - s in (0, 7) and (s == 0 if z - s == 0 else s + 8 == 24))
                                        for s in starts if s <= z < s + 8)]
    assert len(good) >= 6
    torch.testing.assert_close(out[..., good], ref[..., good], rtol=1e-5, atol=1e-6)
    # and the whole result is finite and close elsewhere too (border effects only)
    assert torch.isfinite(out).all()


def test_rounds_window_for_model_rules_and_caps_at_volume():
    model = Divisible().eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    x = torch.randn(1, 1, 40, 20, 9)
    out = sliding_window_inference(x, model, window=(13, 30, 5), rules=((8, 8, 4), (8, 8, 4)))
    assert out.shape == (1, 2, 40, 20, 9)
    # (13, 30, 5) -> (16, 32, 8), W capped at the rounded-up volume 24, D at 12
    assert set(seen) == {(16, 24, 8)}


def test_auto_rules_with_small_ahnet():
    from ahnet_fast.models.ahnet import AHNet

    model = AHNet(layers=(1, 1, 1, 1), in_channels=1, out_channels=2, psp_block_num=0,
                  upsample_mode="trilinear").eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    x = torch.randn(1, 1, 20, 36, 10)  # smaller than one valid window: padded to (32, 64, 32)
    out = sliding_window_inference(x, model, window=(20, 40, 10), blend="gaussian")
    assert seen == [(32, 64, 32)]  # rounded up by the model's own input_spec
    xp = torch.nn.functional.pad(x, (11, 11, 14, 14, 6, 6))
    with torch.no_grad():
        ref = model(xp)[:, :, 6:26, 14:50, 11:21]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_devices_autocast_progress_and_errors():
    model = Pointwise().eval()
    x = torch.randn(1, 2, 9, 9, 5)
    out = sliding_window_inference(x, model, window=(4, 4, 4), sw_device="cpu", device="cpu",
                                   autocast_dtype=torch.bfloat16, progress=True)
    with torch.no_grad():
        ref = model.net(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)  # bf16 compute, fp32 stitching
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        sliding_window_inference(x[0], model)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, model, overlap=1.0)
    with pytest.raises(ValueError, match="floating"):
        sliding_window_inference(x.long(), model)

    class Shrinks(nn.Module):
        def forward(self, x):
            return x[:, :, :-1]

    with pytest.raises(ValueError, match="model output"):
        sliding_window_inference(x, Shrinks(), window=(4, 4, 4))


@pytest.mark.gpu
def test_gpu_model_cpu_stitching_matches_cpu():
    model = Divisible().eval()
    x = torch.randn(1, 1, 40, 32, 24)
    ref = sliding_window_inference(x, model, window=(16, 16, 8), overlap=0.5, rules=((8, 8, 4), (8, 8, 4)))
    out = sliding_window_inference(x, model.cuda(), window=(16, 16, 8), overlap=0.5, sw_device="cuda",
                                   device="cpu", rules=((8, 8, 4), (8, 8, 4)))
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out16 = sliding_window_inference(x.cuda(), model, window=(16, 16, 8), autocast_dtype=torch.bfloat16,
                                     rules=((8, 8, 4), (8, 8, 4)))
    assert out16.device.type == "cuda" and torch.isfinite(out16).all()


@pytest.mark.parametrize("window", [(9, 8, 5), (128, 128, 32), (16, 16, 4)])
def test_importance_map_is_monais(window):
    """Same Gaussian map as MONAI 1.6.1, bit for bit, floor at 1e-3 included."""
    monai_utils = pytest.importorskip("monai.data.utils")
    for mode in ("gaussian", "constant"):
        want = monai_utils.compute_importance_map(window, mode=mode, sigma_scale=0.125, device="cpu")
        assert torch.equal(importance_map(window, mode, 0.125), want)


# (a volume smaller than the window is not compared: MONAI 1.6.1 then calls the model on the
# unpadded volume, which AH-Net refuses; ours pads it to a size the model takes)
@pytest.mark.parametrize("size,window,overlap", [((37, 29, 19), (16, 16, 8), 0.25), ((20, 17, 9), (8, 8, 4), 0.5),
                                                 ((24, 16, 12), (8, 8, 4), 0.0)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blend_equals_monai_sliding_window_inference(size, window, overlap, blend):
    """With the same options our stitched output equals monai.inferers.sliding_window_inference's
    (window positions, Gaussian floor, division by the summed weights)."""
    monai_inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    model = Divisible().eval()
    x = torch.randn(1, 1, *size)
    ours = sliding_window_inference(x, model, window=window, overlap=overlap, blend=blend, rules=None)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(x, window, 1, model, overlap=overlap, mode=blend,
                                                         sigma_scale=0.125)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_mirror_combinations_and_their_errors():
    from ahnet_fast.infer.sliding_window import mirror_combinations

    assert mirror_combinations(()) == []
    assert mirror_combinations((1, 0)) == [(2,), (3,), (2, 3)]
    assert len(mirror_combinations((0, 1, 2))) == 7
    for bad in ((3,), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="mirror_axes must be distinct spatial axes"):
            mirror_combinations(bad)


def test_mirrored_inference_averages_the_unflipped_outputs():
    """One window: the output is exactly the mean over the 4 in-plane flips of the flipped-back
    outputs. Several windows, a net symmetric under those flips: mirroring changes nothing."""
    from ahnet_fast.infer.sliding_window import sliding_window_inference

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).double().eval()
    x = torch.randn(1, 1, 12, 10, 6, dtype=torch.float64)
    got = sliding_window_inference(x, net, window=(12, 10, 6), rules=None, mirror_axes=(0, 1))
    with torch.no_grad():
        want = sum(net(x.flip(d)).flip(d) if d else net(x) for d in [(), (2,), (3,), (2, 3)]) / 4
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, net(x).detach().float(), atol=1e-3)  # mirroring did something here
    with torch.no_grad():
        w = net.weight
        net.weight.copy_((w + w.flip(2) + w.flip(3) + w.flip((2, 3))) / 4)  # symmetric in H and W
    plain = sliding_window_inference(x, net, window=(8, 8, 4), overlap=0.5, rules=None)
    mirrored = sliding_window_inference(x, net, window=(8, 8, 4), overlap=0.5, rules=None, mirror_axes=(0, 1))
    torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-6)
