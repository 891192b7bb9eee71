"""2D FCN and MCFCN (ResNet50 + GCN + refinement blocks), without torchvision.

``FCN`` / ``MCFCN`` mirror ``monai.networks.blocks.fcn``: same constructor arguments,
attribute names and state_dict keys (``conv1``, ``bn0``, ``layer1..4``, ``gcn1..5``,
``refine1..10``, ``transformer``, ``up_conv.deconv``, and for MCFCN ``init_proj.conv`` /
``init_proj.adn.N``), same initialisation order and same forward. They are the 2D
networks whose encoder :meth:`ahnet_fast.models.ahnet.AHNet.copy_from` transfers to 3D.

``ResNet50`` reproduces torchvision's ``resnet50`` (v1.5: stride on the 3x3 conv):
identical state_dict keys, shapes, initialisation and forward, so torchvision-format
weight files load into it and into ``FCN``.

Pretrained weights are never downloaded. ``pretrained`` may be
* ``False`` - random initialisation;
* a path to a torchvision-format ResNet50 state_dict file (``torch.save(model.state_dict())``,
  optionally wrapped as ``{"state_dict": ...}``);
* ``True`` - the file named by the environment variable ``AHNET_FAST_RESNET50_WEIGHTS``, else
  torchvision's cache file ``<torch.hub.get_dir()>/checkpoints/resnet50-0676ba61.pth`` (where
  torchvision keeps the ImageNet weights MONAI would use); if neither exists a
  ``FileNotFoundError`` says how to supply one.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FCN",
    "GCN",
    "MCFCN",
    "RESNET50_IMAGENET_FILENAME",
    "ResNet50",
    "ResNetBottleneck",
    "Refine",
    "load_resnet50_state_dict",
]

#: file name torchvision gives the ImageNet (IMAGENET1K_V1) ResNet50 weights in its cache
RESNET50_IMAGENET_FILENAME = "resnet50-0676ba61.pth"
WEIGHTS_ENV = "AHNET_FAST_RESNET50_WEIGHTS"

PretrainedArg = Union[bool, str, "os.PathLike[str]"]


class ResNetBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (expansion 4, stride on conv2), post-activation."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, stride=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """ResNet50 with torchvision's module names: (B, 3, H, W) -> (B, num_classes) logits."""

    def __init__(self, num_classes: int = 1000, layers: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * ResNetBottleneck.expansion, num_classes)
        # torchvision's init (zero_init_residual=False); the fc keeps its default draw
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out = planes * ResNetBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        mods = [ResNetBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        for _ in range(1, blocks):
            mods.append(ResNetBottleneck(self.inplanes, planes))
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resolve_pretrained(pretrained: PretrainedArg) -> Path | None:
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        env = os.environ.get(WEIGHTS_ENV)
        if env:
            path = Path(env).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{WEIGHTS_ENV}={env!r} does not name a file")
            return path
        cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_IMAGENET_FILENAME
        if cached.is_file():
            return cached
        raise FileNotFoundError(
            "pretrained=True needs ImageNet ResNet50 weights on this machine; nothing is downloaded. Supply a "
            "torchvision-format resnet50 state_dict file: pass its path as pretrained='/path/to/resnet50.pth', "
            f"or set {WEIGHTS_ENV}=/path/to/resnet50.pth, or place it at {cached}. "
            "Use pretrained=False for random initialisation."
        )
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file {str(path)!r} does not exist")
        return path
    raise TypeError(f"pretrained must be False, True or a path to a ResNet50 state_dict file, got {pretrained!r}")


def load_resnet50_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a torchvision-format ResNet50 state_dict (plain, or under "state_dict"/"model")."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors)")
    # checkpoints saved from DataParallel prefix every key with "module."
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


