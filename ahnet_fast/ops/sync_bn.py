"""Synchronized (cross-process) BatchNorm for the fused ops: one global batch over all ranks.

Public functions (same arguments as the unsynchronized ops, plus ``process_group``)::

    sync_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, ..., process_group=None)
    sync_bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, *, ..., process_group=None)
    sync_batch_norm(x, running_mean, running_var, weight, bias, *, training, momentum, eps, process_group=None)
    sync_active(process_group, training) -> bool

They give what ``torch.nn.SyncBatchNorm`` gives: the statistics of the GLOBAL batch (the
concatenation of every rank's batch, ranks may hold different batch sizes), the matching
backward, and running statistics updated with the unbiased variance over the global count.
``process_group=None`` means the default (WORLD) group. When not training, when
torch.distributed is not initialised or when the group has one process, they simply call
:func:`~ahnet_fast.ops.conv_bn_act` / :func:`~ahnet_fast.ops.bn_act_conv` / ``F.batch_norm``:
behaviour is then exactly the unsynchronized one.

Design (why the collectives live here, in Python, and not in the custom ops)
----------------------------------------------------------------------------
The torch.library ops never communicate, so they stay functional, opcheck-able and traceable.
The training path is split into ops with the collectives between them:

forward:   ``bn_stats`` (local per-channel mean and biased variance, fp32/fp64)
           -> ONE collective per BN layer: an all-gather of (count, mean, var) of every rank
              (tiny: (1 + 2C) float64 per rank), merged with the exact parallel (Chan) formula,
              so no sum-of-squares cancellation and ranks may hold different counts
           -> normalise with the global mean/invstd: ``bn_act_apply`` (conv -> BN -> act: pool,
              residual and ReLU fused) or ``bn_act_conv`` given the global statistics as its
              "running" statistics (decoder: BN+ReLU still applied in the conv's prologue).
backward:  the local backward with batch_stats=False (``bn_act_backward`` /
           ``bn_act_conv_backward``), which yields ``gamma*invstd*g_t`` and the per-channel
           sums sum(g_t), sum(g_t*xhat) over the LOCAL batch
           -> ONE all-reduce (sum) of those two (C,) vectors
           -> grad_y = gamma*invstd*(g_t - sum(g_t)/M - xhat*sum(g_t*xhat)/M), M = global count,
              written as the per-channel affine correction ``partial + a*y + b`` (one fused
              ``bn_act_apply`` pass with the partial gradient as its "residual").
The gradients of gamma and beta are the LOCAL sums (as in nn.SyncBatchNorm): DDP averages
parameter gradients itself.

Costs against the unsynchronized fused op: the conv of conv -> BN -> act runs through torch
(cuDNN on a GPU) and its statistics take a separate pass (the collective must sit between
statistics and normalisation, so the conv epilogue cannot normalise); the backward takes one
extra elementwise pass (the correction). The decoder's BN+ReLU stays in the conv prologue.
Collectives are issued in the same order on every rank because every rank runs the same
network; activation-checkpoint recomputation repeats them (without touching running stats).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backend, _checks
from ._library import (
    bn_act_apply_op,
    bn_act_backward_op,
    bn_act_conv_backward_op,
    bn_act_conv_into_op,
    bn_act_conv_op,
    bn_stats_op,
    zmaxpool_op,
)
from ._util import bn_affine, is_supported_layout, memory_format, triple
from .bn_act_conv import bn_act_conv
from .conv_bn_act import conv_bn_act

__all__ = ["global_batch_stats", "sync_active", "sync_batch_norm", "sync_bn_act_conv", "sync_conv_bn_act"]

Tensor = torch.Tensor
IntOr3 = Union[int, Sequence[int]]
Group = Optional[Any]  # torch.distributed.ProcessGroup or None (the default group)


def sync_active(process_group: Group, training: bool) -> bool:
    """True when a BN call must synchronize: training, torch.distributed initialised, > 1 rank."""
    if not training or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(process_group) > 1


def _all_gather(t: Tensor, group: Group) -> Tensor:
    """(k,) on every rank -> (world, k), rank order."""
    w = dist.get_world_size(group)
    out = t.new_empty((w * t.numel(),))  # the concatenation form: accepted by every backend
    # all_gather_single is the newer name of all_gather_into_tensor (same semantics)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=group)
    return out.view(w, t.numel())


@torch.no_grad()
def global_batch_stats(mean: Tensor, var: Tensor, count: int, group: Group) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank (count, mean, biased var) into the global batch's, with one all-gather.

    Args: mean, var (C,) local statistics (fp32 or fp64); count = values per channel here.
    Returns (mean, biased var) in the dtype of ``mean`` and the global count as a 0-dim
    float64 tensor (kept on the device: no host synchronisation per BN layer).
    Merge in float64: M2 = sum_r n_r*var_r + sum_r n_r*(mean_r - mean)^2 (exact, stable).
    """
    c = mean.numel()
    f64 = torch.float64
    local = torch.cat([torch.full((1,), float(count), dtype=f64, device=mean.device), mean.to(f64), var.to(f64)])
    g = _all_gather(local, group)
    n, m, v = g[:, :1], g[:, 1:1 + c], g[:, 1 + c:]
    total = n.sum()
    gmean = (n * m).sum(0) / total
    m2 = (n * v).sum(0) + (n * (m - gmean) ** 2).sum(0)
    return gmean.to(mean.dtype), (m2 / total).to(mean.dtype), total


