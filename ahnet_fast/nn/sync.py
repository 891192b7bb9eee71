"""Synchronized BatchNorm modules and the model-level switch ``convert_sync_batchnorm``.

``convert_sync_batchnorm(model, process_group=None)`` swaps every nn.BatchNorm1d/2d/3d of
``model`` for :class:`SyncBatchNorm1d`/``2d``/``3d`` (subclasses of the same torch classes,
sharing the parameters and buffers: same state_dict keys, ``isinstance(m, nn.BatchNorm3d)``
still holds). Then, in training with more than one process in the group:

* BatchNorms the fused ops run (``conv_bn_act_modules`` / ``bn_act_conv_modules``, i.e. every
  BN of the fast AH-Net's 3D path) use :func:`ahnet_fast.ops.sync_conv_bn_act` /
  :func:`~ahnet_fast.ops.sync_bn_act_conv`;
* a synchronized BN module called directly uses :func:`ahnet_fast.ops.sync_batch_norm`
  (works on CPU with gloo too, unlike torch.nn.SyncBatchNorm, which needs GPU tensors).

Modules converted with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` are synchronized by
the fused helpers as well. Without an initialised process group, with one process, or in eval
mode everything behaves exactly like the plain BatchNorm.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ahnet_fast.ops import sync_batch_norm

from .functional import bn_running_args

__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "convert_sync_batchnorm", "is_sync_batchnorm",
           "revert_sync_batchnorm"]

Tensor = torch.Tensor


class _SyncBatchNormMixin:
    """Marks a BatchNorm as synchronized over ``process_group`` (None: the default group)."""

    _ahnet_fast_sync = True
    process_group: Optional[Any] = None

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        bn: Any = self  # mixed into an nn.BatchNorm*d
        bn._check_input_dim(x)
        use_batch, factor, rm, rv = bn_running_args(bn)
        return sync_batch_norm(x, rm, rv, bn.weight, bn.bias, training=use_batch, momentum=factor, eps=bn.eps,
                               process_group=bn.process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronized=True"  # type: ignore[misc]


class SyncBatchNorm1d(_SyncBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d with statistics over every rank's batch (see module docstring)."""


class SyncBatchNorm2d(_SyncBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d with statistics over every rank's batch (see module docstring)."""


class SyncBatchNorm3d(_SyncBatchNormMixin, nn.BatchNorm3d):
    """nn.BatchNorm3d with statistics over every rank's batch (see module docstring)."""


_SYNC_OF = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}
_PLAIN_OF = {v: k for k, v in _SYNC_OF.items()}


def is_sync_batchnorm(bn: nn.Module) -> bool:
    """True for our synchronized BatchNorms and torch.nn.SyncBatchNorm."""
    return isinstance(bn, nn.SyncBatchNorm) or bool(getattr(bn, "_ahnet_fast_sync", False))


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Synchronize every BatchNorm of ``module`` over ``process_group`` (None: the default group).

    Converts exact nn.BatchNorm1d/2d/3d modules in place (same module objects, re-typed: their
    parameters, buffers, mode and hooks are untouched) and returns ``module``. Already
    synchronized modules get the new ``process_group``. Call it before wrapping the model in
    DistributedDataParallel; an optimizer built earlier keeps working (same parameters).
    """
    for m in module.modules():
        if is_sync_batchnorm(m):
            m.process_group = process_group
            continue
        cls = _SYNC_OF.get(type(m))
        if cls is not None:
            # the synchronized classes add no state but ``process_group``: re-typing the module
            # keeps its identity (parameters, buffers, hooks, the optimizer's references)
            m.__class__ = cls
            m.process_group = process_group
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` in place (our synchronized classes back to the plain
    torch ones, e.g. before exporting or deep-copying a model); returns ``module``."""
    for m in module.modules():
        cls = _PLAIN_OF.get(type(m))
        if cls is not None:
            m.__dict__.pop("process_group", None)
            m.__class__ = cls
    return module
