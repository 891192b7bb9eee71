"""``bn_act_conv``: pre-activation block BN -> [ReLU] -> conv (decoder), zero padding after BN+ReLU."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _backend, _checks, _running, composite, reference
from ._library import bn_act_conv_into_op, bn_act_conv_op
from ._util import stat_dtype, triple

__all__ = ["activated_conv", "bn_act_conv"]

Tensor = torch.Tensor
IntOr3 = Union[int, Sequence[int]]


def _check_conv_call(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], stride: IntOr3, padding: IntOr3,
                     residual: Optional[Tensor]) -> tuple[list[int], list[int], list[int]]:
    """(stride, padding, output shape) of a checked bn_act_conv call; clear errors otherwise."""
    _checks.tensor5("x", x)
    stride_, padding_ = triple(stride, "stride"), triple(padding, "padding")
    o_shape = _checks.conv_args(x, weight, conv_bias, stride_, padding_)
    if residual is not None:
        _checks.tensor5("residual", residual)
        _checks.same("residual", residual, x)
        if list(residual.shape) != list(o_shape):
            raise ValueError(f"residual has shape {tuple(residual.shape)}; it must have the output's shape "
                             f"{tuple(o_shape)}")
    return stride_, padding_, o_shape


def bn_act_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor, *,
                conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1), padding: IntOr3 = (0, 0, 0),
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5, relu: bool = True,
                out: Optional[Tensor] = None, out_channel_offset: int = 0,
                residual: Optional[Tensor] = None, out_affine: Optional[tuple[Tensor, Tensor]] = None,
                out_relu: bool = False) -> Tensor:
    """Fused ``conv3d(relu(BN(x))) [+ residual]``: nn.BatchNorm3d -> [nn.ReLU] -> nn.Conv3d, exactly.

    BN+ReLU is applied to the input as the conv loads it, and the conv's zero padding is
    applied after that transform (a padded tap contributes 0, not relu(shift)).

    Args:
        x: (N, Cin, H, W, D), float32/float16/bfloat16 (float64: reference backend only),
           contiguous or channels_last_3d; the output follows its memory format.
        bn_weight, bn_bias: (Cin,) or None. running_mean, running_var: (Cin,) or None; updated
           in place when training (F.batch_norm semantics), used when not.
        weight: (Cout, Cin, kh, kw, kd), x's dtype; conv_bias (Cout,) or None.
        stride, padding: int or (h, w, d). The fused kernel covers (3,3,1), (1,1,3), (1,1,1).
        training: batch statistics over (N, H, W, D) of x, in fp32.
        relu: apply the ReLU between BN and conv.
        out, out_channel_offset: write the result into out[:, off:off+Cout] of a preallocated
           (N, Ctot, Ho, Wo, Do) buffer (same dtype/device) and return that slice view, so dense
           blocks need no torch.cat. Not differentiable: only allowed when autograd is not
           recording (torch.no_grad / inference_mode, or no input requiring grad).
        residual: a tensor of the conv output's shape and x's dtype, added in the conv's
           epilogue (the Pseudo3D layer's ``x3x3x1 + conv1x1x3(x3x3x1)`` without its own pass).
        out_affine, out_relu: inference with ``out=`` only (no residual): (scale, shift), each
           (Cout,), applied per output channel in the conv's epilogue, then a ReLU if out_relu:
           the eval-mode BN+ReLU of the pre-activation layer that reads this output next (see
           :func:`activated_conv`), applied once per element instead of once per tap there.
    Returns:
        (N, Cout, Ho, Wo, Do), or the slice of ``out``.

    Saved for backward: x, the per-channel mean/invstd (fp32), the BN affine parameters and the
    conv weight. The activation z = relu(BN(x)) is recomputed transiently in backward, where the
    unfused chain keeps both x and z alive.
    """
    stride_, padding_, o_shape = _check_conv_call(x, weight, conv_bias, stride, padding, residual)
    _checks.bn_args(x.shape[1], x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    _checks.batch_count(x.shape, training)
    if out_affine is not None:
        if out is None or training or residual is not None:
            raise ValueError("out_affine is an inference form: it needs out=, training=False and no residual")
        return _into(x, weight, conv_bias, stride_, padding_, o_shape, out, out_channel_offset, None,
                     out_affine, out_relu, bn=(bn_weight, bn_bias, running_mean, running_var, float(eps), bool(relu)))
    rm = None if training else running_mean
    rv = None if training else running_var
    use_composite = _backend.composite_path(x)
    backend = _backend.call_arg()
    if out is None and use_composite:
        res = composite.bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride_,
                                    padding_, bool(training), float(momentum), float(eps), bool(relu))
        return res if residual is None else res.add_(residual)
    advance = training and running_mean is not None
    if advance:
        _running.current(running_mean, running_var)
    um, uv = (running_mean, running_var) if advance else (None, None)
    if out is None:
        res, _mean, _invstd, _var, next_mean, next_var, *_ = bn_act_conv_op(
            x, bn_weight, bn_bias, rm, rv, weight, conv_bias, residual, stride_, padding_, bool(training),
            float(eps), bool(relu), um, uv, float(momentum), *_NO_CHAIN, backend)
    else:
        off = _check_out_into("bn_act_conv", x, o_shape, out, out_channel_offset,
                              (x, weight, conv_bias, bn_weight, bn_bias, residual))
        if use_composite:
            res = composite.bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride_,
                                        padding_, bool(training), float(momentum), float(eps), bool(relu), out, off)
            return res if residual is None else res.add_(residual)
        _mean, _invstd, _var, next_mean, next_var = bn_act_conv_into_op(
            x, bn_weight, bn_bias, rm, rv, weight, conv_bias, residual, stride_, padding_, bool(training),
            float(eps), bool(relu), out, off, um, uv, float(momentum), *_NO_FOLD, backend)
        res = out.narrow(1, off, o_shape[1])
    if advance:
        _running.commit(running_mean, running_var, next_mean, next_var)
    return res


# bn_act_conv_op's chain arguments when no statistics are handed on
_NO_CHAIN = (None, None, None, None, None, 0.0, 0.0, False)
# bn_act_conv_into_op's inference-fold arguments when nothing is folded
# (pre_activated, out_scale, out_shift, out_relu)
_NO_FOLD = (False, None, None, False)


def _check_out_into(what: str, x: Tensor, o_shape: Sequence[int], out: Tensor, out_channel_offset: int,
                    tensors: Sequence[Optional[Tensor]]) -> int:
    """Checks of an ``out=`` call of ``what`` (shape, device, no autograd); returns the channel offset."""
    _checks.tensor5("out", out)
    _checks.same("out", out, x)
    off = int(out_channel_offset)
    if (out.shape[0] != o_shape[0] or list(out.shape[2:]) != list(o_shape[2:]) or off < 0
            or off + o_shape[1] > out.shape[1]):
        raise ValueError(f"out {tuple(out.shape)} with out_channel_offset={off} cannot hold the result "
                         f"{tuple(o_shape)}: need (N, >= offset + Cout, Ho, Wo, Do)")
    if _checks.any_requires_grad(*tensors) or (torch.is_grad_enabled() and out.requires_grad):
        raise RuntimeError(f"{what}(out=...) is not differentiable: call it under torch.no_grad() or "
                           "torch.inference_mode(), or without out= when gradients are needed")
    return off


def _check_affine(out_affine, cout: int, x: Tensor) -> tuple[Tensor, Tensor]:
    if not (isinstance(out_affine, (tuple, list)) and len(out_affine) == 2
            and all(isinstance(t, Tensor) for t in out_affine)):
        raise TypeError("out_affine must be a (scale, shift) pair of tensors")
    scale, shift = out_affine
    for name, t in (("out_affine scale", scale), ("out_affine shift", shift)):
        if tuple(t.shape) != (cout,) or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{name} must be a floating ({cout},) tensor on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    sd = stat_dtype(x.dtype)
    return scale.to(sd).contiguous(), shift.to(sd).contiguous()


def _into(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], stride_: list[int], padding_: list[int],
          o_shape: Sequence[int], out: Tensor, out_channel_offset: int, residual: Optional[Tensor],
          out_affine, out_relu: bool, bn: Optional[tuple]) -> Tensor:
    """The inference forms writing into ``out``: ``bn`` = (weight, bias, running_mean,
    running_var, eps, relu) of x's eval BN, or None for an input that is already activated;
    ``out_affine`` (scale, shift) or None, then a ReLU if out_relu."""
    bn_w, bn_b, rm, rv, eps, relu = bn if bn is not None else (None, None, None, None, 0.0, False)
    off = _check_out_into("bn_act_conv" if bn is not None else "activated_conv", x, o_shape, out, out_channel_offset,
                          (x, weight, conv_bias, bn_w, bn_b, residual))
    aff = _check_affine(out_affine, o_shape[1], x) if out_affine is not None else None
    res = out.narrow(1, off, o_shape[1])
    if _backend.composite_path(x):
        if bn is None:
            o = composite.conv3d(x, weight, conv_bias, stride_, padding_, training=False)
        else:
            o = composite.bn_act_conv(x, bn_w, bn_b, rm, rv, weight, conv_bias, stride_, padding_, False, 0.0,
                                      eps, relu)
        if residual is not None:
            o = o + residual
        if aff is not None:
            o = reference._out_affine(o, (aff[0], aff[1], bool(out_relu)))
        res.copy_(o)
        return res
    bn_act_conv_into_op(x, bn_w, bn_b, rm, rv, weight, conv_bias, residual, stride_, padding_, False, float(eps),
                        bool(relu), out, off, None, None, 0.0, bn is None,
                        aff[0] if aff is not None else None, aff[1] if aff is not None else None, bool(out_relu),
                        _backend.call_arg())
    return res


def activated_conv(x: Tensor, weight: Tensor, *, conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1),
                   padding: IntOr3 = (0, 0, 0), out: Tensor, out_channel_offset: int = 0,
                   residual: Optional[Tensor] = None) -> Tensor:
    """Inference: ``conv3d(x) [+ residual]`` into ``out[:, off:off+Cout]`` for an ``x`` that is
    already a pre-activation layer's activation relu(BN(.)) (written by the previous conv's
    epilogue with ``bn_act_conv(..., out_affine=..., out_relu=True)``): the fused conv without
    a prologue, the zero padding applied to x as it is (the same as padding after the
    transform). x (N, Cin, H, W, D), weight (Cout, Cin, kh, kw, kd); returns the slice of out.
    Not differentiable (no autograd)."""
    stride_, padding_, o_shape = _check_conv_call(x, weight, conv_bias, stride, padding, residual)
    return _into(x, weight, conv_bias, stride_, padding_, o_shape, out, out_channel_offset, residual, None, False,
                 bn=None)


class NextBN(NamedTuple):
    """The training BatchNorm that reads a ``bn_act_conv`` output next (see :func:`bn_act_conv_chain`).

    bn_weight/bn_bias: (C,) or None; running_mean/running_var: its buffers, or None when it
    tracks no statistics; momentum: its running-average factor; eps: its epsilon."""

    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    momentum: float
    eps: float


def bn_act_conv_chain(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor, *,
                      conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1), padding: IntOr3 = (0, 0, 0),
                      momentum: float = 0.1, eps: float = 1e-5, relu: bool = True,
                      residual: Optional[Tensor] = None, stats: Optional[Tensor] = None,
                      next_bn: Optional[NextBN] = None) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`bn_act_conv` in training (batch statistics) inside a chain of pre-activation convs,
    where each BN's statistics come from the conv that produced its input.

    ``stats``: x's batch statistics as the (5, Cin) tensor a previous call returned (rows mean,
    var, invstd, scale, shift), so no statistics pass reads x; the BN's running statistics were
    advanced by that call. ``next_bn``: the training BN that reads this call's output next; its
    statistics are computed in this conv's epilogue and finalized in the same merge launch (its
    running statistics advanced too), and returned for the next call. Returns (output, the next
    BN's statistics or None). None where the chain cannot be kept (the CPU composite path): the
    next call then computes its own statistics, with the same result.
    """
    chained = stats is not None
    if chained and (not isinstance(stats, Tensor) or tuple(stats.shape) != (5, x.shape[1])):
        raise ValueError(f"stats must be the (5, {x.shape[1]}) statistics a previous bn_act_conv_chain returned, "
                         f"got {type(stats).__name__ if not isinstance(stats, Tensor) else tuple(stats.shape)}")
    if _backend.composite_path(x):
        # no chain on this path: the next BN computes its own statistics (the same values) and
        # advances its own buffers; given statistics were advanced by their producer already
        if chained:
            running_mean = running_var = None
        res = bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias=conv_bias,
                          stride=stride, padding=padding, training=True, momentum=momentum, eps=eps, relu=relu,
                          residual=residual)
        return res, None
    stride_, padding_, o_shape = _check_conv_call(x, weight, conv_bias, stride, padding, residual)
    _checks.bn_args(x.shape[1], x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
    _checks.batch_count(x.shape, True)
    advance = not chained and running_mean is not None
    um, uv = (running_mean, running_var) if advance else (None, None)
    _running.current(um, uv, *((next_bn.running_mean, next_bn.running_var) if next_bn is not None else ()))
    if next_bn is not None:
        _checks.bn_args(o_shape[1], x, next_bn.bn_weight, next_bn.bn_bias, next_bn.running_mean,
                        next_bn.running_var, True, next_bn.momentum, next_bn.eps)
        chain = (stats, next_bn.bn_weight, next_bn.bn_bias, next_bn.running_mean, next_bn.running_var,
                 float(next_bn.eps), float(next_bn.momentum), True)
    else:
        chain = (stats, None, None, None, None, 0.0, 0.0, False)
    res, _m, _i, _v, next_mean, next_var, o_stats, o_next_mean, o_next_var = bn_act_conv_op(
        x, bn_weight, bn_bias, None, None, weight, conv_bias, residual, stride_, padding_, True, float(eps),
        bool(relu), um, uv, float(momentum), *chain, _backend.call_arg())
    if advance:
        _running.commit(running_mean, running_var, next_mean, next_var)
    if next_bn is None:
        return res, None
    if next_bn.running_mean is not None:
        _running.commit(next_bn.running_mean, next_bn.running_var, o_next_mean, o_next_var)
    return res, o_stats
