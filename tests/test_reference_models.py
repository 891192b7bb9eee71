"""Parity of the plain-PyTorch reference models with MONAI 1.6.1 (the peer).

Every output comparison loads MONAI's state_dict into ours and runs both in float64;
fresh models in eval mode reach activations around 1e5, so errors are measured
relative to the output's scale (max |diff| <= 1e-10 * max |MONAI output|).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from ahnet_fast.reference import AHNet, FCN, MCFCN, ResNet50

monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")
monai_fcn = pytest.importorskip("monai.networks.blocks.fcn")

SMALL = (1, 1, 1, 1)
RTOL = 1e-10

warnings.filterwarnings("ignore", module="monai")


@torch.no_grad()
def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert torch.isfinite(ref).all()
    scale = ref.abs().max().clamp_min(1e-300)
    return float((a - ref).abs().max() / scale)


def _build_pair(seed: int = 0, **kw) -> tuple[nn.Module, nn.Module]:
    """MONAI and ours from the same seed; checks same-seed init, keys and shapes; float64."""
    torch.manual_seed(seed)
    ref = monai_ahnet.AHNet(**kw)
    torch.manual_seed(seed)
    ours = AHNet(**kw)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(so) == list(sr)
    for k in sr:
        assert so[k].shape == sr[k].shape, k
        assert torch.equal(so[k], sr[k]), f"same-seed init differs at {k}"
    # parity below must hold for arbitrary weights, not just identical seeds: redraw MONAI's
    # BatchNorm affine parameters and running statistics, then load its state_dict into ours
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.double(), ours.double()


def _check_forward(ref: nn.Module, ours: nn.Module, x: torch.Tensor, train: bool, grads: bool = False) -> None:
    ref.train(train)
    ours.train(train)
    xr = x.clone().requires_grad_(grads)
    xo = x.clone().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        y_ref = ref(xr)
        y = ours(xo)
    assert _max_rel(y, y_ref) <= RTOL
    if train:  # running statistics updated identically
        sr, so = ref.state_dict(), ours.state_dict()
        for k in sr:
            if sr[k].is_floating_point():
                assert _max_rel(so[k], sr[k]) <= RTOL, k
            else:
                assert torch.equal(so[k], sr[k]), k
    if grads:  # every gradient: input and all parameters
        w = torch.randn_like(y_ref)
        (y_ref * w).sum().backward()
        (y * w).sum().backward()
        assert _max_rel(xo.grad, xr.grad) <= 1e-9
        for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
            assert p_ref.grad is not None and p.grad is not None, name
            assert _max_rel(p.grad, p_ref.grad) <= 1e-9, name


def _run_both_modes(seed: int, x_shape: tuple[int, ...], grads: bool = False, **kw) -> None:
    ref, ours = _build_pair(seed, **kw)
    x = torch.randn(x_shape, dtype=torch.float64)
    _check_forward(ref, ours, x, train=False)
    _check_forward(ref, ours, x, train=True, grads=grads)


# Float64 3D convolutions are slow on a CPU: 3D runs at the smallest sizes; PSP depths 3 and
# 4 with transposed convs (in-plane >= 64 / 128) are covered in 2D and by the default test.
@pytest.mark.parametrize(
    "mode,psp,shape,channels",
    [
        ("transpose", 0, (2, 2, 32, 32, 32), (2, 3)),
        ("trilinear", 2, (1, 1, 32, 32, 64), (1, 1)),
        ("nearest", 1, (1, 1, 32, 32, 64), (1, 2)),
    ],
)
def test_ahnet3d_matches_monai(mode: str, psp: int, shape: tuple[int, ...], channels: tuple[int, int]) -> None:
    _run_both_modes(
        10 + psp,
        shape,
        grads=mode == "transpose",
        layers=SMALL,
        in_channels=channels[0],
        out_channels=channels[1],
        psp_block_num=psp,
        upsample_mode=mode,
    )


@pytest.mark.parametrize(
    "mode,psp,shape,channels",
    [
        ("transpose", 0, (2, 1, 32, 32), (1, 1)),
        ("nearest", 1, (2, 1, 32, 32), (1, 1)),
        ("bilinear", 2, (2, 1, 32, 32), (1, 1)),
        ("transpose", 3, (1, 3, 64, 32), (3, 2)),
        ("bilinear", 4, (1, 1, 128, 32), (1, 1)),
        ("transpose", 4, (1, 1, 128, 32), (1, 1)),
    ],
)
def test_ahnet2d_matches_monai(mode: str, psp: int, shape: tuple[int, ...], channels: tuple[int, int]) -> None:
    _run_both_modes(
        20 + psp,
        shape,
        layers=(2, 1, 1, 2) if psp == 3 else SMALL,
        spatial_dims=2,
        in_channels=channels[0],
        out_channels=channels[1],
        psp_block_num=psp,
        upsample_mode=mode,
    )


def test_ahnet_default_arguments_smallest_input() -> None:
    """The one test with the full ResNet50 depth: MONAI's defaults at 128x128x32."""
    ref, ours = _build_pair(50)
    assert sum(p.numel() for p in ours.parameters()) == 38_133_768
    x = torch.randn(1, 1, 128, 128, 32, dtype=torch.float64)
    _check_forward(ref, ours, x, train=False)  # train mode at this depth is covered by the small nets


