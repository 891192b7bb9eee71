"""The plain-PyTorch reference models (the oracle every fast path is checked against).

``from ahnet_fast.reference import AHNet`` is numerically identical to
``monai.networks.nets.AHNet`` (MONAI 1.6.1) with the same arguments and state_dict;
``FCN`` and ``MCFCN`` mirror ``monai.networks.blocks.fcn`` without torchvision.
"""
from __future__ import annotations

from ahnet_fast.models.ahnet import (
    AHNet,
    BlockSet,
    Bottleneck3x3x1,
    DenseBlock,
    Final,
    PSP,
    Projection,
    Pseudo3DLayer,
    REFERENCE_BLOCKS,
    UpTransition,
)
from ahnet_fast.models.fcn import FCN, GCN, MCFCN, Refine, ResNet50, ResNetBottleneck

__all__ = [
    "AHNet",
    "BlockSet",
    "Bottleneck3x3x1",
    "DenseBlock",
    "FCN",
    "Final",
    "GCN",
    "MCFCN",
    "PSP",
    "Projection",
    "Pseudo3DLayer",
    "REFERENCE_BLOCKS",
    "Refine",
    "ResNet50",
    "ResNetBottleneck",
    "UpTransition",
]
