"""``bn_act_conv``: pre-activation block BN -> [ReLU] -> conv (decoder), zero padding after BN+ReLU."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _backend, _checks, composite
from ._library import bn_act_conv_into_op, bn_act_conv_op, bn_update_running_stats_op
from ._util import triple

__all__ = ["bn_act_conv"]

Tensor = torch.Tensor
IntOr3 = Union[int, Sequence[int]]


def bn_act_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor, *,
                conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1), padding: IntOr3 = (0, 0, 0),
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5, relu: bool = True,
                out: Optional[Tensor] = None, out_channel_offset: int = 0,
                residual: Optional[Tensor] = None) -> Tensor:
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
    Returns:
        (N, Cout, Ho, Wo, Do), or the slice of ``out``.

    Saved for backward: x, the per-channel mean/invstd (fp32), the BN affine parameters and the
    conv weight. The activation z = relu(BN(x)) is recomputed transiently in backward, where the
    unfused chain keeps both x and z alive.
    """
    _checks.tensor5("x", x)
    stride_, padding_ = triple(stride, "stride"), triple(padding, "padding")
    o_shape = _checks.conv_args(x, weight, conv_bias, stride_, padding_)
    if residual is not None:
        _checks.tensor5("residual", residual)
        _checks.same("residual", residual, x)
        if list(residual.shape) != list(o_shape):
            raise ValueError(f"residual has shape {tuple(residual.shape)}; it must have the output's shape "
                             f"{tuple(o_shape)}")
    _checks.bn_args(x.shape[1], x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    count = _checks.batch_count(x.shape, training)
    rm = None if training else running_mean
    rv = None if training else running_var
    use_composite = _backend.composite_path(x)
    backend = _backend.call_arg()
    if out is None and use_composite:
        res = composite.bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride_,
                                    padding_, bool(training), float(momentum), float(eps), bool(relu))
        return res if residual is None else res.add_(residual)
    if out is None:
        res, mean, _invstd, var = bn_act_conv_op(x, bn_weight, bn_bias, rm, rv, weight, conv_bias, residual, stride_,
                                                 padding_, bool(training), float(eps), bool(relu), backend)
    else:
        _checks.tensor5("out", out)
        _checks.same("out", out, x)
        off = int(out_channel_offset)
        want = [o_shape[0], None, *o_shape[2:]]
        if (out.shape[0] != want[0] or list(out.shape[2:]) != want[2:] or off < 0
                or off + o_shape[1] > out.shape[1]):
            raise ValueError(f"out {tuple(out.shape)} with out_channel_offset={off} cannot hold the result "
                             f"{tuple(o_shape)}: need (N, >= offset + Cout, Ho, Wo, Do)")
        if _checks.any_requires_grad(x, weight, conv_bias, bn_weight, bn_bias, residual) or (
                torch.is_grad_enabled() and out.requires_grad):
            raise RuntimeError("bn_act_conv(out=...) is not differentiable: call it under torch.no_grad() or "
                               "torch.inference_mode(), or without out= when gradients are needed")
        if use_composite:
            res = composite.bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride_,
                                        padding_, bool(training), float(momentum), float(eps), bool(relu), out, off)
            return res if residual is None else res.add_(residual)
        mean, _invstd, var = bn_act_conv_into_op(x, bn_weight, bn_bias, rm, rv, weight, conv_bias, residual, stride_,
                                                 padding_, bool(training), float(eps), bool(relu), out, off, backend)
        res = out.narrow(1, off, o_shape[1])
    if training and running_mean is not None:
        bn_update_running_stats_op(running_mean, running_var, mean, var, count, float(momentum))
    return res