def test_paper_parameter_count() -> None:
    net = AHNet(layers=(3, 4, 6, 3), psp_block_num=4, upsample_mode="trilinear")
    assert sum(p.numel() for p in net.parameters()) == 27_085_500


# --------------------------------------------------------------------------- FCN / MCFCN
def _torchvision_resnet50_keys() -> list[str]:
    """state_dict keys of torchvision's resnet50, written out from its source layout."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for li, n in enumerate((3, 4, 6, 3), start=1):
        for bi in range(n):
            p = f"layer{li}.{bi}."
            for j in (1, 2, 3):
                keys.append(f"{p}conv{j}.weight")
                keys += [f"{p}bn{j}.{b}" for b in bn]
            if bi == 0:
                keys.append(f"{p}downsample.0.weight")
                keys += [f"{p}downsample.1.{b}" for b in bn]
    return keys + ["fc.weight", "fc.bias"]


def test_resnet50_matches_torchvision_layout() -> None:
    net = ResNet50()
    assert list(net.state_dict()) == _torchvision_resnet50_keys()
    assert sum(p.numel() for p in net.parameters()) == 25_557_032  # torchvision's resnet50
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # v1.5
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


class _FakeTorchvisionModels:
    """Stands in for ``torchvision.models`` (absent here) so MONAI's FCN can be built; it
    returns our ResNet50, whose layout test_resnet50_matches_torchvision_layout pins down."""

    class ResNet50_Weights:  # noqa: N801 - torchvision's name
        IMAGENET1K_V1 = "IMAGENET1K_V1"

    @staticmethod
    def resnet50(progress: bool = True, weights: object = None) -> ResNet50:
        assert weights is None, "tests never ask for downloaded weights"
        return ResNet50()


@pytest.fixture
def monai_fcn_module(monkeypatch):
    monkeypatch.setattr(monai_fcn, "models", _FakeTorchvisionModels)
    return monai_fcn


@pytest.mark.parametrize(
    "cls_name,mode,kw,cin",
    [("FCN", "bilinear", {"out_channels": 2}, 3), ("MCFCN", "transpose", {"in_channels": 2, "out_channels": 3}, 2)],
)
def test_fcn_and_mcfcn_match_monai(monai_fcn_module, cls_name: str, mode: str, kw: dict, cin: int) -> None:
    ref_cls, our_cls = getattr(monai_fcn_module, cls_name), {"FCN": FCN, "MCFCN": MCFCN}[cls_name]
    torch.manual_seed(60)
    ref = ref_cls(upsample_mode=mode, pretrained=False, **kw)
    torch.manual_seed(60)
    ours = our_cls(upsample_mode=mode, pretrained=False, **kw)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(so) == list(sr)
    assert all(torch.equal(so[k], sr[k]) for k in sr), "same-seed init differs"
    ref.double()
    ours.double()
    x = torch.randn(2, cin, 64, 64, dtype=torch.float64)
    for train in (False, True):
        ref.train(train)
        ours.train(train)
        with torch.no_grad():
            assert _max_rel(ours(x.clone()), ref(x.clone())) <= RTOL


def _random_resnet50_file(path) -> dict[str, torch.Tensor]:
    torch.manual_seed(70)
    net = ResNet50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    sd = net.state_dict()
    torch.save(sd, path)
    return sd


def test_fcn_loads_torchvision_format_file(tmp_path, monkeypatch) -> None:
    sd = _random_resnet50_file(tmp_path / "r50.pth")
    fcn = FCN(pretrained=tmp_path / "r50.pth")
    got = fcn.state_dict()
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        key = "bn0." + k[4:] if k.startswith("bn1.") else k
        assert torch.equal(got[key], v), k
    # wrapped checkpoint, and MCFCN
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    assert torch.equal(MCFCN(in_channels=4, pretrained=str(tmp_path / "wrapped.pth")).conv1.weight, sd["conv1.weight"])
    # pretrained=True: no file anywhere -> a message saying how to supply one
    monkeypatch.delenv("AHNET_FAST_RESNET50_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="pretrained='/path/to/resnet50.pth'"):
        FCN(pretrained=True)
    # pretrained=True finds the file torchvision would have cached, or the one the env var names
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r50.pth").rename(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    assert torch.equal(FCN(pretrained=True).layer3[2].conv2.weight, sd["layer3.2.conv2.weight"])
    monkeypatch.setenv("AHNET_FAST_RESNET50_WEIGHTS", str(tmp_path / "wrapped.pth"))
    assert torch.equal(FCN(pretrained=True).bn0.running_var, sd["bn1.running_var"])
    monkeypatch.setenv("AHNET_FAST_RESNET50_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FCN(pretrained=True)
    # a file that is not a ResNet50
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision-format ResNet50"):
        FCN(pretrained=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FCN(pretrained=tmp_path / "nope.pth")


def test_copy_from_matches_monai_plus_running_stats(tmp_path) -> None:
    """AHNet(pretrained=path) == MONAI's AHNet after copy_from(FCN(path)), plus BN running stats."""
    sd = _random_resnet50_file(tmp_path / "r50.pth")
    kw = dict(in_channels=2, psp_block_num=1, upsample_mode="trilinear")
    torch.manual_seed(80)
    ours = AHNet(pretrained=str(tmp_path / "r50.pth"), **kw)
    torch.manual_seed(80)
    ref = monai_ahnet.AHNet(**kw)
    fcn = FCN(pretrained=tmp_path / "r50.pth")
    ref.copy_from(fcn)  # MONAI's own transfer, applied to our FCN

    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    n_stats_differ = 0
    for k in sr:
        if k.endswith(stats):
            if not torch.equal(so[k], sr[k]):
                n_stats_differ += 1
        else:
            assert torch.equal(so[k], sr[k]), f"weights differ from MONAI's copy_from at {k}"
    assert n_stats_differ > 0  # MONAI leaves them at their defaults
    # the stem: (64, 3, 7, 7) -> (64, in_channels, 7, 7, 3), RGB channel c -> z-tap c
    w = sd["conv1.weight"]
    assert torch.equal(so["conv1.weight"][:, 1, :, :, 2], w[:, 2])
    # ours carries every encoder running statistic over (2D key -> 3D key: bn1 -> bn0, and the
    # shortcut's BN moves from downsample.1 to downsample.2 behind the 3D z-pool)
    n_checked = 0
    for k, v in sd.items():
        if k.endswith(stats):
            key = "bn0" + k[3:] if k.startswith("bn1.") else k.replace(".downsample.1.", ".downsample.2.")
            assert torch.equal(so[key], v), key
            n_checked += 1
    assert n_checked == 3 * 53  # 53 BatchNorms in a ResNet50
    # and the copied encoder, with its statistics, computes what the 2D one does (eval mode)
    ours.eval().double()
    fcn.eval().double()
    x2d = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    x3d = torch.zeros(1, 2, 64, 64, 3, dtype=torch.float64)
    x3d[0, 0] = x2d[0].permute(1, 2, 0)  # z-tap c sees RGB channel c (channel 1 stays zero)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.relu(ours.bn0(ours.conv1(x3d)))[..., 1], fcn.relu(fcn.bn0(fcn.conv1(x2d))), rtol=1e-12, atol=1e-12
        )
        t = torch.randn(1, 64, 16, 16, dtype=torch.float64)
        for i in range(1, 5):
            y2 = getattr(fcn, f"layer{i}")(t)
            # two identical slices: the z max-pools then see equal pairs
            y3 = getattr(ours, f"layer{i}")(t[..., None].expand(-1, -1, -1, -1, 2).contiguous())
            torch.testing.assert_close(y3[..., 0], y2, rtol=1e-12, atol=1e-12)
            t = y2


def test_copy_from_rejects_mismatched_nets() -> None:
    small = AHNet(layers=SMALL, psp_block_num=0)
    fcn = FCN(pretrained=False)
    with pytest.raises(ValueError, match="layer1: the 2D net has"):
        small.copy_from(fcn)
    with pytest.raises(ValueError, match="3D AHNet"):
        AHNet(layers=SMALL, spatial_dims=2, psp_block_num=0).copy_from(fcn)