@torch.no_grad()
def _update_running(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, var: Tensor,
                    total: Tensor, momentum: float) -> None:
    """F.batch_norm's update with the unbiased variance over the GLOBAL count."""
    if running_mean is None or running_var is None:
        return
    sdt = mean.dtype
    unbiased = var * (total / (total - 1)).to(sdt)
    running_mean.copy_(mean * momentum + running_mean.to(sdt) * (1.0 - momentum))
    running_var.copy_(unbiased * momentum + running_var.to(sdt) * (1.0 - momentum))


def _grad_layout(g: Tensor, like: Tensor) -> Tensor:
    if is_supported_layout(g):
        return g
    return g.contiguous(memory_format=memory_format(like))


def _finish_grad(y: Tensor, partial: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor],
                 sums: Tensor, total: Tensor, backend: str) -> Tensor:
    """partial = gamma*invstd*g_t  ->  gamma*invstd*(g_t - S_g/M - xhat*S_gx/M), as partial + a*y + b."""
    sdt = mean.dtype
    k = invstd / total.to(sdt)
    if gamma is not None:
        k = k * gamma.detach().to(sdt)
    s_g, s_gx = sums[0], sums[1]
    a = -k * invstd * s_gx
    b = -k * s_g - a * mean
    return bn_act_apply_op(y, a.contiguous(), b.contiguous(), partial, False, False, backend)


def _all_reduce_sums(s_g: Tensor, s_gx: Tensor, group: Group) -> Tensor:
    sums = torch.stack([s_g, s_gx])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums


