"""Run the fused ops with the parameters of existing nn.Conv3d / nn.BatchNorm3d modules.

The fast AH-Net keeps MONAI's block structure (e.g. ``block.conv1`` and ``block.bn1``) and calls
these helpers with the submodules it already holds, so state_dicts stay MONAI's. The helpers do
the BatchNorm bookkeeping exactly like nn.BatchNorm3d.forward: num_batches_tracked is
incremented in training, momentum=None becomes the cumulative factor 1/num_batches_tracked,
track_running_stats=False normalises with batch statistics in eval too, and buffers are
updated in place.

2D networks (spatial_dims=2, nn.Conv2d / nn.BatchNorm2d): pass 4-D (N, C, H, W) input; it is
viewed as (N, C, H, W, 1) with the 2D kernel as (kh, kw, 1), and the result is viewed back to
4-D. A z-pool is not possible then (D = 1).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import nn

from ahnet_fast.ops import (_backend, _running, activated_conv, bn_act_conv, conv_bn_act, sync_bn_act_conv,
                            sync_conv_bn_act)
from ahnet_fast.ops._fused import _eval_affine
from ahnet_fast.ops._util import stat_dtype
from ahnet_fast.ops.bn_act_conv import NextBN, bn_act_conv_chain

__all__ = ["activated_conv_modules", "bn_act_conv_fold_modules", "bn_act_conv_modules", "bn_running_args",
           "bn_sync_group", "conv_args", "conv_bn_act_modules", "eval_affine", "recomputing"]

Tensor = torch.Tensor


def conv_args(conv: nn.Module) -> tuple[list[int], list[int]]:
    """(stride, padding) of a Conv3d/Conv2d the fused ops can run (groups=1, dilation=1, zeros)."""
    if not isinstance(conv, (nn.Conv3d, nn.Conv2d)):
        raise TypeError(f"expected an nn.Conv3d (or nn.Conv2d for 2D networks), got {type(conv).__name__}")
    nd = conv.weight.dim() - 2
    if conv.groups != 1:
        raise ValueError(f"fused ops need groups=1, got groups={conv.groups}")
    if any(d != 1 for d in conv.dilation):
        raise ValueError(f"fused ops need dilation=1, got dilation={conv.dilation}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"fused ops need padding_mode='zeros', got {conv.padding_mode!r}")
    padding = conv.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise ValueError("fused ops need explicit integer padding (or 'valid'), got padding='same'; "
                             "construct the conv with padding=k//2")
        padding = (0,) * nd
    stride, padding = list(conv.stride), list(padding)
    if nd == 2:
        stride, padding = stride + [1], padding + [0]
    return stride, padding


# True while activation checkpointing recomputes a forward for the backward pass: the
# recomputation must normalise with the same batch statistics but must not update the running
# statistics (or num_batches_tracked) a second time.
#
# Synchronized BatchNorms (ahnet_fast.nn.convert_sync_batchnorm, torch.nn.SyncBatchNorm) run
# through ahnet_fast.ops.sync_conv_bn_act / sync_bn_act_conv: statistics over every rank's batch.
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("ahnet_fast_recomputing", default=False)


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Context for checkpoint recomputation (``torch.utils.checkpoint``'s ``context_fn``):
    BatchNorm helpers inside it use batch statistics without touching the running ones."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def bn_running_args(bn: nn.Module) -> tuple[bool, float, Optional[Tensor], Optional[Tensor]]:
    """(use batch statistics, momentum factor, running_mean, running_var), as nn.BatchNorm does.

    Increments ``bn.num_batches_tracked`` when training with tracked statistics (call once per
    forward).
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected an nn.BatchNorm3d (or BatchNorm2d for 2D networks), got {type(bn).__name__}")
    factor = 0.0 if bn.momentum is None else float(bn.momentum)
    # (a ContextVar cannot be traced by dynamo; compiled graphs recompute inside AOTAutograd,
    # which never re-runs this Python, so the check only matters in eager mode)
    if bn.training and not torch.compiler.is_compiling() and _RECOMPUTING.get():
        return True, 0.0, None, None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        # += 1 now, or with every layer's in one launch inside ops._running.deferred_running_updates
        _running.count_batch(bn.num_batches_tracked)
        if bn.momentum is None:  # cumulative moving average: reads the counter (a host sync)
            factor = 1.0 / _running.pending_value(bn.num_batches_tracked)
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return use_batch, factor, (bn.running_mean if track else None), (bn.running_var if track else None)