class GCN(nn.Module):
    """Global convolution: (k x 1 then 1 x k) + (1 x k then k x 1), all with bias."""

    def __init__(self, inplanes: int, planes: int, ks: int = 7) -> None:
        super().__init__()
        self.conv_l1 = nn.Conv2d(inplanes, planes, kernel_size=(ks, 1), padding=(ks // 2, 0))
        self.conv_l2 = nn.Conv2d(planes, planes, kernel_size=(1, ks), padding=(0, ks // 2))
        self.conv_r1 = nn.Conv2d(inplanes, planes, kernel_size=(1, ks), padding=(0, ks // 2))
        self.conv_r2 = nn.Conv2d(planes, planes, kernel_size=(ks, 1), padding=(ks // 2, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, inplanes, H, W) -> (B, planes, H, W)."""
        return self.conv_l2(self.conv_l1(x)) + self.conv_r2(self.conv_r1(x))


class Refine(nn.Module):
    """x + conv(BNReLU(conv(BNReLU(x)))): one BatchNorm used twice, as in MONAI."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, planes, H, W) -> same shape."""
        y = self.conv1(self.relu(self.bn(x)))
        y = self.conv2(self.relu(self.bn(y)))
        return x + y


class _UpSampleDeconv(nn.Sequential):
    """MONAI ``UpSample(spatial_dims=2, mode="deconv", scale_factor=2)``: key ``deconv``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.add_module("deconv", nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2, bias=True))


class FCN(nn.Module):
    """2D FCN (3 input channels): ResNet50 encoder, GCN + Refine decoder.

    Args:
        out_channels: output channels.
        upsample_mode: ``"transpose"`` (transposed convs) or ``"bilinear"``/``"bicubic"``
            interpolation (``align_corners=True``).
        pretrained: False, True or a path (see the module docstring). Default True, as MONAI.
        progress: accepted for MONAI compatibility; unused (nothing is downloaded).

    Input ``(B, 3, H, W)``; output ``(B, out_channels, H, W)``. With ``"transpose"`` the skip
    additions need H and W to be multiples of 32 (as in MONAI).
    """

    def __init__(
        self,
        out_channels: int = 1,
        upsample_mode: str = "bilinear",
        pretrained: PretrainedArg = True,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if upsample_mode not in ("transpose", "bilinear", "bicubic"):
            raise ValueError(f"upsample_mode must be 'transpose', 'bilinear' or 'bicubic', got {upsample_mode!r}")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        weights = _resolve_pretrained(pretrained)  # fail before building anything
        self.upsample_mode = upsample_mode
        self.conv2d_type = nn.Conv2d
        self.out_channels = out_channels

        resnet = ResNet50()
        if weights is not None:
            state = load_resnet50_state_dict(weights)
            try:
                resnet.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(f"{str(weights)!r} is not a torchvision-format ResNet50 state_dict: {err}") from err

        self.conv1 = resnet.conv1
        self.bn0 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

        self.gcn1 = GCN(2048, out_channels)
        self.gcn2 = GCN(1024, out_channels)
        self.gcn3 = GCN(512, out_channels)
        self.gcn4 = GCN(64, out_channels)
        self.gcn5 = GCN(64, out_channels)
        for i in range(1, 11):
            self.add_module(f"refine{i}", Refine(out_channels))
        # unused in forward, kept for state_dict compatibility with MONAI
        self.transformer = nn.Conv2d(256, 64, kernel_size=1)
        if upsample_mode == "transpose":
            self.up_conv = _UpSampleDeconv(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"{type(self).__name__} expects (B, {self.conv1.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__} expects a floating-point tensor, got {x.dtype}")
        return self._decode(x)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        org_size = x.shape[2:]
        conv_x = self.relu(self.bn0(self.conv1(x)))
        pool_x = self.maxpool(conv_x)
        fm1 = self.layer1(pool_x)
        fm2 = self.layer2(fm1)
        fm3 = self.layer3(fm2)
        fm4 = self.layer4(fm3)

        gcfm1 = self.refine1(self.gcn1(fm4))
        gcfm2 = self.refine2(self.gcn2(fm3))
        gcfm3 = self.refine3(self.gcn3(fm2))
        gcfm4 = self.refine4(self.gcn4(pool_x))
        gcfm5 = self.refine5(self.gcn5(conv_x))

        if self.upsample_mode == "transpose":
            fs1 = self.refine6(self.up_conv(gcfm1) + gcfm2)
            fs2 = self.refine7(self.up_conv(fs1) + gcfm3)
            fs3 = self.refine8(self.up_conv(fs2) + gcfm4)
            fs4 = self.refine9(self.up_conv(fs3) + gcfm5)
            return self.refine10(self.up_conv(fs4))

        def up(t: torch.Tensor, size: torch.Size) -> torch.Tensor:
            return F.interpolate(t, size, mode=self.upsample_mode, align_corners=True)

        fs1 = self.refine6(up(gcfm1, fm3.shape[2:]) + gcfm2)
        fs2 = self.refine7(up(fs1, fm2.shape[2:]) + gcfm3)
        fs3 = self.refine8(up(fs2, pool_x.shape[2:]) + gcfm4)
        fs4 = self.refine9(up(fs3, conv_x.shape[2:]) + gcfm5)
        return self.refine10(up(fs4, org_size))


class _ConvBNReLU(nn.Sequential):
    """MONAI ``Convolution(spatial_dims=2, kernel_size=1, norm=BATCH, act=relu, bias=False)``:
    keys ``conv.weight`` and ``adn.N.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False))
        adn = nn.Sequential()
        adn.add_module("N", nn.BatchNorm2d(out_channels))
        adn.add_module("A", nn.ReLU(inplace=True))
        self.add_module("adn", adn)


class MCFCN(FCN):
    """FCN for any number of input channels: a 1x1 conv + BN + ReLU projects them to 3.

    Input ``(B, in_channels, H, W)``; output as :class:`FCN`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        upsample_mode: str = "bilinear",
        pretrained: PretrainedArg = True,
        progress: bool = True,
    ) -> None:
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        super().__init__(out_channels=out_channels, upsample_mode=upsample_mode, pretrained=pretrained, progress=progress)
        self.init_proj = _ConvBNReLU(in_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        in_ch = self.init_proj.conv.in_channels
        if x.ndim != 4 or x.shape[1] != in_ch:
            raise ValueError(f"MCFCN expects (B, {in_ch}, H, W), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"MCFCN expects a floating-point tensor, got {x.dtype}")
        return self._decode(self.init_proj(x))
