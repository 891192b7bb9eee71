"""Composite CPU path: the fused ops as plain torch ops that autograd and inductor see through.

``auto`` sends every non-CUDA call here (see :func:`ahnet_fast.ops._backend.composite_path`).
The custom ops of ``_library.py`` are opaque: inductor can neither fold BN into the conv nor
fuse the elementwise tails around them, and their reference implementation spends extra
passes (BN as a mul and an add, out-of-place ReLU/add, a four-pass z-pool, a ~15-pass BN
backward). Here every piece is one native kernel:

* BN is ``F.batch_norm`` (one pass forward, torch's ~2-pass backward, running statistics
  updated in place with the unbiased variance and the caller's momentum factor, exactly the
  op contract);
* ReLU and the residual add run in place on tensors autograd does not save (BN saves its
  input, not its output; max-pool saves its input and indices);
* the z-pool is one ``amax`` over a (D/2, 2) view without autograd, and ``F.max_pool3d``
  with it (its tie/NaN routing is the op contract: first element on a tie, NaN wins);
* in training the activations stay channels_last_3d and so do their gradients: 1x1x1 convs
  take a GEMM backward (:class:`_PointwiseConv3d`; torch's conv backward answers them in
  NCDHW through slow_conv3d), and :func:`cat_channels` / :func:`conv3d` serve the model's own
  concatenations and plain convs the same way;
* in eval without autograd, BN is folded into the conv's weight and bias, cached per
  parameter set and rebuilt when any parameter or buffer changes (identity + ``_version``).
  A pool between conv and BN is folded through only when every BN scale is >= 0 (max and a
  negative scale do not commute). Under ``torch.compile`` nothing is cached: the plain ops
  go to inductor, whose freezing folds BN into the convs itself.

The explicit ``reference`` backend stays the custom-op oracle; this module is checked against
the same float64 oracle (tests/test_ops_composite.py).

Upstream defect kept away from gradients: torch 2.13's oneDNN conv3d backward on the CPU is
garbage where a kernel extent exceeds the input (ahnet_fast.ops.reference.
onednn_conv_backward_unsafe). Such convs run through :class:`_SafeConv3d`, whose backward is
``reference._conv_backward`` (torch's non-oneDNN kernel there).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import reference
from ._util import memory_format

__all__ = ["bn_act_conv", "cat_channels", "conv3d", "conv_bn_act", "zmaxpool"]

Tensor = torch.Tensor
_FOLD_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- helpers
CL = torch.channels_last_3d


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _follow(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` in the memory format ``fmt`` (a copy only where it is not already)."""
    if t.dim() != 5 or t.is_contiguous(memory_format=fmt):
        return t
    return t.contiguous(memory_format=fmt)


class _SafeConv3d(torch.autograd.Function):
    """conv3d whose backward avoids torch's broken oneDNN kernel (kernel larger than input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), bias is not None)
        return F.conv3d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        gx, gw, gb = reference._conv_backward(grad.contiguous(), x, weight, stride, padding, has_bias,
                                              ctx.needs_input_grad[:3])
        return gx, gw, gb, None, None


class _PointwiseConv3d(torch.autograd.Function):
    """1x1x1 conv of a channels_last_3d CPU tensor whose backward is two GEMMs.

    In channels_last_3d a 1x1x1 conv is (voxels, Cin) @ (Cin, Cout). torch's conv backward
    sends these to slow_conv3d, which copies the channels-last operands to NCDHW, multiplies,
    and returns the input gradient in NCDHW, so every backward op upstream (ReLU, residual
    adds, BN, the next conv) runs on mixed layouts. Measured on AMD EPYC, 1 thread, float32,
    batch 1: 148->80 at 64x64x32 335 ms -> 130 ms, 64->64 212 -> 48 ms, 256->64 at 32x32x16
    31.5 -> 13.8 ms, with bit-identical gradients (the same GEMMs without the copies). The
    forward stays oneDNN's (faster than the GEMM here). Zero padding (PSP's projections pad
    (1, 1, 0)) only adds border voxels that hold the bias: their gradient reaches the bias
    alone, so the GEMMs read the interior of the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), bias is not None)
        return torch.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1, 1, 1], 1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        s, p, has_bias = ctx.conf
        cout, cin = weight.shape[:2]
        xs = x[:, :, ::s[0], ::s[1], ::s[2]] if s != [1, 1, 1] else x
        gi = grad[:, :, p[0]:p[0] + xs.shape[2], p[1]:p[1] + xs.shape[3], p[2]:p[2] + xs.shape[4]] if any(p) else grad
        g2 = gi.permute(0, 2, 3, 4, 1).reshape(-1, cout)  # a view when grad is channels-last, unpadded
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gxs = (g2 @ weight.reshape(cout, cin)).view(*xs.shape[:1], *xs.shape[2:], cin).permute(0, 4, 1, 2, 3)
            if xs is x:
                gx = gxs
            else:
                gx = torch.zeros_like(x, memory_format=CL)
                gx[:, :, ::s[0], ::s[1], ::s[2]] = gxs
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ xs.permute(0, 2, 3, 4, 1).reshape(-1, cin)).view(weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3, 4))
        return gx, gw, gb, None, None


