"""Modules over the fused ops whose state_dict keys are those of the modules they replace.

``ConvBNAct3d`` has ``conv`` (nn.Conv3d) and ``bn`` (nn.BatchNorm3d): keys conv.weight,
[conv.bias], bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked.
``BNActConv3d`` has ``bn`` and ``conv``. Train/eval, momentum=None and track_running_stats
behave exactly as with the plain modules (the BN submodule's own flags are used).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ahnet_fast.ops import zmaxpool
from ahnet_fast.ops._util import ZPOOL_MODES

from .functional import bn_act_conv_modules, conv_args, conv_bn_act_modules

__all__ = ["BNActConv3d", "ConvBNAct3d", "ZMaxPool3d"]

Tensor = torch.Tensor
IntOr3 = Union[int, Sequence[int]]


def _check_pair(conv: nn.Module, bn: nn.Module, bn_channels: int, what: str) -> None:
    conv_args(conv)  # raises for unsupported convs / wrong type
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be an nn.BatchNorm3d, got {type(bn).__name__}")
    if bn.num_features != bn_channels:
        raise ValueError(f"bn has {bn.num_features} features but the conv's {what} is {bn_channels}")


def _check_zpool(zpool: str) -> str:
    if zpool not in ZPOOL_MODES:
        raise ValueError(f"zpool={zpool!r}; accepted: {', '.join(ZPOOL_MODES)}")
    return zpool


class ConvBNAct3d(nn.Module):
    """Post-activation block: Conv3d -> [z-pool] -> BatchNorm3d -> [z-pool] -> [+ residual] -> [ReLU].

    Input (N, Cin, H, W, D) -> output (N, Cout, Ho, Wo, Do), Do halved by a z-pool. ``zpool``
    ("none" | "before_bn" | "after_bn") and ``relu`` set at construction are defaults that
    ``forward`` may override; ``residual`` (output-shaped) is added before the ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3, stride: IntOr3 = 1,
                 padding: IntOr3 = 0, bias: bool = False, *, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, zpool: str = "none", relu: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                              device=device, dtype=dtype)
        self.bn = nn.BatchNorm3d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.zpool = _check_zpool(zpool)
        self.relu = bool(relu)

    @classmethod
    def from_modules(cls, conv: nn.Conv3d, bn: nn.BatchNorm3d, *, zpool: str = "none",
                     relu: bool = True) -> "ConvBNAct3d":
        """Wrap an existing (Conv3d, BatchNorm3d) pair; parameters and buffers are shared, not copied."""
        _check_pair(conv, bn, conv.out_channels, "out_channels")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn = conv, bn
        self.zpool, self.relu = _check_zpool(zpool), bool(relu)
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, *, zpool: Optional[str] = None,
                relu: Optional[bool] = None) -> Tensor:
        return conv_bn_act_modules(x, self.conv, self.bn, zpool=self.zpool if zpool is None else zpool,
                                   residual=residual, relu=self.relu if relu is None else relu)

    def extra_repr(self) -> str:
        return f"zpool={self.zpool!r}, relu={self.relu}"


class BNActConv3d(nn.Module):
    """Pre-activation block: BatchNorm3d -> [ReLU] -> Conv3d, zero padding after BN+ReLU.

    Input (N, Cin, H, W, D) -> (N, Cout, Ho, Wo, Do). ``forward(x, out=buf, out_channel_offset=k)``
    writes into ``buf[:, k:k+Cout]`` and returns that view (no autograd; for dense blocks).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3, stride: IntOr3 = 1,
                 padding: IntOr3 = 0, bias: bool = False, *, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, relu: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm3d(in_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                              device=device, dtype=dtype)
        self.relu = bool(relu)

    @classmethod
    def from_modules(cls, conv: nn.Conv3d, bn: nn.BatchNorm3d, *, relu: bool = True) -> "BNActConv3d":
        """Wrap an existing pair (bn normalises the conv's INPUT); tensors are shared, not copied."""
        _check_pair(conv, bn, conv.in_channels, "in_channels")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn, self.conv = bn, conv
        self.relu = bool(relu)
        return self

    def forward(self, x: Tensor, *, out: Optional[Tensor] = None, out_channel_offset: int = 0) -> Tensor:
        return bn_act_conv_modules(x, self.bn, self.conv, relu=self.relu, out=out,
                                   out_channel_offset=out_channel_offset)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class ZMaxPool3d(nn.Module):
    """nn.MaxPool3d((1,1,2), (1,1,2)) without an index tensor: (N, C, H, W, D) -> (N, C, H, W, D//2)."""

    def forward(self, x: Tensor) -> Tensor:
        return zmaxpool(x)

    @classmethod
    def from_modules(cls, pool: nn.MaxPool3d) -> "ZMaxPool3d":
        """Replace an nn.MaxPool3d that is exactly a (1,1,2)/(1,1,2) z-pool (raises otherwise)."""
        if not isinstance(pool, nn.MaxPool3d):
            raise TypeError(f"expected nn.MaxPool3d, got {type(pool).__name__}")

        def t3(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)

        stride = pool.stride if pool.stride is not None else pool.kernel_size
        if (t3(pool.kernel_size) != (1, 1, 2) or t3(stride) != (1, 1, 2) or t3(pool.padding) != (0, 0, 0)
                or t3(pool.dilation) != (1, 1, 1) or pool.ceil_mode or pool.return_indices):
            raise ValueError(f"only MaxPool3d(kernel_size=(1,1,2), stride=(1,1,2), padding=0, dilation=1, "
                             f"ceil_mode=False, return_indices=False) is a z-pool; got {pool}")
        return cls()
