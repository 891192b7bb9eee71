"""Which inputs AHNet takes, the errors for those it cannot, and pad-to-valid helpers."""
from __future__ import annotations

import warnings

import pytest
import torch

from ahnet_fast.models.padding import PadInfo, crop_to_original, pad_to_valid, run_padded
from ahnet_fast.models.validation import InputSpec, check_input, valid_spatial_shape
from ahnet_fast.reference import FCN, MCFCN, AHNet

SMALL = (1, 1, 1, 1)
warnings.filterwarnings("ignore", module="monai")


def _ok(spec: InputSpec, shape: tuple[int, ...], training: bool = False) -> bool:
    try:
        check_input(spec, torch.empty(shape), training)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize(
    "spec_args,shape,message",
    [
        ((3, 1, 4, "transpose"), (1, 1, 128, 128, 48), "depth 48 must be divisible by 32"),
        ((3, 1, 4, "transpose"), (1, 1, 96, 128, 32), "height 96 must be divisible by 128"),
        ((3, 1, 2, "transpose"), (1, 1, 32, 40, 32), "width 40 must be divisible by 32"),
        ((3, 1, 4, "trilinear"), (1, 1, 96, 128, 32), "height 96 must be at least 128"),
        ((3, 1, 0, "nearest"), (1, 1, 33, 32, 32), "height 33 must be divisible by 32"),
        ((2, 1, 3, "bilinear"), (1, 1, 32, 32), "height 32 must be at least 64"),
        ((2, 1, 0, "transpose"), (1, 1, 32, 20), "width 20 must be divisible by 32"),
        ((3, 1, 0, "transpose"), (1, 1, 32, 32, 32, 1), "expects a 5-D tensor"),
        ((3, 1, 0, "transpose"), (1, 32, 32, 32), "got 4-D"),
        ((2, 1, 0, "transpose"), (1, 1, 32, 32, 32), "expects a 4-D tensor"),
        ((3, 2, 0, "transpose"), (1, 1, 32, 32, 32), r"in_channels=2\) got 1 channels"),
        ((3, 1, 0, "transpose"), (0, 1, 32, 32, 32), "empty batch"),
    ],
)
def test_check_input_messages(spec_args, shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_input(InputSpec(*spec_args), torch.empty(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.int16])
def test_check_input_rejects_non_float(dtype) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        check_input(InputSpec(3, 1, 0, "transpose"), torch.zeros(1, 1, 32, 32, 32, dtype=dtype))


def test_check_input_training_batchnorm_rule() -> None:
    spec = InputSpec(3, 1, 0, "transpose")
    assert _ok(spec, (1, 1, 32, 32, 32))  # eval
    with pytest.raises(ValueError, match="more than one value per channel"):
        check_input(spec, torch.empty(1, 1, 32, 32, 32), training=True)
    assert _ok(spec, (2, 1, 32, 32, 32), True) and _ok(spec, (1, 1, 32, 32, 64), True)


def test_forward_raises_before_computing() -> None:
    net = AHNet(layers=SMALL, psp_block_num=0)
    with pytest.raises(ValueError, match="depth 48 must be divisible by 32"):
        net(torch.randn(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="floating-point"):
        net(torch.ones(1, 1, 32, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="got 3 channels"):
        net(torch.randn(1, 3, 32, 32, 32))
    net.train()
    with pytest.raises(ValueError, match="BatchNorm"):
        net(torch.randn(1, 1, 32, 32, 32))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"psp_block_num": 5}, "psp_block_num must be an integer in 0..4"),
        ({"upsample_mode": "bicubic"}, "upsample_mode must be one of"),
        ({"upsample_mode": "bilinear"}, "'bilinear' does not work with spatial_dims=3"),
        ({"spatial_dims": 2, "upsample_mode": "trilinear"}, "'trilinear' does not work with spatial_dims=2"),
        ({"layers": (1, 1, 1)}, "layers must be 4 positive integers"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"out_channels": 0}, "out_channels must be a positive integer"),
    ],
)
def test_constructor_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AHNet(**kwargs)


