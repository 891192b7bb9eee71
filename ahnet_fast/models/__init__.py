"""Models: AH-Net (one topology, reference and fused block sets), FCN, MCFCN.

Plain-PyTorch reference models live in :mod:`ahnet_fast.models.ahnet` and
:mod:`ahnet_fast.models.fcn`; input rules in :mod:`ahnet_fast.models.validation`;
pad/crop helpers in :mod:`ahnet_fast.models.padding`.
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
from ahnet_fast.models.fcn import FCN, GCN, MCFCN, Refine, ResNet50
from ahnet_fast.models.padding import PadInfo, crop_to_original, pad_to_valid, run_padded
from ahnet_fast.models.validation import InputSpec, check_input, valid_spatial_shape

__all__ = [
    "AHNet",
    "BlockSet",
    "Bottleneck3x3x1",
    "DenseBlock",
    "FCN",
    "Final",
    "GCN",
    "InputSpec",
    "MCFCN",
    "PSP",
    "PadInfo",
    "Projection",
    "Pseudo3DLayer",
    "REFERENCE_BLOCKS",
    "Refine",
    "ResNet50",
    "UpTransition",
    "check_input",
    "crop_to_original",
    "pad_to_valid",
    "run_padded",
    "valid_spatial_shape",
]