class _GradChannelsLast(torch.autograd.Function):
    """Identity whose backward hands the gradient on in channels_last_3d.

    For the convs whose backward is torch's (all but the 1x1x1 GEMM ones): it answers some
    channels-last inputs in NCDHW (small spatial sizes, several 3x3x1 shapes), and the op
    upstream then pays for the mismatch, sometimes on a large tensor (PSP's max-pool backward
    copied the 124-channel full-size input to match, 4 x 16 ms per step at 1x1x128x128x32).
    Converting the small gradient here costs little."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous(memory_format=CL)


def _grad_channels_last(x: Tensor) -> Tensor:
    """``x``, with its gradient handed on channels-last where ``x`` is channels-last (a copy
    only when torch's conv backward answered in NCDHW)."""
    if (torch.is_grad_enabled() and x.requires_grad and x.dim() == 5 and x.shape[1] > 1
            and x.is_contiguous(memory_format=CL) and not torch.compiler.is_compiling()):
        return _GradChannelsLast.apply(x)
    return x


def _pointwise_gemm(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
    """Whether :class:`_PointwiseConv3d` runs this training conv (float32 oneDNN calls only;
    padding with stride 1 only)."""
    return (x.dtype == torch.float32 and tuple(weight.shape[2:]) == (1, 1, 1)
            and (not any(padding) or all(st == 1 for st in stride)) and x.is_contiguous(memory_format=CL))


# below this many input voxels per sample a conv costs microseconds whichever kernel runs it:
# torch's own choice is kept there, so tiny deep levels round exactly like MONAI's convs
_ONEDNN_MIN_VOXELS = 512


def _onednn(x: Tensor) -> bool:
    """Call oneDNN's conv directly, in channels_last_3d. torch's own heuristic sends batch-1
    and 1x1x1 convs to slow_conv3d (im2col + GEMM), 2-7x slower here (AMD EPYC, 1 thread,
    AH-Net layer shapes: 148->80 1x1x1 at 64x64x32: 72 ms contiguous, 159 ms channels-last
    through F.conv3d, 41 ms through oneDNN channels-last; the stem 121 ms vs 47 ms). Under
    torch.compile F.conv3d is kept: inductor chooses oneDNN itself and folds BN into it."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not torch._C._get_mkldnn_enabled():
        return False
    if x.shape[2] * x.shape[3] * x.shape[4] < _ONEDNN_MIN_VOXELS:
        return False
    if x.dtype == torch.float32:
        return torch.backends.mkldnn.is_available()
    return x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# conv weight -> ((id, version), weight in channels_last_3d) for calls without autograd
_CL_WEIGHTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cl_weight(w: Tensor) -> Tensor:
    if w.is_contiguous(memory_format=CL) or _needs_grad(w):
        return w.contiguous(memory_format=CL)
    key = _version_key((w,), ())
    hit = _CL_WEIGHTS.get(w)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    wc = w.detach().contiguous(memory_format=CL)
    if key is not None:
        _CL_WEIGHTS[w] = (key, wc)
    return wc


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
          padding: Sequence[int], training: bool) -> Tensor:
    grad = _needs_grad(x, weight, bias)
    if grad and reference.onednn_conv_backward_unsafe(x, weight):
        if torch.compiler.is_compiling():
            # the safe backward switches oneDNN off, which dynamo cannot trace; the sweep behind
            # onednn_conv_backward_unsafe found float32 in NCDHW exact, so compiled graphs run
            # these (tiny) convs that way
            up = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            y = F.conv3d(x.contiguous().to(up), weight.contiguous().to(up), None if bias is None else bias.to(up),
                         list(stride), list(padding))
            return y.to(x.dtype)
        return _SafeConv3d.apply(x, weight, bias, list(stride), list(padding))
    # eval mode with autograd on (saliency maps, parity checks against MONAI) keeps torch's own
    # kernel choice, so its rounding is MONAI's conv for conv: a freshly initialised model in
    # eval mode amplifies activations to ~1e5 and a last-bit difference flips ReLU masks there
    # (gradients then differ by ~2e-4 from MONAI's while both are equally far from float64)
    if (training or not grad) and _onednn(x):
        if grad and _pointwise_gemm(x, weight, stride, padding):
            return _PointwiseConv3d.apply(x, weight.contiguous(memory_format=CL), bias, list(stride), list(padding))
        xc = x.contiguous(memory_format=CL)
        return torch.mkldnn_convolution(_grad_channels_last(xc), _cl_weight(weight), bias, list(padding),
                                        list(stride), [1, 1, 1], 1)
    y = F.conv3d(_grad_channels_last(x), weight, bias, list(stride), list(padding))
    # torch's slow_conv3d answers a channels-last input in NCDHW: restore the input's layout
    # here (tiny tensors), not after BN/ReLU/pool and again for every gradient
    return _follow(y, CL) if x.is_contiguous(memory_format=CL) and not torch.compiler.is_compiling() else y


def conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Sequence[int] = (1, 1, 1),
           padding: Sequence[int] = (0, 0, 0), training: bool = True) -> Tensor:
    """A plain conv3d (no BN) on the composite path's kernels: oneDNN in channels_last_3d, a
    GEMM backward for 1x1x1 (see :class:`_PointwiseConv3d`), the safe backward where torch's
    is wrong; ``training=False`` with autograd keeps torch's own kernel choice, as the fused
    ops do. x (N, Cin, H, W, D) -> (N, Cout, Ho, Wo, Do) in x's layout."""
    return _follow(_conv(x, weight, bias, stride, padding, training), memory_format(x))


def cat_channels(parts: Sequence[Tensor], fmt: torch.memory_format) -> Tensor:
    """``torch.cat(parts, dim=1)`` laid out in ``fmt`` (differentiable). torch.cat takes the
    layout of its first input, and a 1-channel tensor (a PSP map) reads as NCDHW: concatenating
    along the last axis of the channels-last permutation gives a channels_last_3d result and
    gradient slices that stay channels-last."""
    if fmt != CL or any(p.dim() != 5 for p in parts):
        return torch.cat([_follow(p, fmt) for p in parts], dim=1)
    return torch.cat([p.permute(0, 2, 3, 4, 1) for p in parts], dim=-1).permute(0, 4, 1, 2, 3)


def _batch_norm(y: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], training: bool, momentum: float, eps: float) -> Tensor:
    """F.batch_norm, with the running statistics updated outside the differentiable call.

    The normalisation itself never sees the running buffers in training, so activation
    checkpointing's recomputation (which passes none: it must not update them twice) saves
    exactly the tensors the forward saved. The update is the op contract: r = (1-m) r + m b
    with the unbiased batch variance, recovered from BN's own invstd (no second pass)."""
    if not training:
        return F.batch_norm(y, running_mean, running_var, weight, bias, False, 0.0, eps)
    out, mean, invstd = torch.native_batch_norm(y, weight, bias, None, None, True, 0.0, eps)
    if running_mean is not None and running_var is not None:
        n = y.numel() // y.shape[1]
        with torch.no_grad():
            var = invstd.detach().double().pow(-2).sub_(eps).mul_(n / max(n - 1, 1))
            running_mean.mul_(1.0 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return out


def zmax(t: Tensor) -> Tensor:
    """Max over z-pairs (..., D) -> (..., D // 2) in one pass; torch's tie/NaN rules."""
    d2 = t.shape[-1] // 2
    if _needs_grad(t):
        # max_pool3d routes the gradient like the op contract (first of a tie, the NaN);
        # amax would split it between tied elements
        return F.max_pool3d(t, (1, 1, 2))
    return t[..., :2 * d2].unflatten(-1, (d2, 2)).amax(-1)


def zmaxpool(x: Tensor) -> Tensor:
    return _follow(zmax(x), memory_format(x))


# ----------------------------------------------------------------------------- eval folding
# weight -> (key, folded weight, folded bias or None when the fold is not allowed). Keyed on the
# conv weight (a weak reference: the entry dies with the parameter); the key holds the identity
# and version of every tensor the fold reads, so an optimizer step, load_state_dict or .to()
# rebuilds it on the next call.
_FOLDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version_key(ts: Sequence[Optional[Tensor]], extra: tuple) -> Optional[tuple]:
    try:
        return tuple((id(t), t._version) if t is not None else None for t in ts) + extra
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None


def _fold(weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
          running_mean: Tensor, running_var: Tensor, eps: float, dtype: torch.dtype,
          pool_before: bool) -> Optional[tuple[Tensor, Tensor]]:
    """(weight * scale, (conv_bias - mean) * scale + beta) in ``dtype``; None where a pool sits
    between conv and BN and some scale is negative."""
    ts = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    key = _version_key(ts, (float(eps), dtype, pool_before))
    if key is not None:
        hit = _FOLDS.get(weight)
        if hit is not None and hit[0] == key:
            return hit[1]
    sdt = torch.float64  # fold in float64: the folded weights carry one rounding, as the unfolded chain
    invstd = torch.rsqrt(running_var.detach().to(sdt) + eps)
    scale = invstd if bn_weight is None else bn_weight.detach().to(sdt) * invstd
    if pool_before and bool((scale < 0).any()):
        res = None
    else:
        cb = conv_bias.detach().to(sdt) if conv_bias is not None else 0.0
        shift = (cb - running_mean.detach().to(sdt)) * scale
        if bn_bias is not None:
            shift = shift + bn_bias.detach().to(sdt)
        w = (weight.detach().to(sdt) * scale.view(-1, 1, 1, 1, 1)).to(dtype).contiguous(memory_format=CL)
        res = (w, shift.to(dtype))
    if key is not None:
        _FOLDS[weight] = (key, res)
    return res


def clear_cache() -> None:
    """Drop every cached eval-mode fold and channels-last weight (rebuilt on demand)."""
    _FOLDS.clear()
    _CL_WEIGHTS.clear()


# ----------------------------------------------------------------------------- conv -> BN -> act
def conv_bn_act(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], training: bool,
                momentum: float, eps: float, zpool: str, relu: bool) -> Tensor:
    """Same contract as :func:`ahnet_fast.ops.conv_bn_act` (arguments already validated)."""
    fmt = memory_format(x)
    grad = _needs_grad(x, weight, conv_bias, bn_weight, bn_bias, residual)
    if (not training and not grad and not torch.compiler.is_compiling() and x.dtype in _FOLD_DTYPES):
        assert running_mean is not None and running_var is not None
        folded = _fold(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, x.dtype,
                       zpool == "before_bn")
        if folded is not None:
            t = _conv(x, folded[0], folded[1], stride, padding, training)
            if zpool != "none":  # scale >= 0 (checked in _fold) or after the affine: pool commutes
                t = zmax(t)
            return _tail(t, residual, relu, fmt)
    c = _conv(x, weight, conv_bias, stride, padding, training)
    if zpool == "before_bn":
        c = zmax(c)
    t = _batch_norm(c, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if zpool == "after_bn":
        t = zmax(t)
    return _tail(t, residual, relu, fmt)


def _tail(t: Tensor, residual: Optional[Tensor], relu: bool, fmt: torch.memory_format) -> Tensor:
    # t is a fresh tensor no autograd node saves (BN and max-pool save their inputs, the conv
    # its input): the add and the ReLU may write into it
    if residual is not None:
        t = t.add_(residual)
    if relu:
        t = t.relu_()
    return _follow(t, fmt)


# ----------------------------------------------------------------------------- BN -> act -> conv
def bn_act_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], weight: Tensor, conv_bias: Optional[Tensor], stride: Sequence[int],
                padding: Sequence[int], training: bool, momentum: float, eps: float, relu: bool,
                out: Optional[Tensor] = None, out_channel_offset: int = 0) -> Tensor:
    """Same contract as :func:`ahnet_fast.ops.bn_act_conv` (arguments already validated).

    The BN cannot fold into the conv that follows it: the ReLU sits between them and the conv's
    zero padding is applied after BN+ReLU."""
    fmt = memory_format(x)
    z = _batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if relu:
        z = z.relu_()  # BN's backward reads its input, never its output
    o = _follow(_conv(z, weight, conv_bias, stride, padding, training), fmt)
    if out is not None:
        return out.narrow(1, out_channel_offset, o.shape[1]).copy_(o)
    return o
