"""2D -> 3D transfer: inflation invariants and the paper's ResNet50 -> AH-Net transform.

The 2D source is ``ahnet_fast.reference.ResNet50`` (torchvision's module names,
strides and state_dict keys) with one block per layer, the target
``ahnet_fast.reference.AHNet(layers=(1, 1, 1, 1))``; one test uses the full-size
MCFCN -> AHNet pair. (The same tests passed against MONAI's AHNet as the target
while the reference models were being written; its state_dict keys are the same.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahnet_fast.transfer import (
    TransferReport,
    inflate_conv_weight,
    load_state_dict_file,
    stem_2d_to_3d,
    transfer_2d_to_3d,
)


# --------------------------------------------------------------------------- 2D source
def _features2d(net, x):
    """2D ResNet activations [stem, layer1..4] for (B, 3, H, W) input."""
    stem = net.relu(net.bn1(net.conv1(x)))
    f1 = net.layer1(net.maxpool(stem))
    f2 = net.layer2(f1)
    f3 = net.layer3(f2)
    return [stem, f1, f2, f3, net.layer4(f3)]


def _randomise_bn(net: nn.Module) -> None:
    """Non-trivial BN statistics, so a transfer that forgets running stats fails."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)


def _source(layers=(1, 1, 1, 1)):
    """torchvision-format ResNet50 topology (keys conv1, bn1, layerN.i.*, downsample.{0,1}, fc), few blocks."""
    from ahnet_fast.reference import ResNet50

    net = ResNet50(num_classes=10, layers=layers)
    _randomise_bn(net)
    return net.double().eval()


def _ahnet(layers=(1, 1, 1, 1), **kw):
    from ahnet_fast.reference import AHNet

    kw.setdefault("upsample_mode", "trilinear")
    kw.setdefault("psp_block_num", 0)
    return AHNet(layers=layers, **kw)


@pytest.fixture(scope="module")
def ahnet64():
    """One float64 eval-mode AH-Net (layers 1,1,1,1) shared by the tests.

    Building AH-Net costs about a second here (its decoder has ~10M parameters);
    transfer only writes the encoder, and every test transfers before it checks.
    """
    return _ahnet().double().eval()


def _encoder3d(net, x):
    """AH-Net encoder activations [stem, layer1..4] (same order as _features2d)."""
    stem = net.relu(net.bn0(net.pool1(net.conv1(x))))
    f1 = net.layer1(net.maxpool(stem))
    f2 = net.layer2(f1)
    f3 = net.layer3(f2)
    return [stem, f1, f2, f3, net.layer4(f3)]