def bn_sync_group(bn: nn.Module) -> tuple[bool, Optional[object]]:
    """(synchronized, process_group) of a BatchNorm: True for ahnet_fast.nn.SyncBatchNorm*d
    (see ahnet_fast.nn.convert_sync_batchnorm) and torch.nn.SyncBatchNorm."""
    if isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "_ahnet_fast_sync", False):
        return True, getattr(bn, "process_group", None)
    return False, None


def _as5d(x: Tensor, name: str) -> Tensor:
    if x.dim() == 4:
        return x.unsqueeze(-1)
    if x.dim() != 5:
        raise ValueError(f"{name} must be (N, C, H, W, D) or, for 2D networks, (N, C, H, W); got {tuple(x.shape)}")
    return x


def _weight5d(conv: nn.Module, x: Tensor) -> Tensor:
    w = conv.weight
    if w.dim() == 4:
        if x.dim() != 4:
            raise ValueError(f"an nn.Conv2d needs 4-D input (N, C, H, W), got {tuple(x.shape)}")
        return w.unsqueeze(-1)
    if x.dim() != 5:
        raise ValueError(f"an nn.Conv3d needs 5-D input (N, C, H, W, D), got {tuple(x.shape)}")
    return w


def conv_bn_act_modules(x: Tensor, conv: nn.Module, bn: nn.Module, *, zpool: str = "none",
                        residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``relu([pool](bn([pool](conv(x)))) + residual)`` fused, with ``conv``'s and ``bn``'s tensors.

    Args: x (N, Cin, H, W, D) [or (N, Cin, H, W) with 2D modules]; conv an nn.Conv3d/Conv2d with
    groups=1, dilation=1, zero padding; bn an nn.BatchNorm3d/2d over Cout; zpool "none" |
    "before_bn" | "after_bn"; residual of the output's shape. Returns (N, Cout, Ho, Wo, Do).
    Same numbers, gradients and buffer updates as ``relu(bn(conv(x)) + residual)``.
    """
    w = _weight5d(conv, x)
    stride, padding = conv_args(conv)
    four = x.dim() == 4
    if four and zpool != "none":
        raise ValueError("zpool needs a depth axis; 4-D (2D network) input has none")
    use_batch, factor, rm, rv = bn_running_args(bn)
    sync, group = bn_sync_group(bn)
    kw = {"process_group": group} if sync else {}
    out = (sync_conv_bn_act if sync else conv_bn_act)(
        _as5d(x, "x"), w, bn.weight, bn.bias, rm, rv, conv_bias=conv.bias, stride=stride, padding=padding,
        training=use_batch, momentum=factor, eps=bn.eps, zpool=zpool,
        residual=None if residual is None else _as5d(residual, "residual"), relu=relu, **kw)
    return out.squeeze(-1) if four else out


def bn_act_conv_modules(x: Tensor, bn: nn.Module, conv: nn.Module, *, relu: bool = True,
                        out: Optional[Tensor] = None, out_channel_offset: int = 0,
                        residual: Optional[Tensor] = None) -> Tensor:
    """``conv(relu(bn(x))) [+ residual]`` fused (pre-activation), with ``bn``'s and ``conv``'s tensors.

    Args: x (N, Cin, H, W, D) [or 4-D with 2D modules]; bn over Cin; conv as in
    conv_bn_act_modules. ``out``/``out_channel_offset`` write into a channel slice of a
    preallocated buffer (no autograd), see ahnet_fast.ops.bn_act_conv; ``residual`` (the
    output's shape) is added in the conv's epilogue.
    """
    w = _weight5d(conv, x)
    stride, padding = conv_args(conv)
    four = x.dim() == 4
    use_batch, factor, rm, rv = bn_running_args(bn)
    sync, group = bn_sync_group(bn)
    res5 = None if residual is None else _as5d(residual, "residual")
    # the synchronised op has no residual epilogue: the sum is a separate pass there
    kw = {"process_group": group} if sync else {"residual": res5}
    res = (sync_bn_act_conv if sync else bn_act_conv)(
        _as5d(x, "x"), bn.weight, bn.bias, rm, rv, w, conv_bias=conv.bias, stride=stride, padding=padding,
        training=use_batch, momentum=factor, eps=bn.eps, relu=relu,
        out=None if out is None else _as5d(out, "out"), out_channel_offset=out_channel_offset, **kw)
    if sync and res5 is not None:
        res = res + res5 if out is None else res.add_(res5)
    return res.squeeze(-1) if four else res


def eval_affine(bn: nn.Module, dtype: torch.dtype = torch.float32) -> Optional[tuple[Tensor, Tensor]]:
    """(scale, shift), (C,) in ``dtype`` (the BN precision: float64 for float64 activations,
    else fp32), of an eval-mode BatchNorm with running statistics, such that bn(y) = y * scale
    + shift per channel; None for a BN that normalises with batch statistics (training, or no
    running statistics) or a synchronised one. The fused ops' cached eval affine
    (``ops._fused._eval_affine``): built once per layer, so an eval forward launches nothing
    for it; callers must not write into the tensors."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
        return None
    if bn.running_var is None or bn_sync_group(bn)[0]:
        return None
    return _eval_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps), dtype)[3:]


