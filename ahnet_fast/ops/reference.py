"""Reference backend: the fused ops written with plain torch ops.

This is the oracle the other backends are tested against and the CPU path. Every function has
the signature the op layer (``_library.py``) calls on every backend; semantics are those of

    nn.Conv3d -> [nn.MaxPool3d((1,1,2))] -> nn.BatchNorm3d -> [pool] -> [+ residual] -> [ReLU]
    nn.BatchNorm3d -> [ReLU] -> nn.Conv3d

with BN arithmetic in fp32 (float64 for float64 inputs) and outputs cast back to the input
dtype once, at the end. It never refuses an input (any device, floating dtype and strides).
Like every backend, functions return None for a result they did not compute; the op layer
(_library.py) turns those into markers and conforms dtypes and strides to the fakes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ._util import bcast, bn_affine, next_running_stats, running_stats, stat_dtype

NAME = "reference"
_RED = (0, 2, 3, 4)  # BN reduces over (N, H, W, D)


def availability() -> tuple[bool, str]:
    return True, "plain torch ops (always available; the oracle and the CPU path)"


def reasons(op: str, tensors: Sequence[Optional[torch.Tensor]]) -> list[str]:
    return []


def atomic_ops() -> frozenset[str]:
    # torch's own kernels honour torch.use_deterministic_algorithms themselves
    return frozenset()


# ----------------------------------------------------------------------------- z max-pool
def _pair_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d2 = t.shape[-1] // 2
    a = t[..., 0:2 * d2:2]
    b = t[..., 1:2 * d2:2]
    # torch's max_pool3d keeps the first element unless the second is greater or NaN
    # (`if (val > maxval || isnan(val))`): ties go to d=2j, a NaN takes the gradient.
    return a, b, (b > a) | torch.isnan(b)


def zmax(t: torch.Tensor) -> torch.Tensor:
    """max over z-pairs (d=2j, 2j+1): (..., D) -> (..., D//2), torch's tie/NaN rules."""
    a, b, b_wins = _pair_views(t)
    return torch.where(b_wins, b, a)


def zmax_backward(t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Route ``grad`` (..., D//2) to the pair element zmax(t) took; odd tail slice gets 0."""
    a, b, b_wins = _pair_views(t)
    out = torch.zeros_like(t, dtype=grad.dtype)
    d2 = t.shape[-1] // 2
    zero = grad.new_zeros(())
    out[..., 0:2 * d2:2] = torch.where(b_wins, zero, grad)
    out[..., 1:2 * d2:2] = torch.where(b_wins, grad, zero)
    return out


def zmaxpool_forward(x: torch.Tensor) -> torch.Tensor:
    return zmax(x)


def zmaxpool_backward(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    return zmax_backward(x, grad_y)


# ----------------------------------------------------------------------------- BN pieces
def _stats(y: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
           training: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, invstd, biased var) of the BN input: batch statistics or running statistics."""
    sdt = stat_dtype(y.dtype)
    if training:
        var, mean = torch.var_mean(y.to(sdt), dim=_RED, correction=0)
        return mean, torch.rsqrt(var + eps), var
    assert running_mean is not None and running_var is not None
    return running_stats(running_mean, running_var, eps, sdt)


def bn_act_backward(grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], out: Optional[torch.Tensor],
                    *, pool_after: bool, relu: bool, batch_stats: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of o = relu(pool(gamma*xhat + beta) [+ residual]), xhat = (y - mean)*invstd.

    Returns (grad_y [y.dtype], grad_gamma, grad_beta [stat dtype], g_s [stat dtype]) where g_s
    is the gradient of the pre-ReLU sum, i.e. the residual's gradient.
    """
    sdt = mean.dtype
    xhat = (y.to(sdt) - bcast(mean)) * bcast(invstd)
    g_s = grad_out.to(sdt)
    if relu:
        if out is not None:
            g_s = g_s * (out > 0)
        else:  # only valid without pool-after and residual: out > 0  <=>  t > 0
            scale, shift = bn_affine(mean, invstd, gamma, beta)
            g_s = g_s * ((y.to(sdt) * bcast(scale) + bcast(shift)) > 0)
    if pool_after:
        # route to the pair element the forward pool took (recomputed from t itself)
        g_t = zmax_backward(_affine(xhat, gamma, beta, sdt), g_s)
    else:
        g_t = g_s
    grad_beta = g_t.sum(dim=_RED)
    grad_gamma = (g_t * xhat).sum(dim=_RED)
    g = bcast(gamma.to(sdt)) if gamma is not None else 1.0
    if batch_stats:
        m = y.numel() // y.shape[1]
        grad_y = g * bcast(invstd) * (g_t - bcast(grad_beta) / m - xhat * bcast(grad_gamma) / m)
    else:
        grad_y = g * bcast(invstd) * g_t
    return grad_y.to(y.dtype), grad_gamma, grad_beta, g_s


def _affine(xhat: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
            sdt: torch.dtype) -> torch.Tensor:
    t = xhat if gamma is None else xhat * bcast(gamma.to(sdt))
    return t if beta is None else t + bcast(beta.to(sdt))


def onednn_conv_backward_unsafe(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where torch's CPU conv3d backward must not take its oneDNN path.

    Upstream behaviour (torch 2.13.0 CPU build; reproduced on AMD EPYC with AVX-512, see
    tests/test_cpu_conv_workaround.py): when a kernel extent is larger than the input along
    some axis (the 7x7x3 stem on a 7x5x4 input, a 3x3x1 conv on a 2x2xD input),
    oneDNN's ``convolution_backward`` reads uninitialised memory: the weight gradient is
    garbage (relative error 1e17 .. NaN) for float32 with any channels_last_3d operand and
    for bfloat16 in every layout, and some shapes abort with heap corruption or never return.
    A sweep of 1752 (kernel, input, stride, padding, channels, layout, dtype) cases found no
    failure where every kernel extent fits the input. torch's non-oneDNN kernel is exact on
    the same calls. Such inputs are tiny by construction (an axis shorter than the kernel),
    so the slower kernel costs nothing measurable, and no processor list or probe is needed:
    the route is taken on every CPU.
    """
    return x.device.type == "cpu" and any(k > s for k, s in zip(weight.shape[2:], x.shape[2:]))


def _conv_backward(grad_c: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                   padding: Sequence[int], has_bias: bool, mask: Sequence[bool]
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    if not any(mask):
        return None, None, None
    args = ([weight.shape[0]] if has_bias else None, list(stride), list(padding), [1, 1, 1], False, [0, 0, 0], 1,
            [bool(mask[0]), bool(mask[1]), bool(mask[2]) and has_bias])
    if not onednn_conv_backward_unsafe(x, weight):
        return torch.ops.aten.convolution_backward(grad_c, x, weight, *args)
    # torch's non-oneDNN CPU kernel, in fp32 for 16-bit inputs (its 16-bit variant accumulates
    # in 16 bits); the operands are tiny here, so neither choice costs anything measurable
    up = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    with without_onednn(True):
        grads = torch.ops.aten.convolution_backward(grad_c.to(up), x.to(up), weight.to(up), *args)
    dtypes = (x.dtype, weight.dtype, weight.dtype)
    return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, dtypes))


@contextlib.contextmanager
def without_onednn(active: bool) -> Iterator[None]:
    """torch's own (non-oneDNN) CPU convolution kernels inside, when ``active``. Only the
    "enabled" switch is touched (``torch.backends.mkldnn.flags`` would also reset the oneDNN
    TF32 setting and warn on every call)."""
    if not active:
        yield
        return
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _next_running(update: Optional[tuple], mean: torch.Tensor, var: torch.Tensor,
                  y: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if update is None:
        return None, None
    rm, rv, momentum = update
    return next_running_stats(rm, rv, mean, var, y.numel() // max(y.shape[1], 1), momentum)


# ----------------------------------------------------------------------------- conv -> BN -> act
def conv_bn_act_forward(x: torch.Tensor, weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                        bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                        residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                        training: bool, eps: float, zpool: str, relu: bool, save: bool,
                        update: Optional[tuple] = None) -> tuple[Optional[torch.Tensor], ...]:
    """(out, c or None, mean, invstd, var, next_running_mean, next_running_var); ``update`` =
    (running_mean, running_var, momentum) of a training BN whose next running statistics are
    returned (None otherwise; the buffers are not written)."""
    c = F.conv3d(x, weight, conv_bias, list(stride), list(padding))
    y = zmax(c) if zpool == "before_bn" else c
    mean, invstd, var = _stats(y, running_mean, running_var, training, eps)
    nxt = _next_running(update, mean, var, y)
    scale, shift = bn_affine(mean, invstd, bn_weight, bn_bias)
    t = y.to(mean.dtype) * bcast(scale) + bcast(shift)
    if zpool == "after_bn":
        t = zmax(t)
    if residual is not None:
        t = t + residual.to(t.dtype)
    if relu:
        t = torch.relu(t)
    return (t.to(x.dtype), (c if save else None), mean, invstd, var, *nxt)


def conv_bn_act_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, c: torch.Tensor,
                         mean: torch.Tensor, invstd: torch.Tensor, bn_weight: Optional[torch.Tensor],
                         bn_bias: Optional[torch.Tensor], out: Optional[torch.Tensor], stride: Sequence[int],
                         padding: Sequence[int], training: bool, zpool: str, relu: bool, has_residual: bool,
                         has_conv_bias: bool, output_mask: Sequence[bool]) -> tuple[Optional[torch.Tensor], ...]:
    y = zmax(c) if zpool == "before_bn" else c
    grad_y, g_gamma, g_beta, g_s = bn_act_backward(
        grad_out, y, mean, invstd, bn_weight, bn_bias, out,
        pool_after=zpool == "after_bn", relu=relu, batch_stats=training)
    grad_c = zmax_backward(c, grad_y) if zpool == "before_bn" else grad_y
    gx, gw, gb = _conv_backward(grad_c, x, weight, stride, padding, has_conv_bias, output_mask[:3])
    return gx, gw, gb, g_gamma, g_beta, g_s


# ----------------------------------------------------------------------------- BN -> act -> conv
def _pre_activation(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, bn_weight: Optional[torch.Tensor],
                    bn_bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    scale, shift = bn_affine(mean, invstd, bn_weight, bn_bias)
    z = x.to(mean.dtype) * bcast(scale) + bcast(shift)
    if relu:
        z = torch.relu(z)
    return z.to(x.dtype)


def _out_affine(o: torch.Tensor, out_affine: Optional[tuple]) -> torch.Tensor:
    """relu(o * scale + shift) per channel (the relu iff out_affine[2]), in the BN's precision."""
    if out_affine is None:
        return o
    scale, shift, relu = out_affine
    sd = stat_dtype(o.dtype)
    t = o.to(sd) * bcast(scale.to(sd)) + bcast(shift.to(sd))
    return (torch.relu(t) if relu else t).to(o.dtype)


def bn_act_conv_forward(x: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                        weight: torch.Tensor, conv_bias: Optional[torch.Tensor], stride: Sequence[int],
                        padding: Sequence[int], training: bool, eps: float, relu: bool,
                        out: Optional[torch.Tensor] = None, out_channel_offset: int = 0,
                        residual: Optional[torch.Tensor] = None, update: Optional[tuple] = None,
                        stats: Optional[torch.Tensor] = None, next_bn: Optional[tuple] = None,
                        pre_activated: bool = False, out_affine: Optional[tuple] = None
                        ) -> tuple[Optional[torch.Tensor], ...]:
    """(out, mean, invstd, var, next_running_mean, next_running_var, out_stats, out_next_running_mean,
    out_next_running_var); ``stats``/``next_bn``/``pre_activated``/``out_affine`` as in the fused
    pipeline (_fused.py): x's given (5, Cin) statistics, the next BN's statistics of the output,
    an input that is already the activation, the next layer's eval BN (+ReLU) on the output."""
    if pre_activated:
        o = F.conv3d(x, weight, conv_bias, list(stride), list(padding))
        o = _out_affine(o.add_(residual) if residual is not None else o, out_affine)
        if out is not None:
            out.narrow(1, out_channel_offset, o.shape[1]).copy_(o)
        return (o if out is None else out, None, None, None, None, None, None, None, None)
    if training and stats is not None:
        mean, var, invstd = stats[0], stats[1], stats[2]
        nxt: tuple = (None, None)
    else:
        mean, invstd, var = _stats(x, running_mean, running_var, training, eps)
        nxt = _next_running(update, mean, var, x)
    z = _pre_activation(x, mean, invstd, bn_weight, bn_bias, relu)
    # zero padding is applied by the conv to z, i.e. after the BN+ReLU transform
    o = F.conv3d(z, weight, conv_bias, list(stride), list(padding))
    if residual is not None:
        o = o.add_(residual)
    o = _out_affine(o, out_affine)
    ostats: tuple = (None, None, None)
    if next_bn is not None:
        gamma, beta, neps, nrm, nrv, nmom = next_bn
        omean, oinvstd, ovar = _stats(o, None, None, True, neps)
        oscale, oshift = bn_affine(omean, oinvstd, gamma, beta)
        ostats = (torch.stack([omean, ovar, oinvstd, oscale, oshift]),
                  *_next_running(None if nrm is None else (nrm, nrv, nmom), omean, ovar, o))
    if out is not None:
        out.narrow(1, out_channel_offset, o.shape[1]).copy_(o)
        return (out, mean, invstd, var, *nxt, *ostats)
    return (o, mean, invstd, var, *nxt, *ostats)


def bn_act_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, bn_weight: Optional[torch.Tensor],
                         bn_bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                         weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], training: bool,
                         relu: bool, has_conv_bias: bool, output_mask: Sequence[bool],
                         add_grad: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients of bn_act_conv; ``add_grad`` (x's shape: x was also the residual) is summed
    into grad_x."""
    z = _pre_activation(x, mean, invstd, bn_weight, bn_bias, relu)  # recomputed, transient
    need_bn = output_mask[0] or output_mask[1] or output_mask[2]
    gz, gw, gb = _conv_backward(grad_out, z, weight, stride, padding, has_conv_bias,
                                [need_bn, output_mask[3], output_mask[4]])
    gx = g_gamma = g_beta = None
    if need_bn:
        assert gz is not None
        gx, g_gamma, g_beta, _ = bn_act_backward(gz, x, mean, invstd, bn_weight, bn_bias, None,
                                                 pool_after=False, relu=relu, batch_stats=training)
    if add_grad is not None and output_mask[0]:
        gx = add_grad.to(x.dtype).clone() if gx is None else gx + add_grad
    return gx, g_gamma, g_beta, gw, gb


# ----------------------------------------------------------------------------- BN pieces as ops
# (the synchronized BatchNorm, ahnet_fast/ops/sync_bn.py, strings these together with the
# collectives in between: local statistics -> all-reduce -> apply; local gradient sums ->
# all-reduce -> finish)
def bn_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) over (N, H, W, D) of ``y``, in the statistics dtype."""
    var, mean = torch.var_mean(y.to(stat_dtype(y.dtype)), dim=_RED, correction=0)
    return mean, var


def bn_apply(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Optional[torch.Tensor],
             pool_after: bool, relu: bool) -> torch.Tensor:
    """``relu(pool(y*scale + shift) + residual)`` computed in the dtype of ``scale``, cast to y's."""
    t = y.to(scale.dtype) * bcast(scale) + bcast(shift)
    if pool_after:
        t = zmax(t)
    if residual is not None:
        t = t + residual.to(t.dtype)
    if relu:
        t = torch.relu(t)
    return t.to(y.dtype)


def bn_backward(grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], out: Optional[torch.Tensor],
                pool_after: bool, relu: bool, batch_stats: bool, residual_grad: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """:func:`bn_act_backward` with the backend signature: (grad_y, grad_gamma or None, grad_beta,
    grad_residual or None)."""
    gy, gg, gb, g_s = bn_act_backward(grad_out, y, mean, invstd, gamma, beta, out,
                                      pool_after=pool_after, relu=relu, batch_stats=batch_stats)
    return gy, (gg if gamma is not None else None), gb, (g_s.to(grad_out.dtype) if residual_grad else None)