class _SyncBNAct(torch.autograd.Function):
    """out = relu(pool(BN_global(y)) + residual) with given global mean/invstd; see module doc."""

    @staticmethod
    def forward(ctx, y, gamma, beta, residual, mean, invstd, total, pool_after, relu, group, backend):
        scale, shift = bn_affine(mean, invstd, None if gamma is None else gamma.detach(),
                                 None if beta is None else beta.detach())
        out = bn_act_apply_op(y, scale.contiguous(), shift.contiguous(), residual, pool_after, relu, backend)
        # the ReLU mask is recomputed as t > 0 unless a pool or a residual sits in between
        keep_out = relu and (residual is not None or pool_after)
        ctx.save_for_backward(y, gamma, beta, mean, invstd, total, out if keep_out else None)
        ctx.params = (pool_after, relu, residual is not None, group, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, gamma, beta, mean, invstd, total, out = ctx.saved_tensors
        pool_after, relu, has_res, group, backend = ctx.params
        nig = ctx.needs_input_grad
        beta_arg = None if beta is None else beta.detach()
        gy_p, s_gx, s_g, gres = bn_act_backward_op(
            _grad_layout(grad_out, y), y, mean, invstd,
            None if gamma is None else gamma.detach(), beta_arg, out, pool_after, relu, False,
            bool(has_res and nig[3]), backend)
        gy = None
        if nig[0]:
            gy = _finish_grad(y, gy_p, mean, invstd, gamma, _all_reduce_sums(s_g, s_gx, group), total, backend)
        g_gamma = s_gx.to(gamma.dtype) if gamma is not None and nig[1] else None
        g_beta = s_g.to(beta.dtype) if beta is not None and nig[2] else None
        g_res = gres if has_res and nig[3] else None
        return (gy, g_gamma, g_beta, g_res) + (None,) * 7


class _SyncBNActConv(torch.autograd.Function):
    """out = conv(relu(BN_global(x))) with given global mean/var; see module doc."""

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, conv_bias, mean, var, total, stride, padding, eps, relu, group,
                backend):
        out, m, invstd, *_ = bn_act_conv_op(x, gamma, beta, mean, var, weight, conv_bias, None, stride, padding,
                                            False, eps, relu, None, None, 0.0, None, None, None, None, None, 0.0,
                                            0.0, False, backend)
        ctx.save_for_backward(x, gamma, beta, m, invstd, weight, total)
        ctx.params = (list(stride), list(padding), relu, conv_bias is not None, group, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gamma, beta, mean, invstd, weight, total = ctx.saved_tensors
        stride, padding, relu, has_bias, group, backend = ctx.params
        nig = ctx.needs_input_grad
        sdt = mean.dtype
        c = x.shape[1]
        # the op returns sum(g_t*xhat)/sum(g_t) only for present affine params: stand-ins
        # (gamma = 1, beta = 0) give the same numbers when BN has affine=False
        g_arg = gamma.detach() if gamma is not None else torch.ones(c, dtype=sdt, device=x.device)
        b_arg = beta.detach() if beta is not None else torch.zeros(c, dtype=sdt, device=x.device)
        mask = [bool(nig[0]), True, True, bool(nig[3]), bool(nig[4]) and has_bias]
        gx_p, s_gx, s_g, gw, gb = bn_act_conv_backward_op(
            _grad_layout(grad_out, x), x, g_arg, b_arg, mean, invstd, weight, stride, padding, False, relu,
            has_bias, mask, None, backend)
        gx = None
        if nig[0]:
            sums = _all_reduce_sums(s_g.to(sdt), s_gx.to(sdt), group)
            gx = _finish_grad(x, gx_p, mean, invstd, gamma, sums, total, backend)
        g_gamma = s_gx.to(gamma.dtype) if gamma is not None and nig[1] else None
        g_beta = s_g.to(beta.dtype) if beta is not None and nig[2] else None
        return (gx, g_gamma, g_beta, gw if nig[3] else None, gb if mask[4] else None) + (None,) * 9


def _local_count(shape: Sequence[int]) -> int:
    # one value per channel is fine locally: the check that matters (> 1) is on the global count,
    # which is at least the number of ranks
    return _checks.batch_count(shape, False)


def _bn_tail(y: Tensor, gamma, beta, running_mean, running_var, momentum: float, eps: float, pool_after: bool,
             residual: Optional[Tensor], relu: bool, group: Group, backend: str) -> Tensor:
    mean_l, var_l = bn_stats_op(y.detach(), backend)  # the Function's backward covers the stats
    mean, var, total = global_batch_stats(mean_l, var_l, _local_count(y.shape), group)
    invstd = torch.rsqrt(var + eps)  # no grad: mean/var were computed from detached values
    out = _SyncBNAct.apply(y, gamma, beta, residual, mean, invstd, total, pool_after, relu, group, backend)
    _update_running(running_mean, running_var, mean, var, total, momentum)
    return out


def sync_conv_bn_act(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                     conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1), padding: IntOr3 = (0, 0, 0),
                     training: bool = False, momentum: float = 0.1, eps: float = 1e-5, zpool: str = "none",
                     residual: Optional[Tensor] = None, relu: bool = True, process_group: Group = None) -> Tensor:
    """:func:`ahnet_fast.ops.conv_bn_act` with BatchNorm statistics over every rank's batch.

    Arguments, shapes and result as ``conv_bn_act`` (x (N, Cin, H, W, D) -> (N, Cout, Ho, Wo, Do));
    ``process_group``: the group whose ranks form the global batch (None: the default group).
    Every rank of the group must make the same sequence of calls (collectives inside).
    """
    if not sync_active(process_group, training):
        return conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, conv_bias=conv_bias,
                           stride=stride, padding=padding, training=training, momentum=momentum, eps=eps,
                           zpool=zpool, residual=residual, relu=relu)
    stride_, padding_, _c_shape, _bn_shape, _out_shape = _checks.conv_bn_act_args(
        x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, zpool,
        True, momentum, eps)
    backend = _backend.call_arg()
    c = F.conv3d(x, weight, conv_bias, stride_, padding_)
    if not is_supported_layout(c):
        c = c.contiguous(memory_format=memory_format(x))
    y = zmaxpool_op(c, backend) if zpool == "before_bn" else c
    return _bn_tail(y, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps),
                    zpool == "after_bn", residual, bool(relu), process_group, backend)


