"""torch.library registration of the fused ops (namespace ``ahnet_fast``): schemas, fakes, autograd.

Each op is a functional custom op whose implementation picks a backend at run time
(``_backend.select``) and whose outputs are then conformed to exactly what the fake promises
(dtype, shape, strides), so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` hold
for every backend. Autograd wraps the ops (``register_autograd``); the backward passes are ops
themselves, so AOTAutograd traces them as opaque calls too.

Ops (all tensors (N, C, H, W, D); "marker" = a 0-element tensor for a result not computed):

* ``zmaxpool(x, backend) -> y`` and ``zmaxpool_backward(x, grad_y, backend) -> grad_x``
* ``conv_bn_act(x, weight, conv_bias?, bn_weight?, bn_bias?, running_mean?, running_var?,
  residual?, stride, padding, training, eps, zpool, relu, save, update_mean?, update_var?,
  momentum, backend) -> (out, c, mean, invstd, var, next_mean, next_var)``; ``c`` = conv(x)+bias
  before any pool (saved for backward, a marker unless ``save``); mean/invstd/var (biased) of
  the BN input, fp32 (float64 for float64 input): batch statistics when training, else from the
  running statistics. ``update_mean/update_var`` (training): the running statistics to advance;
  their next values (``r + momentum*(batch - r)``, unbiased variance, as F.batch_norm) come back
  as next_mean/next_var (markers otherwise) and the caller writes them (ops/_running.py): an op
  with autograd must be functional, so it cannot write the buffers itself.
* ``conv_bn_act_backward(...) -> (grad_x, grad_weight, grad_conv_bias, grad_bn_weight,
  grad_bn_bias, grad_residual)`` (markers where output_mask is False or the input is absent)
* ``bn_act_conv(x, bn_weight?, bn_bias?, running_mean?, running_var?, weight, conv_bias?,
  residual?, stride, padding, training, eps, relu, update_mean?, update_var?, momentum, stats?,
  next_bn_weight?, next_bn_bias?, next_update_mean?, next_update_var?, next_eps, next_momentum,
  next_stats, backend) -> (out, mean, invstd, var, next_mean, next_var, out_stats,
  out_next_mean, out_next_var)``; ``out = conv(relu(bn(x))) + residual`` (the residual added in
  the conv's epilogue). A chain of these (the Pseudo3D layer) hands BN statistics down without
  a statistics pass: with ``next_stats`` the op also returns ``out_stats``, the (5, Cout) rows
  (mean, var, invstd, scale, shift) of the BN that reads ``out`` next (its parameters and running
  statistics given as ``next_*``; its next running statistics come back as out_next_*), from
  this conv's epilogue; the next op takes them as ``stats`` (training), and then returns markers
  for mean/invstd/var (outputs may not alias inputs).
* ``bn_act_conv_into(..., out!, out_channel_offset, update_mean?, update_var?, momentum,
  pre_activated, out_scale?, out_shift?, out_relu, backend) -> (mean, invstd, var, next_mean,
  next_var)``: writes into ``out[:, off:off+Cout]`` (mutates ``out``; no autograd; inference).
  ``pre_activated``: x is already relu(bn(.)) (no BN arguments, mean/invstd/var are markers);
  ``out_scale/out_shift/out_relu``: the eval-mode BN (+ReLU) of the next pre-activation layer
  applied in the conv's epilogue, so that layer's conv reads an activated input.
* ``bn_act_conv_backward(...) -> (grad_x, grad_bn_weight, grad_bn_bias, grad_weight, grad_conv_bias)``
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend
from ._util import (conv_grad_format, conv_out_shape, empty5, empty_marker, is_supported_layout, memory_format,
                    restride, stat_dtype)

NS = "ahnet_fast"


# ----------------------------------------------------------------------------- shared helpers
def _stat_empty(x: Tensor, c: int) -> Tensor:
    return torch.empty((c,), dtype=stat_dtype(x.dtype), device=x.device)


def _conform(t: Optional[Tensor], like: Tensor, fmt: Optional[torch.memory_format] = None,
             dtype: Optional[torch.dtype] = None, want: bool = True) -> Tensor:
    """Backend result -> the exact output the fake describes (marker when absent/unwanted)."""
    if t is None or not want:
        return empty_marker(like)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if fmt is not None:
        t = restride(t, fmt)
    elif not t.is_contiguous():
        t = t.contiguous()
    return t


def _unalias(outs: tuple, inputs: Sequence[Optional[Tensor]]) -> tuple:
    """Custom ops may not return an input or a view of one (e.g. a residual gradient that is
    grad_out itself when no ReLU masks it): copy such outputs, and duplicates among outputs."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        res.append(t)
    return tuple(res)