def bn_act_conv_fold_modules(x: Tensor, bn: nn.Module, conv: nn.Module, next_bn: nn.Module, out: Tensor) -> Tensor:
    """Inference: ``relu(next_bn(conv(relu(bn(x)))))`` into ``out`` (same shape as the conv's
    output): a pre-activation conv whose output has exactly one reader, the next pre-activation
    layer, gets that layer's eval BN+ReLU in its epilogue (``next_bn`` must be an eval BN with
    running statistics, see :func:`eval_affine`); the next conv then runs on the activation
    with :func:`activated_conv_modules`, without a prologue."""
    aff = eval_affine(next_bn, stat_dtype(x.dtype))
    if aff is None:
        raise ValueError("bn_act_conv_fold_modules needs next_bn in eval mode with running statistics")
    w = _weight5d(conv, x)
    stride, padding = conv_args(conv)
    use_batch, factor, rm, rv = bn_running_args(bn)
    return bn_act_conv(_as5d(x, "x"), bn.weight, bn.bias, rm, rv, w, conv_bias=conv.bias, stride=stride,
                       padding=padding, training=use_batch, momentum=factor, eps=bn.eps, out=_as5d(out, "out"),
                       out_affine=aff, out_relu=True)


def activated_conv_modules(x: Tensor, conv: nn.Module, out: Tensor, *, residual: Optional[Tensor] = None) -> Tensor:
    """Inference: ``conv(x) [+ residual]`` into ``out`` for an already activated ``x`` (see
    :func:`bn_act_conv_fold_modules` and ahnet_fast.ops.activated_conv)."""
    w = _weight5d(conv, x)
    stride, padding = conv_args(conv)
    return activated_conv(_as5d(x, "x"), w, conv_bias=conv.bias, stride=stride, padding=padding,
                          out=_as5d(out, "out"), residual=None if residual is None else _as5d(residual, "residual"))


def chainable(x: Tensor, *bns: nn.Module) -> bool:
    """Whether BN statistics can be handed down a chain of pre-activation convs over ``x``
    (:func:`bn_act_conv_chain_modules`): every BN normalises with batch statistics, none is
    synchronised or uses the cumulative average (``momentum=None``), and the fused ops (not the
    CPU composite path) run the chain."""
    if x.dim() != 5 or _backend.composite_path(x):
        return False
    return all(isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training and bn.momentum is not None
               and not bn_sync_group(bn)[0] for bn in bns)


def bn_act_conv_chain_modules(x: Tensor, bn: nn.Module, conv: nn.Module, *, residual: Optional[Tensor] = None,
                              stats: Optional[Tensor] = None, next_bn: Optional[nn.Module] = None
                              ) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`bn_act_conv_modules` in a training chain (see ``ops.bn_act_conv.bn_act_conv_chain``):
    ``stats`` are x's statistics from the previous call (then ``bn``'s batch was counted and its
    running statistics advanced by that call), ``next_bn`` the BN that reads this output next.
    Returns (output, next_bn's statistics or None). Call only where :func:`chainable` holds."""
    w = _weight5d(conv, x)
    stride, padding = conv_args(conv)
    if stats is None:
        _use_batch, factor, rm, rv = bn_running_args(bn)
    else:
        factor, rm, rv = float(bn.momentum), None, None
    nxt = None
    if next_bn is not None:
        recompute = not torch.compiler.is_compiling() and _RECOMPUTING.get()
        track = next_bn.track_running_stats and not recompute
        nxt = NextBN(next_bn.weight, next_bn.bias, next_bn.running_mean if track else None,
                     next_bn.running_var if track else None, float(next_bn.momentum), float(next_bn.eps))
    out, out_stats = bn_act_conv_chain(x, bn.weight, bn.bias, rm, rv, w, conv_bias=conv.bias, stride=stride,
                                       padding=padding, momentum=factor, eps=bn.eps, residual=residual,
                                       stats=stats, next_bn=nxt)
    if (out_stats is not None and next_bn is not None and nxt is not None and nxt.running_mean is not None
            and next_bn.num_batches_tracked is not None):
        _running.count_batch(next_bn.num_batches_tracked)  # the next BN's batch, counted by its producer
    return out, out_stats