def test_fcn_input_errors() -> None:
    with pytest.raises(ValueError, match="upsample_mode"):
        FCN(upsample_mode="nearest", pretrained=False)
    with pytest.raises(TypeError, match="pretrained must be"):
        FCN(pretrained=3)
    fcn = MCFCN(in_channels=2, pretrained=False)
    with pytest.raises(ValueError, match=r"expects \(B, 2, H, W\)"):
        fcn(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        fcn(torch.ones(1, 2, 32, 32, dtype=torch.int32))


def test_size_rules_agree_with_monai_2d() -> None:
    """The rules decide exactly as MONAI does: it either fails or returns another size
    (odd sizes come back one larger) where we raise. (A wider sweep, 730 shapes over 2D and
    3D, every mode, was run once by hand; this keeps the cases next to each boundary.)"""
    monai_nets = pytest.importorskip("monai.networks.nets")
    cases = {
        ("transpose", 3): {0: (32, 63, 64, 96, 128), 1: (16, 31, 32, 48, 64)},
        ("bilinear", 3): {0: (32, 48, 64, 96)},
    }
    for (mode, psp), per_axis in cases.items():
        spec = InputSpec(2, 1, psp, mode)
        ref = monai_nets.AHNet(layers=SMALL, spatial_dims=2, psp_block_num=psp, upsample_mode=mode).eval()
        base = spec.minimums()
        for axis, sizes in per_axis.items():
            for s in sizes:
                shape = [1, 1, *base]
                shape[2 + axis] = s
                try:
                    with torch.no_grad():
                        monai_ok = tuple(ref(torch.randn(shape)).shape[2:]) == tuple(shape[2:])
                except RuntimeError:
                    monai_ok = False
                assert _ok(spec, tuple(shape)) == monai_ok, (mode, psp, shape)


def test_valid_spatial_shape() -> None:
    assert valid_spatial_shape(InputSpec(3, 1, 4, "transpose"), (160, 150, 45)) == (256, 256, 64)
    assert valid_spatial_shape(InputSpec(3, 1, 0, "trilinear"), (160, 150, 45)) == (160, 160, 64)
    assert valid_spatial_shape(InputSpec(3, 1, 4, "trilinear"), (20, 150, 1)) == (128, 160, 32)
    assert valid_spatial_shape(InputSpec(2, 1, 1, "transpose"), (32, 32)) == (32, 32)
    # training with batch 1 at the smallest size: grow one axis so BN sees > 1 value
    assert valid_spatial_shape(InputSpec(3, 1, 0, "transpose"), (10, 10, 10), training=True) == (64, 32, 32)
    with pytest.raises(ValueError, match="expected 3 spatial sizes"):
        valid_spatial_shape(InputSpec(3, 1, 0, "transpose"), (10, 10))


def test_pad_and_crop() -> None:
    spec = InputSpec(3, 1, 0, "trilinear")
    x = torch.randn(2, 1, 30, 33, 5)
    padded, info = pad_to_valid(x, spec, value=-3.0)
    assert padded.shape == (2, 1, 32, 64, 32)
    assert info == PadInfo(original=(30, 33, 5), before=(1, 15, 13))
    assert torch.equal(crop_to_original(padded, info), x)
    assert (padded[:, :, 0] == -3.0).all() and (padded[..., -1] == -3.0).all()
    rep, _ = pad_to_valid(x, spec, mode="replicate")
    assert torch.equal(rep[:, :, 0, 15:48, 13:18], x[:, :, 0])
    ref, _ = pad_to_valid(torch.randn(1, 1, 20, 20, 20), spec, mode="reflect")
    assert ref.shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="use 'replicate'"):
        pad_to_valid(x, spec, mode="reflect")
    with pytest.raises(ValueError, match="mode must be one of"):
        pad_to_valid(x, spec, mode="wrap")
    same, info2 = pad_to_valid(torch.randn(1, 1, 32, 32, 32), spec)
    assert info2.before == (0, 0, 0) and same.shape == (1, 1, 32, 32, 32)


def test_run_padded_160x150x45_volume() -> None:
    net = AHNet(layers=SMALL, in_channels=1, out_channels=2, psp_block_num=1, upsample_mode="trilinear").eval()
    x = torch.randn(1, 1, 160, 150, 45)
    with torch.no_grad():
        y = run_padded(net, x)
        assert y.shape == (1, 2, 160, 150, 45)
        assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="width 150 must be divisible by 32"):
        net(x)
    with pytest.raises(TypeError, match="no input_spec"):
        run_padded(torch.nn.Identity(), x)


class _Echo(torch.nn.Module):
    """Stands in for a network: records what it is given and returns it, times 2."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.input_spec = spec
        self.seen: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.input_spec, x, self.training)
        self.seen = tuple(x.shape)
        return torch.cat([x, 2 * x], dim=1)


def test_run_padded_feeds_a_valid_shape_and_crops_exactly() -> None:
    echo = _Echo(InputSpec(3, 1, 4, "transpose")).eval()
    x = torch.randn(1, 1, 160, 150, 45)
    y = run_padded(echo, x, mode="replicate")
    assert echo.seen == (1, 1, 256, 256, 64)
    assert torch.equal(y[:, :1], x) and torch.equal(y[:, 1:], 2 * x)


def test_run_padded_training_batch_of_one() -> None:
    net = AHNet(layers=SMALL, psp_block_num=0).train()
    x = torch.randn(1, 1, 20, 17, 9, requires_grad=True)
    y = run_padded(net, x, mode="replicate")
    assert y.shape == (1, 1, 20, 17, 9)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
