"""``conv_bn_act``: post-activation block conv -> [z-pool] -> BN -> [z-pool] -> [+ residual] -> [ReLU]."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _backend, _checks, _running, composite
from ._library import conv_bn_act_op

__all__ = ["conv_bn_act"]

Tensor = torch.Tensor
IntOr3 = Union[int, Sequence[int]]


def conv_bn_act(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                conv_bias: Optional[Tensor] = None, stride: IntOr3 = (1, 1, 1), padding: IntOr3 = (0, 0, 0),
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5, zpool: str = "none",
                residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """Fused ``relu([pool_after](BN([pool_before](conv3d(x)))) + residual)`` (encoder / stem block).

    Exactly nn.Conv3d(bias=conv_bias is not None, groups=1, dilation=1, zero padding) ->
    [nn.MaxPool3d((1,1,2)) if zpool="before_bn"] -> F.batch_norm -> [MaxPool3d((1,1,2)) if
    zpool="after_bn"] -> [+ residual] -> [ReLU if relu].

    Args:
        x: (N, Cin, H, W, D), float32/float16/bfloat16 (float64: reference backend only),
           contiguous or channels_last_3d; the output follows its memory format.
        weight: (Cout, Cin, kh, kw, kd), x's dtype. The fused conv kernel covers (3,3,1), (1,1,3),
           (1,1,1) with stride (1,1,1)/(2,2,1) and "same" or zero padding; other convs (the stem's
           7x7x3) run through torch's conv with the rest still fused.
        bn_weight, bn_bias: (Cout,) or None (affine=False); any floating dtype.
        running_mean, running_var: (Cout,) or None (track_running_stats=False). training=True
           updates them in place like F.batch_norm: r = (1-momentum)*r + momentum*batch, with the
           unbiased batch variance. training=False normalises with them (they must be given).
           num_batches_tracked and momentum=None are the caller's (nn module's) bookkeeping, see
           ahnet_fast.nn.conv_bn_act_modules.
        conv_bias: (Cout,) or None. stride, padding: int or (h, w, d).
        training: True = batch statistics over (N, H, W, D) of the BN input, in fp32.
        zpool: "none" | "before_bn" (max of the raw conv output, then the affine: a negative BN
           scale never turns the max into a min) | "after_bn". Pooled depth = Dconv // 2.
        residual: tensor of the output's shape and x's dtype, added before the ReLU.
    Returns:
        (N, Cout, Ho, Wo, Do), Do = Dconv or Dconv // 2 with a z-pool.

    Saved for backward (only when a gradient is needed): x and weight (for the conv gradients),
    c = the raw conv output before any pool, per-channel mean/invstd (fp32) and the BN affine
    parameters; the output too, but only when a residual or a pool-after sits between the
    affine and the ReLU (otherwise the ReLU mask is recomputed as t > 0 from c). The normalised
    value, the pool argmax and the pre-ReLU sum are always recomputed. The leanest unfused chain
    (in-place ReLU) saves x, c and the output, plus with a z-pool the pool input and an int64
    index tensor (8 bytes per pooled element). So this op saves strictly less with a z-pool or
    without a residual (tests/test_ops_library.py measures it); with a residual and no pool it
    saves the same tensors (x and the output are shared with the neighbouring layers anyway).
    Backward: BN/ReLU/pool/residual gradients fused, conv gradients via aten.convolution_backward.
    """
    stride_, padding_, _c_shape, bn_shape, _out_shape = _checks.conv_bn_act_args(
        x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding, zpool,
        training, momentum, eps)
    _checks.batch_count(bn_shape, training)
    if _backend.composite_path(x):
        return composite.conv_bn_act(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
                                     stride_, padding_, bool(training), float(momentum), float(eps), zpool,
                                     bool(relu))
    save = _checks.any_requires_grad(x, weight, conv_bias, bn_weight, bn_bias, residual)
    advance = training and running_mean is not None
    if advance:
        _running.current(running_mean, running_var)
    out, _c, _mean, _invstd, _var, next_mean, next_var = conv_bn_act_op(
        x, weight, conv_bias, bn_weight, bn_bias,
        None if training else running_mean, None if training else running_var, residual,
        stride_, padding_, bool(training), float(eps), zpool, bool(relu), save,
        running_mean if advance else None, running_var if advance else None, float(momentum), _backend.call_arg())
    if advance:
        _running.commit(running_mean, running_var, next_mean, next_var)
    return out