def sync_bn_act_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor, *,
                     conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1), padding: IntOr3 = (0, 0, 0),
                     training: bool = False, momentum: float = 0.1, eps: float = 1e-5, relu: bool = True,
                     out: Optional[Tensor] = None, out_channel_offset: int = 0,
                     process_group: Group = None) -> Tensor:
    """:func:`ahnet_fast.ops.bn_act_conv` with BatchNorm statistics over every rank's batch.

    Arguments, shapes and result as ``bn_act_conv``; ``process_group`` as in
    :func:`sync_conv_bn_act`. ``out=`` (channel-slice output) is allowed only without autograd.
    """
    if not sync_active(process_group, training):
        return bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias=conv_bias,
                           stride=stride, padding=padding, training=training, momentum=momentum, eps=eps,
                           relu=relu, out=out, out_channel_offset=out_channel_offset)
    _checks.tensor5("x", x)
    stride_, padding_ = triple(stride, "stride"), triple(padding, "padding")
    o_shape = _checks.conv_args(x, weight, conv_bias, stride_, padding_)
    _checks.bn_args(x.shape[1], x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
    backend = _backend.call_arg()
    mean_l, var_l = bn_stats_op(x.detach(), backend)  # the Function's backward covers the stats
    mean, var, total = global_batch_stats(mean_l, var_l, _local_count(x.shape), process_group)
    if out is None:
        res = _SyncBNActConv.apply(x, bn_weight, bn_bias, weight, conv_bias, mean, var, total, stride_, padding_,
                                   float(eps), bool(relu), process_group, backend)
    else:
        _checks.tensor5("out", out)
        _checks.same("out", out, x)
        off = int(out_channel_offset)
        if (out.shape[0] != o_shape[0] or list(out.shape[2:]) != o_shape[2:] or off < 0
                or off + o_shape[1] > out.shape[1]):
            raise ValueError(f"out {tuple(out.shape)} with out_channel_offset={off} cannot hold the result "
                             f"{tuple(o_shape)}: need (N, >= offset + Cout, Ho, Wo, Do)")
        if _checks.any_requires_grad(x, weight, conv_bias, bn_weight, bn_bias):
            raise RuntimeError("bn_act_conv(out=...) is not differentiable: call it under torch.no_grad() or "
                               "torch.inference_mode(), or without out= when gradients are needed")
        bn_act_conv_into_op(x, bn_weight, bn_bias, mean, var, weight, conv_bias, None, stride_, padding_, False,
                            float(eps), bool(relu), out, off, None, None, 0.0, False, None, None, False, backend)
        res = out.narrow(1, off, o_shape[1])
    _update_running(running_mean, running_var, mean, var, total, float(momentum))
    return res


def sync_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], *, training: bool, momentum: float,
                    eps: float, process_group: Group = None) -> Tensor:
    """``F.batch_norm`` over the global batch: x (N, C, *) with at least 2 dims, any float dtype
    the BN pieces accept. Used by the synchronized BatchNorm modules when they are called
    directly (not through the fused conv helpers)."""
    if not sync_active(process_group, training):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if x.dim() < 2:
        raise ValueError(f"batch norm needs (N, C, ...) input, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    x5 = x.reshape(n, c, -1, 1, 1)
    if not is_supported_layout(x5):
        x5 = x5.contiguous()
    backend = _backend.call_arg()
    out = _bn_tail(x5, weight, bias, running_mean, running_var, float(momentum), float(eps), False, None, False,
                   process_group, backend)
    return out.reshape(x.shape)