def _weight_format(w: Tensor) -> torch.memory_format:
    """The layout of a weight's gradient: the weight's own (what AccumulateGrad keeps without a
    copy), except on a CPU, whose conv backward returns weight gradients NCDHW
    (``conv_grad_format``). A weight that is both contiguous and channels-last (every 1x1x1
    conv) keeps the strides parameters are created with."""
    if w.is_contiguous() or conv_grad_format(w) == torch.contiguous_format:
        return torch.contiguous_format
    return memory_format(w)


def _running_update(mean: Optional[Tensor], var: Optional[Tensor], momentum: float) -> Optional[tuple]:
    """The (running_mean, running_var, momentum) whose next values a training forward returns."""
    if mean is None and var is None:
        return None
    if mean is None or var is None:
        raise ValueError("update_mean and update_var must be given together")
    return mean, var, float(momentum)


def _conform_next(next_mean: Optional[Tensor], next_var: Optional[Tensor], update_mean: Optional[Tensor],
                  update_var: Optional[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """The next running statistics as outputs: the buffers' dtype, markers when not advanced."""
    if update_mean is None or next_mean is None:
        return empty_marker(x), empty_marker(x)
    return _conform(next_mean, x, dtype=update_mean.dtype), _conform(next_var, x, dtype=update_var.dtype)


def _next_fake(update_mean: Optional[Tensor], update_var: Optional[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    if update_mean is None:
        return empty_marker(x), empty_marker(x)
    return torch.empty_like(update_mean), torch.empty_like(update_var)


def _grad_in(g: Tensor, ref: Tensor) -> Tensor:
    """Incoming gradients may be expanded/odd-strided: give backends one of the two layouts."""
    if is_supported_layout(g):
        return g
    return g.contiguous(memory_format=memory_format(ref))


def _pooled_shapes(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], zpool: str) -> tuple[list[int], list[int]]:
    c_shape = conv_out_shape(x_shape, w_shape, stride, padding)
    out_shape = list(c_shape)
    if zpool != "none":
        out_shape[-1] = c_shape[-1] // 2
    return c_shape, out_shape


# ----------------------------------------------------------------------------- zmaxpool
@torch.library.custom_op(f"{NS}::zmaxpool", mutates_args=())
def zmaxpool_op(x: Tensor, backend: str) -> Tensor:
    impl = _backend.select("zmaxpool", backend, [x], run=lambda m: m.zmaxpool_forward(x))
    return _conform(impl.zmaxpool_forward(x), x, memory_format(x))


@zmaxpool_op.register_fake
def _zmaxpool_fake(x: Tensor, backend: str) -> Tensor:
    return empty5((*x.shape[:4], x.shape[4] // 2), x, memory_format(x))


@torch.library.custom_op(f"{NS}::zmaxpool_backward", mutates_args=())
def zmaxpool_backward_op(x: Tensor, grad_y: Tensor, backend: str) -> Tensor:
    impl = _backend.select("zmaxpool", backend, [x, grad_y])
    return _unalias((_conform(impl.zmaxpool_backward(x, grad_y), x, memory_format(x), x.dtype),), [x, grad_y])[0]


@zmaxpool_backward_op.register_fake
def _zmaxpool_backward_fake(x: Tensor, grad_y: Tensor, backend: str) -> Tensor:
    return empty5(x.shape, x, memory_format(x))


def _zmaxpool_setup(ctx, inputs, output) -> None:
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _zmaxpool_bwd(ctx, grad_y: Tensor):
    (x,) = ctx.saved_tensors
    return zmaxpool_backward_op(x, _grad_in(grad_y, x), ctx.backend), None


zmaxpool_op.register_autograd(_zmaxpool_bwd, setup_context=_zmaxpool_setup)


# ----------------------------------------------------------------------------- conv -> BN -> act
@torch.library.custom_op(f"{NS}::conv_bn_act", mutates_args=())
def conv_bn_act_op(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   residual: Optional[Tensor], stride: list[int], padding: list[int], training: bool,
                   eps: float, zpool: str, relu: bool, save: bool, update_mean: Optional[Tensor],
                   update_var: Optional[Tensor], momentum: float, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    def run(impl):
        return impl.conv_bn_act_forward(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                        residual, stride, padding, training, eps, zpool, relu, save,
                                        update=_running_update(update_mean, update_var, momentum))

    impl = _backend.select("conv_bn_act", backend, [x, weight, conv_bias, bn_weight, bn_bias, running_mean,
                                                    running_var, residual, update_mean, update_var],
                           variant=(training, save, relu, zpool, tuple(stride), residual is not None), run=run)
    out, c, mean, invstd, var, next_mean, next_var = run(impl)
    fmt = memory_format(x)
    sdt = stat_dtype(x.dtype)
    return _unalias((_conform(out, x, fmt, x.dtype), _conform(c, x, fmt, x.dtype, want=save),
                     _conform(mean, x, dtype=sdt), _conform(invstd, x, dtype=sdt), _conform(var, x, dtype=sdt),
                     *_conform_next(next_mean, next_var, update_mean, update_var, x)),
                    [x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
                     update_mean, update_var])


@conv_bn_act_op.register_fake
def _conv_bn_act_fake(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
                      stride, padding, training, eps, zpool, relu, save, update_mean, update_var, momentum,
                      backend):
    fmt = memory_format(x)
    c_shape, out_shape = _pooled_shapes(x.shape, weight.shape, stride, padding, zpool)
    c = empty5(c_shape, x, fmt) if save else empty_marker(x)
    co = weight.shape[0]
    return (empty5(out_shape, x, fmt), c, _stat_empty(x, co), _stat_empty(x, co), _stat_empty(x, co),
            *_next_fake(update_mean, update_var, x))


@torch.library.custom_op(f"{NS}::conv_bn_act_backward", mutates_args=())
def conv_bn_act_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, c: Tensor, mean: Tensor,
                            invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            out: Optional[Tensor], stride: list[int], padding: list[int], training: bool,
                            zpool: str, relu: bool, has_residual: bool, has_conv_bias: bool,
                            output_mask: list[bool], backend: str
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.select("conv_bn_act", backend, [x, weight, grad_out, c, bn_weight, bn_bias, out])
    grads = impl.conv_bn_act_backward(grad_out, x, weight, c, mean, invstd, bn_weight, bn_bias, out,
                                      stride, padding, training, zpool, relu, has_residual,
                                      has_conv_bias, output_mask)
    return _unalias(_conform_cba_grads(grads, x, weight, bn_weight, bn_bias, has_residual, has_conv_bias,
                                       output_mask), [grad_out, x, weight, c, mean, invstd, bn_weight, bn_bias, out])


def _cba_grad_specs(x, weight, bn_weight, bn_bias, has_residual, has_conv_bias, output_mask):
    """(shape, fmt, dtype, wanted) of each conv_bn_act gradient, shared by the impl and the fake."""
    fmt = memory_format(x)
    co = weight.shape[0]
    present = [True, True, has_conv_bias, bn_weight is not None, bn_bias is not None, has_residual]
    return [
        (tuple(x.shape), conv_grad_format(x), x.dtype),  # straight from the conv backward
        (tuple(weight.shape), _weight_format(weight), weight.dtype),
        ((co,), None, weight.dtype),
        ((co,), None, bn_weight.dtype if bn_weight is not None else x.dtype),
        ((co,), None, bn_bias.dtype if bn_bias is not None else x.dtype),
        (None, fmt, x.dtype),  # residual: shape of the output, known from the backend result
    ], [bool(m) and p for m, p in zip(output_mask, present)]


def _conform_cba_grads(grads, x, weight, bn_weight, bn_bias, has_residual, has_conv_bias, output_mask):
    specs, wanted = _cba_grad_specs(x, weight, bn_weight, bn_bias, has_residual, has_conv_bias, output_mask)
    return tuple(_conform(g, x, fmt, dt, want=w) for g, (_, fmt, dt), w in zip(grads, specs, wanted))


@conv_bn_act_backward_op.register_fake
def _conv_bn_act_backward_fake(grad_out, x, weight, c, mean, invstd, bn_weight, bn_bias, out, stride,
                               padding, training, zpool, relu, has_residual, has_conv_bias, output_mask,
                               backend):
    specs, wanted = _cba_grad_specs(x, weight, bn_weight, bn_bias, has_residual, has_conv_bias, output_mask)
    res = []
    for (shape, fmt, dt), w in zip(specs, wanted):
        if not w:
            res.append(empty_marker(x))
            continue
        shape = tuple(grad_out.shape) if shape is None else shape
        if fmt is None or len(shape) != 5:
            res.append(torch.empty(shape, dtype=dt, device=x.device))
        else:
            res.append(torch.empty(shape, dtype=dt, device=x.device, memory_format=fmt))
    return tuple(res)


def _cba_setup(ctx, inputs, output) -> None:
    (x, weight, conv_bias, bn_weight, bn_bias, _rm, _rv, residual, stride, padding, training, _eps,
     zpool, relu, save, _um, _uv, _momentum, backend) = inputs
    out, c, mean, invstd, var, next_mean, next_var = output
    ctx.mark_non_differentiable(c, mean, invstd, var, next_mean, next_var)
    ctx.set_materialize_grads(False)
    # Saved: x and weight (conv grads), c = conv output before any pool, the per-channel stats,
    # the BN affine params, and `out` only when the ReLU mask cannot be recomputed from c
    # (a residual or a pool after the BN sits between the affine and the ReLU).
    keep_out = relu and (residual is not None or zpool == "after_bn")
    ctx.save_for_backward(x, weight, c, mean, invstd, bn_weight, bn_bias, out if keep_out else None)
    ctx.params = (list(stride), list(padding), training, zpool, relu, residual is not None,
                  conv_bias is not None, save, backend)


def _cba_backward(ctx, grad_out: Optional[Tensor], *_unused):
    none19 = (None,) * 19
    if grad_out is None:
        return none19
    x, weight, c, mean, invstd, bn_weight, bn_bias, out = ctx.saved_tensors
    stride, padding, training, zpool, relu, has_res, has_bias, save, backend = ctx.params
    if not save:
        raise RuntimeError("ahnet_fast::conv_bn_act was called with save=False but a gradient is needed; "
                           "call it through ahnet_fast.ops.conv_bn_act, which sets save itself")
    nig = ctx.needs_input_grad
    mask = [nig[0], nig[1], nig[2], nig[3], nig[4], nig[7]]
    if not any(mask):
        return none19
    grads = conv_bn_act_backward_op(_grad_in(grad_out, x), x, weight, c, mean, invstd, bn_weight, bn_bias, out,
                                    stride, padding, training, zpool, relu, has_res, has_bias, mask, backend)
    gx, gw, gb, gg, gbeta, gres = (g if m else None for g, m in zip(grads, mask))
    return (gx, gw, gb, gg, gbeta, None, None, gres) + (None,) * 11


conv_bn_act_op.register_autograd(_cba_backward, setup_context=_cba_setup)


# ----------------------------------------------------------------------------- BN -> act -> conv
@torch.library.custom_op(f"{NS}::bn_act_conv", mutates_args=())
def bn_act_conv_op(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor,
                   conv_bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int], padding: list[int],
                   training: bool, eps: float, relu: bool, update_mean: Optional[Tensor],
                   update_var: Optional[Tensor], momentum: float, stats: Optional[Tensor],
                   next_bn_weight: Optional[Tensor], next_bn_bias: Optional[Tensor],
                   next_update_mean: Optional[Tensor], next_update_var: Optional[Tensor], next_eps: float,
                   next_momentum: float, next_stats: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    next_bn = ((next_bn_weight, next_bn_bias, float(next_eps), next_update_mean, next_update_var,
                float(next_momentum)) if next_stats else None)
    given = training and stats is not None

    def run(impl):
        return impl.bn_act_conv_forward(
            x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride, padding, training, eps,
            relu, residual=residual, update=_running_update(update_mean, update_var, momentum),
            stats=stats if given else None, next_bn=next_bn)

    impl = _backend.select("bn_act_conv", backend, [x, weight, conv_bias, bn_weight, bn_bias, running_mean,
                                                    running_var, residual, update_mean, update_var],
                           variant=(training, relu, tuple(stride), residual is not None, given, next_stats),
                           run=run)
    out, mean, invstd, var, next_mean, next_var, o_stats, o_next_mean, o_next_var = run(impl)
    sdt = stat_dtype(x.dtype)
    # given statistics are not returned again (outputs may not alias inputs): markers
    return _unalias((_conform(out, x, memory_format(x), x.dtype), _conform(mean, x, dtype=sdt, want=not given),
                     _conform(invstd, x, dtype=sdt, want=not given), _conform(var, x, dtype=sdt, want=not given),
                     *_conform_next(next_mean, next_var, update_mean, update_var, x),
                     _conform(o_stats, x, dtype=sdt, want=next_stats),
                     *_conform_next(o_next_mean, o_next_var, next_update_mean, next_update_var, x)),
                    [x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, residual,
                     update_mean, update_var, stats, next_bn_weight, next_bn_bias, next_update_mean, next_update_var])


@bn_act_conv_op.register_fake
def _bn_act_conv_fake(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, residual, stride,
                      padding, training, eps, relu, update_mean, update_var, momentum, stats, next_bn_weight,
                      next_bn_bias, next_update_mean, next_update_var, next_eps, next_momentum, next_stats, backend):
    shape = conv_out_shape(x.shape, weight.shape, stride, padding)
    given = training and stats is not None
    st = (lambda: empty_marker(x)) if given else (lambda: _stat_empty(x, x.shape[1]))
    co = weight.shape[0]
    o_stats = torch.empty((5, co), dtype=stat_dtype(x.dtype), device=x.device) if next_stats else empty_marker(x)
    o_next = _next_fake(next_update_mean, next_update_var, x) if next_stats else (empty_marker(x), empty_marker(x))
    return (empty5(shape, x, memory_format(x)), st(), st(), st(), *_next_fake(update_mean, update_var, x),
            o_stats, *o_next)


@torch.library.custom_op(f"{NS}::bn_act_conv_into", mutates_args=("out",))
def bn_act_conv_into_op(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor,
                        conv_bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
                        padding: list[int], training: bool, eps: float, relu: bool, out: Tensor,
                        out_channel_offset: int, update_mean: Optional[Tensor], update_var: Optional[Tensor],
                        momentum: float, pre_activated: bool, out_scale: Optional[Tensor],
                        out_shift: Optional[Tensor], out_relu: bool,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.select("bn_act_conv", backend, [x, weight, conv_bias, bn_weight, bn_bias,
                                                    running_mean, running_var, out, residual, update_mean,
                                                    update_var, out_scale, out_shift])
    out_affine = (out_scale, out_shift, bool(out_relu)) if out_scale is not None else None
    _, mean, invstd, var, next_mean, next_var, *_ = impl.bn_act_conv_forward(
        x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride, padding, training, eps, relu,
        out, out_channel_offset, residual=residual, update=_running_update(update_mean, update_var, momentum),
        pre_activated=bool(pre_activated), out_affine=out_affine)
    sdt = stat_dtype(x.dtype)
    want = not pre_activated   # an activated input has no BN of its own: markers
    return _unalias((_conform(mean, x, dtype=sdt, want=want), _conform(invstd, x, dtype=sdt, want=want),
                     _conform(var, x, dtype=sdt, want=want),
                     *_conform_next(next_mean, next_var, update_mean, update_var, x)),
                    [x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, residual, out,
                     update_mean, update_var, out_scale, out_shift])


@bn_act_conv_into_op.register_fake
def _bn_act_conv_into_fake(x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, residual, stride,
                           padding, training, eps, relu, out, out_channel_offset, update_mean, update_var,
                           momentum, pre_activated, out_scale, out_shift, out_relu, backend):
    st = (lambda: empty_marker(x)) if pre_activated else (lambda: _stat_empty(x, x.shape[1]))
    return (st(), st(), st(), *_next_fake(update_mean, update_var, x))


@torch.library.custom_op(f"{NS}::bn_act_conv_backward", mutates_args=())
def bn_act_conv_backward_op(grad_out: Tensor, x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                            mean: Tensor, invstd: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                            training: bool, relu: bool, has_conv_bias: bool, output_mask: list[bool],
                            add_grad: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``add_grad``: a further gradient of x (x was also the forward's residual) summed into
    grad_x by the BN backward's apply pass."""
    impl = _backend.select("bn_act_conv", backend, [x, weight, grad_out, bn_weight, bn_bias, add_grad])
    grads = impl.bn_act_conv_backward(grad_out, x, bn_weight, bn_bias, mean, invstd, weight, stride, padding,
                                      training, relu, has_conv_bias, output_mask, add_grad=add_grad)
    specs, wanted = _bac_grad_specs(x, weight, bn_weight, bn_bias, has_conv_bias, output_mask)
    return _unalias(tuple(_conform(g, x, fmt, dt, want=w) for g, (_, fmt, dt), w in zip(grads, specs, wanted)),
                    [grad_out, x, bn_weight, bn_bias, mean, invstd, weight, add_grad])


def _bac_grad_specs(x, weight, bn_weight, bn_bias, has_conv_bias, output_mask):
    ci, co = x.shape[1], weight.shape[0]
    specs = [
        (tuple(x.shape), memory_format(x), x.dtype),
        ((ci,), None, bn_weight.dtype if bn_weight is not None else x.dtype),
        ((ci,), None, bn_bias.dtype if bn_bias is not None else x.dtype),
        (tuple(weight.shape), _weight_format(weight), weight.dtype),
        ((co,), None, weight.dtype),
    ]
    present = [True, bn_weight is not None, bn_bias is not None, True, has_conv_bias]
    return specs, [bool(m) and p for m, p in zip(output_mask, present)]


@bn_act_conv_backward_op.register_fake
def _bn_act_conv_backward_fake(grad_out, x, bn_weight, bn_bias, mean, invstd, weight, stride, padding, training,
                               relu, has_conv_bias, output_mask, add_grad, backend):
    specs, wanted = _bac_grad_specs(x, weight, bn_weight, bn_bias, has_conv_bias, output_mask)
    res = []
    for (shape, fmt, dt), w in zip(specs, wanted):
        if not w:
            res.append(empty_marker(x))
        elif fmt is None:
            res.append(torch.empty(shape, dtype=dt, device=x.device))
        else:
            res.append(torch.empty(shape, dtype=dt, device=x.device, memory_format=fmt))
    return tuple(res)


def _bac_setup(ctx, inputs, output) -> None:
    (x, bn_weight, bn_bias, _rm, _rv, weight, conv_bias, _res, stride, padding, training, _eps, relu,
     _um, _uv, _momentum, stats, _nw, _nb, _num, _nuv, _neps, _nmom, _nstats, backend) = inputs
    out, mean, invstd, var, next_mean, next_var, o_stats, o_next_mean, o_next_var = output
    ctx.mark_non_differentiable(mean, invstd, var, next_mean, next_var, o_stats, o_next_mean, o_next_var)
    ctx.set_materialize_grads(False)
    if training and stats is not None:  # the statistics the forward was given (rows mean, var, invstd, ...)
        mean, invstd = stats[0], stats[2]
    # x also fed the residual (the Pseudo3D sum x3x3x1 + conv(x3x3x1)): its two gradients are
    # summed by the BN backward's apply pass instead of by autograd (a pass of its own)
    ctx.residual_is_x = _res is x
    # Saved: x, the per-channel stats, the BN affine params and the conv weight; the activation
    # z = relu(bn(x)) is recomputed transiently in backward instead of being stored.
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, weight)
    ctx.params = (list(stride), list(padding), training, relu, conv_bias is not None, backend)


def _bac_backward(ctx, grad_out: Optional[Tensor], *_unused):
    if grad_out is None:
        return (None,) * 25
    x, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
    stride, padding, training, relu, has_bias, backend = ctx.params
    nig = ctx.needs_input_grad
    g_res = grad_out if nig[7] else None  # out = conv(...) + residual
    mask = [nig[0], nig[1], nig[2], nig[5], nig[6]]
    if not any(mask):
        return (None,) * 7 + (g_res,) + (None,) * 17
    add = None
    if ctx.residual_is_x and nig[0] and g_res is not None:
        add, g_res = _grad_in(grad_out, x), None
    grads = bn_act_conv_backward_op(_grad_in(grad_out, x), x, bn_weight, bn_bias, mean, invstd, weight, stride,
                                    padding, training, relu, has_bias, mask, add, backend)
    gx, gg, gbeta, gw, gb = (g if m else None for g, m in zip(grads, mask))
    return (gx, gg, gbeta, None, None, gw, gb, g_res) + (None,) * 17


bn_act_conv_op.register_autograd(_bac_backward, setup_context=_bac_setup)


# ----------------------------------------------------------------------------- BN pieces
# Used by the synchronized BatchNorm (sync_bn.py), which runs the collectives BETWEEN these ops
# in Python: the ops themselves never communicate, so they stay traceable and opcheck-able.
# No autograd of their own: sync_bn.py's autograd.Function calls bn_act_backward itself.
@torch.library.custom_op(f"{NS}::bn_stats", mutates_args=())
def bn_stats_op(y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(mean, biased var) over (N, H, W, D) of y: fp32 (float64 for float64 y), shape (C,)."""
    impl = _backend.select("bn", backend, [y])
    mean, var = impl.bn_stats(y)
    sdt = stat_dtype(y.dtype)
    return _unalias((_conform(mean, y, dtype=sdt), _conform(var, y, dtype=sdt)), [y])


@bn_stats_op.register_fake
def _bn_stats_fake(y, backend):
    return _stat_empty(y, y.shape[1]), _stat_empty(y, y.shape[1])


@torch.library.custom_op(f"{NS}::bn_act_apply", mutates_args=())
def bn_act_apply_op(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], pool_after: bool,
                    relu: bool, backend: str) -> Tensor:
    """``relu(pool(y*scale[c] + shift[c]) + residual)`` (scale/shift per channel, stat dtype)."""
    impl = _backend.select("bn", backend, [y, residual])
    out = impl.bn_apply(y, scale, shift, residual, pool_after, relu)
    return _unalias((_conform(out, y, memory_format(y), y.dtype),), [y, scale, shift, residual])[0]


@bn_act_apply_op.register_fake
def _bn_act_apply_fake(y, scale, shift, residual, pool_after, relu, backend):
    shape = list(y.shape)
    if pool_after:
        shape[-1] //= 2
    return empty5(shape, y, memory_format(y))


@torch.library.custom_op(f"{NS}::bn_act_backward", mutates_args=())
def bn_act_backward_op(grad_out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor],
                       beta: Optional[Tensor], out: Optional[Tensor], pool_after: bool, relu: bool,
                       batch_stats: bool, residual_grad: bool, backend: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of o = relu(pool(gamma*xhat + beta) [+ residual]), xhat = (y - mean)*invstd.

    Returns (grad_y, sum(g_t*xhat), sum(g_t), grad_residual or marker); the sums are per
    channel in the stat dtype (always computed; ``gamma`` None counts as ones). ``out`` (the
    forward output) gives the ReLU mask; without it the mask is t > 0 (no pool/residual only).
    """
    impl = _backend.select("bn", backend, [y, grad_out, out])
    ones = None
    if gamma is None:  # the sums are needed whatever the affine: gamma = 1
        ones = torch.ones(y.shape[1], dtype=mean.dtype, device=y.device)
    gy, gg, gb, gres = impl.bn_backward(grad_out, y, mean, invstd, gamma if gamma is not None else ones, beta, out,
                                        pool_after, relu, batch_stats, residual_grad)
    sdt = mean.dtype
    fmt = memory_format(y)
    return _unalias((_conform(gy, y, fmt, y.dtype), _conform(gg, y, dtype=sdt), _conform(gb, y, dtype=sdt),
                     _conform(gres, grad_out, memory_format(grad_out), grad_out.dtype, want=residual_grad)),
                    [grad_out, y, mean, invstd, gamma, beta, out])


@bn_act_backward_op.register_fake
def _bn_act_backward_fake(grad_out, y, mean, invstd, gamma, beta, out, pool_after, relu, batch_stats,
                          residual_grad, backend):
    c = y.shape[1]
    gres = empty5(grad_out.shape, grad_out, memory_format(grad_out)) if residual_grad else empty_marker(y)
    return (empty5(y.shape, y, memory_format(y)), torch.empty((c,), dtype=mean.dtype, device=y.device),
            torch.empty((c,), dtype=mean.dtype, device=y.device), gres)
