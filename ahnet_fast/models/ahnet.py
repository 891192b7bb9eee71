"""AH-Net in plain PyTorch: the reference topology, numerically identical to MONAI 1.6.1.

``AHNet`` takes the constructor arguments of ``monai.networks.nets.AHNet``, has the same
state_dict keys and shapes, draws the same initial weights for the same
``torch.manual_seed`` (modules are built and initialised in MONAI's order), and computes
the same outputs, quirks included: trilinear/bilinear upsampling with
``align_corners=True``, the PSP branch's 1x1x1 conv with padding (1, 1, 0) and a bias, PSP
outputs concatenated in pooling order 8, 16, 32, 64 ahead of the dense features.

One topology, two block sets
----------------------------
The network is assembled from the block classes named by the class attribute
``AHNet.blocks`` (a :class:`BlockSet`). This module's classes form
``REFERENCE_BLOCKS`` (torch ops only, the oracle). A fused model is made by
subclassing each block class and overriding only ``forward`` (the parameters, buffers
and state_dict keys stay those built here), collecting them in another ``BlockSet``, and
subclassing ``AHNet``::

    class FastAHNet(AHNet):
        blocks = FAST_BLOCKS          # BlockSet of forward-only subclasses

        def _stem(self, x): ...       # conv1 -> z-pool -> bn0 -> relu -> maxpool, fused

``AHNet.forward`` is split into overridable steps: ``_stem`` (returns the stem output
and the max-pooled map, both reused as skips), ``_encode`` (layer1..4), ``_decode``
(up/dense blocks with their skip additions) and ``_head`` (PSP + final). Within each
step the blocks are called through their own ``forward``.

Layout: input ``(B, in_channels, H, W, D)`` for ``spatial_dims=3`` (D is the slice
axis), ``(B, in_channels, H, W)`` for 2D; output ``(B, out_channels, *same spatial)``.
See :mod:`ahnet_fast.models.validation` for the accepted sizes.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ahnet_fast.models.validation import InputSpec, check_input

__all__ = [
    "AHNet",
    "AHnet",
    "Ahnet",
    "BlockSet",
    "Bottleneck3x3x1",
    "DenseBlock",
    "Final",
    "PSP",
    "Projection",
    "Pseudo3DLayer",
    "REFERENCE_BLOCKS",
    "UpTransition",
]


def _conv(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _conv_t(spatial_dims: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d


def _norm(spatial_dims: int) -> type[nn.BatchNorm2d] | type[nn.BatchNorm3d]:
    return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d


def _pool(spatial_dims: int) -> type[nn.MaxPool2d] | type[nn.MaxPool3d]:
    return nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d


def _upsample(upsample_mode: str) -> nn.Upsample:
    # MONAI: align_corners=True for the linear modes, None (the default) otherwise
    align = True if upsample_mode in ("trilinear", "bilinear") else None
    return nn.Upsample(scale_factor=2, mode=upsample_mode, align_corners=align)


class Bottleneck3x3x1(nn.Module):
    """Post-activation ResNet bottleneck with a 3x3x1 middle conv (encoder block).

    conv1x1x1 -> BN -> ReLU -> conv3x3x1(stride) -> BN -> ReLU -> conv1x1x1 -> BN
    [-> z max-pool (1,1,2) when the shortcut was pooled] + shortcut -> ReLU.
    In 2D the kernels are the last two entries of the 3D ones (3x1, etc.).
    """

    expansion = 4

    def __init__(
        self,
        spatial_dims: int,
        inplanes: int,
        planes: int,
        stride: Sequence[int] | int = 1,
        downsample: nn.Sequential | None = None,
    ) -> None:
        super().__init__()
        conv, norm, pool = _conv(spatial_dims), _norm(spatial_dims), _pool(spatial_dims)
        self.conv1 = conv(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(
            planes,
            planes,
            kernel_size=(3, 3, 1)[-spatial_dims:],
            stride=stride,
            padding=(1, 1, 0)[-spatial_dims:],
            bias=False,
        )
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.pool = pool(kernel_size=(1, 1, 2)[-spatial_dims:], stride=(1, 1, 2)[-spatial_dims:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
            if out.size() != residual.size():
                out = self.pool(out)
        out += residual
        return self.relu(out)


class Projection(nn.Sequential):
    """Pre-activation 1x1x1 projection: BN -> ReLU -> conv (no bias)."""

    def __init__(self, spatial_dims: int, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.add_module("norm", _norm(spatial_dims)(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module(
            "conv", _conv(spatial_dims)(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        )


class Pseudo3DLayer(nn.Module):
    """Dense decoder layer (pre-activation throughout).

    a = conv3x3x1(BNReLU(conv1x1x1(BNReLU(x))))   [in -> bn_size*growth -> growth]
    b = conv1x1x3(BNReLU(a))                       [growth -> growth]
    out = cat(x, conv1x1x1(BNReLU(a + b)))         [in + growth channels]

    ``dropout_prob`` is stored but never applied: MONAI forces it to 0 in forward.
    """

    def __init__(
        self, spatial_dims: int, num_input_features: int, growth_rate: int, bn_size: int, dropout_prob: float
    ) -> None:
        super().__init__()
        conv, norm = _conv(spatial_dims), _norm(spatial_dims)
        self.bn1 = norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.bn2 = norm(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv(
            bn_size * growth_rate,
            growth_rate,
            kernel_size=(3, 3, 1)[-spatial_dims:],
            stride=1,
            padding=(1, 1, 0)[-spatial_dims:],
            bias=False,
        )
        self.bn3 = norm(growth_rate)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = conv(
            growth_rate,
            growth_rate,
            kernel_size=(1, 1, 3)[-spatial_dims:],
            stride=1,
            padding=(0, 0, 1)[-spatial_dims:],
            bias=False,
        )
        self.bn4 = norm(growth_rate)
        self.relu4 = nn.ReLU(inplace=True)
        self.conv4 = conv(growth_rate, growth_rate, kernel_size=1, stride=1, bias=False)
        self.dropout_prob = dropout_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        b = self.conv3(self.relu3(self.bn3(a)))
        new_features = self.conv4(self.relu4(self.bn4(a + b)))
        return torch.cat([x, new_features], 1)


class DenseBlock(nn.Sequential):
    """``num_layers`` Pseudo3DLayers (``denselayer1..N``), each adding ``growth_rate`` channels.

    ``layer_type`` is the Pseudo3DLayer class to build (AHNet passes ``blocks.pseudo3d_layer``).
    """

    def __init__(
        self,
        spatial_dims: int,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        dropout_prob: float,
        layer_type: type[Pseudo3DLayer] = Pseudo3DLayer,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = layer_type(spatial_dims, num_input_features + i * growth_rate, growth_rate, bn_size, dropout_prob)
            self.add_module(f"denselayer{i + 1}", layer)


class UpTransition(nn.Sequential):
    """BN -> ReLU -> conv1x1x1 -> x2 upsampling (transposed conv 2x2x2, or interpolation)."""

    def __init__(
        self, spatial_dims: int, num_input_features: int, num_output_features: int, upsample_mode: str = "transpose"
    ) -> None:
        super().__init__()
        self.add_module("norm", _norm(spatial_dims)(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module(
            "conv", _conv(spatial_dims)(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        )
        if upsample_mode == "transpose":
            self.add_module(
                "up",
                _conv_t(spatial_dims)(num_output_features, num_output_features, kernel_size=2, stride=2, bias=False),
            )
        else:
            self.add_module("up", _upsample(upsample_mode))


class Final(nn.Sequential):
    """BN -> ReLU -> conv3x3x1 (to out_channels) -> x2 upsampling."""

    def __init__(
        self, spatial_dims: int, num_input_features: int, num_output_features: int, upsample_mode: str = "transpose"
    ) -> None:
        super().__init__()
        self.add_module("norm", _norm(spatial_dims)(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module(
            "conv",
            _conv(spatial_dims)(
                num_input_features,
                num_output_features,
                kernel_size=(3, 3, 1)[-spatial_dims:],
                stride=1,
                padding=(1, 1, 0)[-spatial_dims:],
                bias=False,
            ),
        )
        if upsample_mode == "transpose":
            self.add_module(
                "up",
                _conv_t(spatial_dims)(num_output_features, num_output_features, kernel_size=2, stride=2, bias=False),
            )
        else:
            self.add_module("up", _upsample(upsample_mode))


class PSP(nn.Module):
    """Pyramid pooling: for k = 8, 16, 32, 64 (first ``psp_block_num``): in-plane max-pool k
    -> 1x1x1 conv to one channel (padding (1,1,0), bias) -> back to the input size; the
    ``psp_block_num`` one-channel maps are concatenated in that order.
    """

    def __init__(self, spatial_dims: int, psp_block_num: int, in_ch: int, upsample_mode: str = "transpose") -> None:
        super().__init__()
        # registration order (up, pool, project) fixes the weight-init order: keep it
        self.up_modules = nn.ModuleList()
        conv, pool = _conv(spatial_dims), _pool(spatial_dims)
        self.pool_modules = nn.ModuleList()
        self.project_modules = nn.ModuleList()
        for i in range(psp_block_num):
            size = (2 ** (i + 3), 2 ** (i + 3), 1)[-spatial_dims:]
            self.pool_modules.append(pool(kernel_size=size, stride=size))
            self.project_modules.append(
                conv(in_ch, 1, kernel_size=(1, 1, 1)[-spatial_dims:], stride=1, padding=(1, 1, 0)[-spatial_dims:])
            )
        self.spatial_dims = spatial_dims
        self.psp_block_num = psp_block_num
        self.upsample_mode = upsample_mode
        if upsample_mode == "transpose":
            for i in range(psp_block_num):
                size = (2 ** (i + 3), 2 ** (i + 3), 1)[-spatial_dims:]
                pad = (2 ** (i + 3), 2 ** (i + 3), 0)[-spatial_dims:]
                self.up_modules.append(_conv_t(spatial_dims)(1, 1, kernel_size=size, stride=size, padding=pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.maps(x), dim=1)

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ``psp_block_num`` one-channel maps (N, 1, *spatial), in concatenation order."""
        outputs = []
        if self.upsample_mode == "transpose":
            for project, pool, up in zip(self.project_modules, self.pool_modules, self.up_modules):
                outputs.append(up(self._project(project, pool(x))))
        else:
            align = True if self.upsample_mode in ("trilinear", "bilinear") else None
            for project, pool in zip(self.project_modules, self.pool_modules):
                outputs.append(
                    F.interpolate(self._project(project, pool(x)), size=x.shape[2:], mode=self.upsample_mode,
                                  align_corners=align)
                )
        return outputs

    def _project(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One pyramid level's 1x1x1 projection to one channel (a hook for the fast model)."""
        return conv(x)


@dataclass(frozen=True)
class BlockSet:
    """The block classes an :class:`AHNet` is assembled from (see the module docstring)."""

    bottleneck: type[Bottleneck3x3x1]
    projection: type[Projection]
    pseudo3d_layer: type[Pseudo3DLayer]
    dense_block: type[DenseBlock]
    up_transition: type[UpTransition]
    final: type[Final]
    psp: type[PSP]


REFERENCE_BLOCKS = BlockSet(
    bottleneck=Bottleneck3x3x1,
    projection=Projection,
    pseudo3d_layer=Pseudo3DLayer,
    dense_block=DenseBlock,
    up_transition=UpTransition,
    final=Final,
    psp=PSP,
)

PretrainedArg = Union[bool, str, "os.PathLike[str]"]


class AHNet(nn.Module):
    """AH-Net (Liu et al., arXiv 1711.08580), a drop-in for ``monai.networks.nets.AHNet``.

    Args:
        layers: residual blocks in layer1..layer4. Defaults to ``(3, 4, 6, 3)`` (ResNet50).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        psp_block_num: pyramid pooling branches, 0..4.
        upsample_mode: ``"transpose"`` (transposed convs), ``"nearest"``, and ``"trilinear"``
            (3D) or ``"bilinear"`` (2D), the latter two with ``align_corners=True``.
        pretrained: False; True to copy an ImageNet ResNet50 encoder (see :class:`FCN`
            for where the weights file is looked up - nothing is downloaded); or a path to a
            torchvision-format ResNet50 state_dict file. 3D only.
        progress: accepted for MONAI compatibility; unused (nothing is downloaded).

    Input ``(B, in_channels, H, W, D)`` (3D) / ``(B, in_channels, H, W)`` (2D), floating
    point; D (the last axis) a multiple of 32; H, W multiples of ``2**max(5, psp+3)`` with
    ``"transpose"``, else multiples of 32 and at least ``2**(psp+3)``. Output
    ``(B, out_channels, *spatial)``. Invalid input raises ``ValueError`` (see
    :func:`ahnet_fast.models.validation.check_input`); :func:`ahnet_fast.models.padding.run_padded`
    pads any size.
    """

    blocks: ClassVar[BlockSet] = REFERENCE_BLOCKS

    def __init__(
        self,
        layers: tuple = (3, 4, 6, 3),
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        psp_block_num: int = 4,
        upsample_mode: str = "transpose",
        pretrained: PretrainedArg = False,
        progress: bool = True,
    ) -> None:
        super().__init__()
        # validates spatial_dims, psp_block_num, in_channels and upsample_mode
        self.input_spec = InputSpec(spatial_dims, in_channels, psp_block_num, upsample_mode)
        layers = tuple(layers)
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive integers (blocks in layer1..4), got {layers!r}")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.layers = layers
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.psp_block_num = psp_block_num
        self.upsample_mode = upsample_mode
        self.inplanes = 64
        blocks = self.blocks
        conv, conv_t, norm, pool = _conv(spatial_dims), _conv_t(spatial_dims), _norm(spatial_dims), _pool(spatial_dims)
        self._conv_type, self._norm_type, self._pool_type = conv, norm, pool

        # module creation order = MONAI's: it fixes the random draws of the default inits
        self.conv1 = conv(
            in_channels,
            64,
            kernel_size=(7, 7, 3)[-spatial_dims:],
            stride=(2, 2, 1)[-spatial_dims:],
            padding=(3, 3, 1)[-spatial_dims:],
            bias=False,
        )
        self.pool1 = pool(kernel_size=(1, 1, 2)[-spatial_dims:], stride=(1, 1, 2)[-spatial_dims:])
        self.bn0 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        if upsample_mode in ("transpose", "nearest"):
            # kernel == stride keeps the backward deterministic (MONAI PR 815)
            self.maxpool = pool(kernel_size=(2, 2, 2)[-spatial_dims:], stride=2)
        else:
            self.maxpool = pool(kernel_size=(3, 3, 3)[-spatial_dims:], stride=2, padding=1)

        self.layer1 = self._make_layer(blocks.bottleneck, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(blocks.bottleneck, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(blocks.bottleneck, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(blocks.bottleneck, 512, layers[3], stride=2)

        growth, bn_size, n_dense = 20, 4, 3
        n_init, n_res1, n_res2, n_res3, n_res4 = 64, 256, 512, 1024, 2048

        def dense(n_in: int) -> DenseBlock:
            return blocks.dense_block(spatial_dims, n_dense, n_in, bn_size, growth, 0.0, blocks.pseudo3d_layer)

        self.up0 = blocks.up_transition(spatial_dims, n_res4, n_res3, upsample_mode)
        self.dense0 = dense(n_res3)
        self.up1 = blocks.up_transition(spatial_dims, n_res3 + n_dense * growth, n_res2, upsample_mode)
        self.dense1 = dense(n_res2)
        self.up2 = blocks.up_transition(spatial_dims, n_res2 + n_dense * growth, n_res1, upsample_mode)
        self.dense2 = dense(n_res1)
        self.trans1 = blocks.projection(spatial_dims, n_res1 + n_dense * growth, n_init)
        self.dense3 = dense(n_init)
        self.up3 = blocks.up_transition(spatial_dims, n_init + n_dense * growth, n_init, upsample_mode)
        self.dense4 = dense(n_init)
        n_out4 = n_init + n_dense * growth
        self.psp = blocks.psp(spatial_dims, psp_block_num, n_out4, upsample_mode)
        self.final = blocks.final(spatial_dims, psp_block_num + n_out4, out_channels, upsample_mode)

        # MONAI's init: N(0, sqrt(2 / (k0 * k1 * out))) for every (transposed) conv weight, in
        # modules() order; conv biases keep their default draw; BN weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, (conv, conv_t)):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, norm):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

        if pretrained:  # True or a path (MONAI tests truthiness too)
            from ahnet_fast.models.fcn import FCN

            self.copy_from(FCN(pretrained=pretrained, progress=progress))

    def _make_layer(self, block: type[Bottleneck3x3x1], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        sd = self.spatial_dims
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # built before the first block, as in MONAI (init order)
            downsample = nn.Sequential(
                self._conv_type(
                    self.inplanes, planes * block.expansion, kernel_size=1, stride=(stride, stride, 1)[:sd], bias=False
                ),
                # (1, 1, stride)[:2] is a no-op pool in 2D: MONAI strides both 2D axes instead
                self._pool_type(kernel_size=(1, 1, stride)[:sd], stride=(1, 1, stride)[:sd]),
                self._norm_type(planes * block.expansion),
            )
        mods = [block(sd, self.inplanes, planes, (stride, stride, 1)[:sd], downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            mods.append(block(sd, self.inplanes, planes))
        return nn.Sequential(*mods)

    # ---- forward, in overridable steps -------------------------------------------------
    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """conv 7x7x3 /(2,2,1) -> z-pool -> BN -> ReLU (= conv_x), then max-pool (= pool_x)."""
        conv_x = self.relu(self.bn0(self.pool1(self.conv1(x))))
        return conv_x, self.maxpool(conv_x)

    def _encode(self, pool_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fm1 = self.layer1(pool_x)
        fm2 = self.layer2(fm1)
        fm3 = self.layer3(fm2)
        fm4 = self.layer4(fm3)
        return fm1, fm2, fm3, fm4

    def _decode(
        self,
        conv_x: torch.Tensor,
        pool_x: torch.Tensor,
        fms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        fm1, fm2, fm3, fm4 = fms
        d0 = self.dense0(self.up0(fm4) + fm3)
        d1 = self.dense1(self.up1(d0) + fm2)
        d2 = self.dense2(self.up2(d1) + fm1)
        d3 = self.dense3(self.trans1(d2) + pool_x)
        return self.dense4(self.up3(d3) + conv_x)

    def _head(self, d4: torch.Tensor) -> torch.Tensor:
        if self.psp_block_num > 0:
            d4 = torch.cat((self.psp(d4), d4), dim=1)
        return self.final(d4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``; see the class docstring."""
        check_input(self.input_spec, x, training=self.training)
        conv_x, pool_x = self._stem(x)
        fms = self._encode(pool_x)
        return self._head(self._decode(conv_x, pool_x, fms))

    # ---- 2D -> 3D transfer -------------------------------------------------------------
    @torch.no_grad()
    def copy_from(self, net: nn.Module) -> None:
        """Copy a 2D FCN/MCFCN encoder (ResNet50 layout) into this 3D network.

        As MONAI: the stem weight (64, 3, 7, 7) becomes (64, in_channels, 7, 7, 3) (RGB
        channel c -> z-tap c, repeated over input channels); every Conv2d of layer1..4 becomes
        a k x k x 1 conv; BatchNorm weight and bias are copied. Unlike MONAI, BatchNorm
        running_mean, running_var and num_batches_tracked are copied as well.
        ``net`` needs ``conv1``, ``bn0`` and ``layer1..4`` with the same number of blocks.
        """
        if self.spatial_dims != 3:
            raise ValueError("copy_from needs a 3D AHNet (spatial_dims=3), as in MONAI")
        w2d = net.conv1.weight
        if w2d.ndim != 4 or w2d.shape[0] != 64 or w2d.shape[2:] != (7, 7) or w2d.shape[1] != 3:
            raise ValueError(f"net.conv1.weight must be (64, 3, 7, 7), got {tuple(w2d.shape)}")
        w3d = w2d.unsqueeze(4).permute(0, 4, 2, 3, 1).repeat(1, self.in_channels, 1, 1, 1)
        self.conv1.weight.copy_(w3d)
        _copy_bn(net.bn0, self.bn0)
        for i in range(1, 5):
            name = f"layer{i}"
            src = [m for m in getattr(net, name).modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
            dst = [m for m in getattr(self, name).modules() if isinstance(m, (nn.Conv3d, nn.BatchNorm3d))]
            if len(src) != len(dst):
                raise ValueError(
                    f"{name}: the 2D net has {len(src)} conv/BN modules, this AHNet {len(dst)} "
                    f"(layers={self.layers}; the 2D net must have the same number of blocks)"
                )
            for m2, m3 in zip(src, dst):
                if isinstance(m2, nn.Conv2d) and isinstance(m3, nn.Conv3d):
                    if m3.weight.shape != m2.weight.shape + (1,):
                        raise ValueError(
                            f"{name}: cannot copy conv weight {tuple(m2.weight.shape)} into {tuple(m3.weight.shape)}"
                        )
                    m3.weight.copy_(m2.weight.unsqueeze(4))
                elif isinstance(m2, nn.BatchNorm2d) and isinstance(m3, nn.BatchNorm3d):
                    _copy_bn(m2, m3)
                else:
                    raise ValueError(f"{name}: module order differs ({type(m2).__name__} vs {type(m3).__name__})")


def _copy_bn(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        s, d = getattr(src, attr, None), getattr(dst, attr, None)
        if s is None or d is None:
            continue
        if s.shape != d.shape:
            raise ValueError(f"cannot copy BatchNorm {attr} {tuple(s.shape)} into {tuple(d.shape)}")
        d.copy_(s)


# MONAI's aliases
AHnet = Ahnet = AHNet
