"""Modules and module-level helpers over the fused ops (state_dict keys of Conv3d/BatchNorm3d pairs)."""
from __future__ import annotations

from .functional import bn_act_conv_modules, conv_bn_act_modules
from .modules import BNActConv3d, ConvBNAct3d, ZMaxPool3d
from .sync import (SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, convert_sync_batchnorm,
                   is_sync_batchnorm, revert_sync_batchnorm)

__all__ = ["BNActConv3d", "ConvBNAct3d", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "ZMaxPool3d",
           "bn_act_conv_modules", "conv_bn_act_modules", "convert_sync_batchnorm", "is_sync_batchnorm",
           "revert_sync_batchnorm"]