# --------------------------------------------------------------------------- inflation
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_centre_inflation_equals_2d_conv_on_every_slice(depth):
    w2 = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    w3 = inflate_conv_weight(w2, depth, "centre")
    assert w3.shape == (5, 3, 3, 3, depth)
    # any volume (not only a constant one): the off-centre taps are zero
    x = torch.randn(2, 3, 7, 6, 4, dtype=torch.float64)
    # z padding so that output slice d is centred on input slice d
    xp = F.pad(x, (depth // 2, depth - 1 - depth // 2))
    y3 = F.conv3d(xp, w3, b, padding=(1, 1, 0))
    assert y3.shape[-1] == x.shape[-1]
    for d in range(x.shape[-1]):
        torch.testing.assert_close(y3[..., d], F.conv2d(x[..., d], w2, b, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode,alphas", [("average", None), ("scaled", [0.2, 0.5, 0.3]), ("scaled", [0.1, 0.6, 0.2, 0.1])])
def test_average_and_scaled_inflation_on_volume_constant_along_d(mode, alphas):
    depth = 4 if alphas and len(alphas) == 4 else 3
    w2 = torch.randn(4, 2, 3, 5, dtype=torch.float64)
    w3 = inflate_conv_weight(w2, depth, mode, alphas)
    torch.testing.assert_close(w3.sum(-1), w2, rtol=1e-12, atol=1e-12)
    if mode == "scaled":
        torch.testing.assert_close(w3[..., 1] / w2, torch.full_like(w2, alphas[1]))
    img = torch.randn(1, 2, 6, 9, dtype=torch.float64)
    x = img.unsqueeze(-1).expand(-1, -1, -1, -1, 5).contiguous()
    # replicate padding along z only: the "proper" padding for a volume constant along D
    xp = F.pad(x, (depth // 2, depth - 1 - depth // 2, 0, 0, 0, 0), mode="replicate")
    y3 = F.conv3d(xp, w3, padding=(1, 2, 0))
    ref = F.conv2d(img, w2, padding=(1, 2))
    for d in range(5):
        torch.testing.assert_close(y3[..., d], ref, rtol=1e-12, atol=1e-12)
    # with zero padding only the interior slices keep the identity
    y0 = F.conv3d(x, w3, padding=(1, 2, depth // 2))
    torch.testing.assert_close(y0[..., 2], ref, rtol=1e-12, atol=1e-12)
    assert (y0[..., 0] - ref).abs().max() > 1e-3


def test_inflation_keeps_dtype_and_device():
    w = torch.randn(2, 2, 3, 3, dtype=torch.float16)
    for mode in ("centre", "average"):
        out = inflate_conv_weight(w, 3, mode)
        assert out.dtype == torch.float16 and out.device == w.device


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 2, 3), 3, "centre", None), "2D conv weight"),
        ((torch.randn(2, 2, 3, 3), 0, "centre", None), "depth must be"),
        ((torch.randn(2, 2, 3, 3), 3, "nearest", None), "unknown inflation mode"),
        ((torch.randn(2, 2, 3, 3), 3, "scaled", None), "needs alphas"),
        ((torch.randn(2, 2, 3, 3), 3, "scaled", [0.5, 0.5]), "2 entries but depth is 3"),
        ((torch.randn(2, 2, 3, 3), 3, "scaled", [0.5, 0.6, -0.1]), "> 0"),
        ((torch.randn(2, 2, 3, 3), 3, "scaled", [0.2, 0.2, 0.2]), "sum to 1"),
        ((torch.randn(2, 2, 3, 3), 3, "average", [0.2, 0.3, 0.5]), "only used by mode='scaled'"),
    ],
)
def test_inflation_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        inflate_conv_weight(*args)


def test_stem_transform_maps_rgb_channel_to_z_tap():
    w = torch.randn(64, 3, 7, 7)
    w3 = stem_2d_to_3d(w)
    assert w3.shape == (64, 1, 7, 7, 3)
    for z in range(3):
        assert torch.equal(w3[:, 0, :, :, z], w[:, z])
    w3c = stem_2d_to_3d(w, in_channels=2)
    torch.testing.assert_close(w3c.sum(1, keepdim=True), w3)


# --------------------------------------------------------------------------- transfer
def test_transfer_stem_equals_2d_stem_on_neighbouring_slices(ahnet64):
    """The 3D stem at slice d computes the 2D stem on the RGB stack (x[d-1], x[d], x[d+1])."""
    src = _source()
    net = ahnet64
    transfer_2d_to_3d(src, net)
    x = torch.randn(1, 1, 32, 32, 6, dtype=torch.float64)
    y3 = F.conv3d(x, net.conv1.weight, stride=(2, 2, 1), padding=(3, 3, 1))
    for d in range(1, 5):
        stack = x[:, 0, :, :, d - 1 : d + 2].permute(0, 3, 1, 2)  # (1, 3, H, W): channel z = slice d-1+z
        torch.testing.assert_close(y3[..., d], src.conv1(stack), rtol=1e-12, atol=1e-12)


def test_transfer_encoder_matches_2d_resnet_per_slice_in_eval_mode(ahnet64):
    """Volume constant along D: every AH-Net encoder activation away from the z border is the 2D one.

    Eval mode, so this holds only if the BN running statistics were copied too.
    D=128: each z-pool halves D and the slices next to the (zero-padded) border
    differ, so the checked ranges shrink layer by layer (stem 64 slices ->
    1..62, layer1 32 -> 1..30, layer2 16 -> 1..14, layer3 8 -> 1..6, layer4 4 -> 1..2).
    """
    src = _source()
    net = ahnet64
    report = transfer_2d_to_3d(src, net)
    img = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    vol = img.unsqueeze(-1).expand(-1, -1, -1, -1, 128).contiguous()
    with torch.no_grad():
        f3 = _encoder3d(net, vol)
        f2 = _features2d(src, img.expand(-1, 3, -1, -1).contiguous())
    good = [range(1, 63), range(1, 31), range(1, 15), range(1, 7), range(1, 3)]
    for name, a3, a2, zs in zip(["stem", "layer1", "layer2", "layer3", "layer4"], f3, f2, good):
        assert a3.shape[:4] == a2.shape, name
        for d in zs:
            torch.testing.assert_close(a3[..., d], a2, rtol=1e-9, atol=1e-9, msg=f"{name} slice {d}")
    # running statistics really were transferred (MONAI's copy_from leaves them at 0/1)
    assert torch.equal(net.bn0.running_mean, src.bn1.running_mean)
    assert torch.equal(net.layer2[0].downsample[2].running_var, src.layer2[0].downsample[1].running_var)
    assert int(net.layer3[0].bn2.num_batches_tracked) == 7
    assert report.source_format == "torchvision" and not report.missing
    assert ("fc.weight", "ImageNet classifier head: AH-Net has no counterpart") in report.skipped


def test_report_lists_copied_and_skipped_tensors(ahnet64):
    src = _source(layers=(2, 1, 1, 1))
    net = ahnet64
    report = transfer_2d_to_3d(src, net)
    assert isinstance(report, TransferReport)
    tgt_enc = [k for k in net.state_dict() if k.split(".")[0] in ("conv1", "bn0", "layer1", "layer2", "layer3", "layer4")]
    assert sorted(c[1] for c in report.copied) == sorted(tgt_enc)
    stem = next(c for c in report.copied if c[1] == "conv1.weight")
    assert stem[2:] == ((64, 3, 7, 7), (64, 1, 7, 7, 3))
    skipped = dict(report.skipped)
    assert "fewer blocks" in skipped["layer1.1.conv2.weight"]
    assert "downsample.2.weight" not in " ".join(skipped)  # shortcut BN was used
    text = report.summary()
    assert "copied" in text and "fewer blocks" in text and "(64, 1, 7, 7, 3)" in text


def test_decoder_untouched_and_fcn_format_and_mcfcn_extras(ahnet64):
    src = _source()
    sd = {("bn0." + k[4:] if k.startswith("bn1.") else k): v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    sd["gcn1.conv_l1.weight"] = torch.randn(1, 2048, 7, 1)
    sd["init_proj.conv.weight"] = torch.randn(3, 4, 1, 1)
    net = ahnet64
    dec_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("up0.", "dense0.", "final."))}
    report = transfer_2d_to_3d(sd, net)
    assert report.source_format == "fcn"
    skipped = dict(report.skipped)
    assert "decoder" in skipped["gcn1.conv_l1.weight"] and "projection" in skipped["init_proj.conv.weight"]
    torch.testing.assert_close(net.bn0.weight, src.bn1.weight)
    for k, v in net.state_dict().items():
        if k in dec_before:
            assert torch.equal(v, dec_before[k]), k


def test_state_dict_file_round_trip(tmp_path, ahnet64):
    src = _source()
    keys = ("conv1.weight", "bn0.running_var", "layer4.0.downsample.2.running_mean", "layer1.0.conv2.weight")

    def snapshot():
        return {k: ahnet64.state_dict()[k].clone() for k in keys}

    transfer_2d_to_3d(src, ahnet64)
    from_module = snapshot()
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    assert load_state_dict_file(path).keys() == src.state_dict().keys()
    def clobber():
        with torch.no_grad():
            for k in keys:
                ahnet64.state_dict()[k].uniform_()

    clobber()
    rep = transfer_2d_to_3d(str(path), ahnet64)
    assert rep.source == str(path)
    from_file = snapshot()
    # checkpoint wrapper + DataParallel prefix
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, wrapped)
    clobber()
    transfer_2d_to_3d(wrapped, ahnet64)
    from_wrapped = snapshot()
    for k in keys:
        assert torch.equal(from_module[k], from_file[k]) and torch.equal(from_module[k], from_wrapped[k]), k


def test_bad_inputs_name_key_and_shapes(tmp_path, ahnet64):
    src = _source()
    sd = dict(src.state_dict())
    sd["layer1.0.conv2.weight"] = torch.randn(64, 64, 5, 5)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight.*\(64, 64, 5, 5\).*\(64, 64, 3, 3, 1\)"):
        transfer_2d_to_3d(sd, ahnet64)
    sd = dict(src.state_dict())
    sd["conv1.weight"] = torch.randn(64, 4, 7, 7)
    with pytest.raises(ValueError, match=r"conv1\.weight.*\(64, 4, 7, 7\).*\(64, 1, 7, 7, 3\)"):
        transfer_2d_to_3d(sd, ahnet64)
    sd = dict(src.state_dict())
    sd["bn0.weight"] = sd.pop("bn1.weight")  # neither clean torchvision nor FCN: bn0.bias etc. missing
    with pytest.raises(ValueError, match="lacks"):
        transfer_2d_to_3d(sd, ahnet64)
    with pytest.raises(ValueError, match="conv1.weight"):
        transfer_2d_to_3d({"foo": torch.zeros(1)}, ahnet64)
    with pytest.raises(TypeError, match="nn.Module, a state dict or a path"):
        transfer_2d_to_3d(42, ahnet64)
    with pytest.raises(FileNotFoundError):
        transfer_2d_to_3d(tmp_path / "nope.pth", ahnet64)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_state_dict_file(junk)
    with pytest.raises(ValueError, match="does not look like AH-Net"):
        transfer_2d_to_3d(src, nn.Linear(2, 2))


def test_strict_missing_blocks_raise_and_nothing_is_written():
    src = _source(layers=(1, 1, 1, 1))
    net = _ahnet(layers=(2, 1, 1, 1))
    before = net.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer1\.1\."):
        transfer_2d_to_3d(src, net)
    assert torch.equal(net.conv1.weight, before)
    report = transfer_2d_to_3d(src, net, strict=False)
    assert report.missing and all(k.startswith("layer1.1.") for k in report.missing)
    assert not torch.equal(net.conv1.weight, before)


def test_full_size_mcfcn_into_default_ahnet():
    from ahnet_fast.reference import AHNet, MCFCN

    src = MCFCN(in_channels=4, pretrained=False)
    _randomise_bn(src)
    net = AHNet()  # default configuration: layers (3, 4, 6, 3), 38M parameters
    report = transfer_2d_to_3d(src, net)
    assert report.source_format == "fcn" and not report.missing
    assert len(report.copied) == len([k for k in net.state_dict() if k.startswith(("conv1.", "bn0.", "layer"))])
    skipped = dict(report.skipped)
    assert all(k.startswith(("init_proj.", "gcn", "refine", "transformer", "up_conv")) for k in skipped), skipped
    assert "projection" in skipped["init_proj.conv.weight"]
    sd2, sd3 = src.state_dict(), net.state_dict()
    assert torch.equal(sd3["conv1.weight"], sd2["conv1.weight"].permute(0, 2, 3, 1).unsqueeze(1))
    assert torch.equal(sd3["layer3.5.bn3.running_var"], sd2["layer3.5.bn3.running_var"])
    assert torch.equal(sd3["layer4.0.downsample.2.running_mean"], sd2["layer4.0.downsample.1.running_mean"])
