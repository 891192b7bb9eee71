"""The fused pipeline shared by the triton and cuda backends.

Both backends expose the same launchers (OPS_CONTRACT.md): ``conv3d_fused``, ``channel_stats``,
``bn_act_apply``, ``bn_act_backward``, ``zmaxpool_forward``, ``zmaxpool_backward``. This module
strings them together once; ``triton_backend.py`` and ``cuda_backend.py`` only say where the
launchers come from and which devices they serve.

Pipelines (scale/shift = the BN affine folded per channel, fp32):

* conv_bn_act, eval, no grad: ONE ``conv3d_fused`` call with bias, the folded BN as epilogue
  affine, z-pool (before or after the affine), residual and ReLU.
* conv_bn_act, training: ``conv3d_fused(compute_stats=True)`` (pool-before inside when nothing
  needs the unpooled conv output) -> fp32 finalize -> ``bn_act_apply`` (pool-after, residual, ReLU).
  When backward needs it, the unpooled conv output c is kept and the pool/stats run separately.
* conv_bn_act backward: ``bn_act_backward`` (ReLU mask from the saved output, or recomputed as
  t > 0 from c and beta when no residual/pool-after intervenes; pool-after routing; BN backward) -> ``zmaxpool_backward`` for a pool-before -> ``aten.convolution_backward``.
* bn_act_conv: ``channel_stats`` (training) -> ``conv3d_fused`` with in_scale/in_shift (BN+ReLU in
  the prologue, zero padding after the transform), optionally straight into a channel slice.
* bn_act_conv backward: z = ``bn_act_apply`` (transient) -> ``aten.convolution_backward`` ->
  ``bn_act_backward`` with the ReLU mask z > 0.

Convs the fused conv kernel does not cover (kernel shapes outside ``fused_kernels``: the stem's
7x7x3 on the CUDA extension, or a build where ``conv3d_fused`` is not available yet) run
through torch's conv (cuDNN on a GPU) while the BN, ReLU, pool and residual work around them
stays fused. The Triton pipeline also serves the 7x7x3 stem (triton_backend.STEM_KERNEL).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import reference
from ._plan import cached
from ._util import bn_affine, is_supported_layout, next_running_stats, running_stats

Tensor = torch.Tensor

LAUNCHERS = ("conv3d_fused", "channel_stats", "bn_act_apply", "bn_act_backward",
             "zmaxpool_forward", "zmaxpool_backward")
# helpers a backend may offer (none at present)
OPTIONAL_LAUNCHERS: tuple[str, ...] = ()
# Optional keyword arguments a backend's launchers may accept, declared by its loader under
# "features": "finalize_in_merge" = ``channel_stats(x, finalize=)`` and
# ``conv3d_fused(compute_stats=True, finalize=)`` take a (gamma, beta, eps, running_mean,
# running_var, momentum) tuple and return (mean, var, invstd, scale, shift, next_running_mean,
# next_running_var) from their statistics merge launch (the training BN's whole statistics step
# in one launch). Without it the pipeline finishes the statistics with torch ops.
# "apply_from_stats" = ``bn_act_apply(y, gamma, beta, mean=, invstd=)`` forms the BN affine in
# the kernel (the backward's recompute of relu(bn(x)) from saved statistics). "add_to_grad_y" =
# ``bn_act_backward(..., add_to_grad_y=)`` sums another gradient of y into grad_y in its pass.
FEATURES = ("finalize_in_merge", "apply_from_stats", "add_to_grad_y")
# launchers an op cannot do without (conv3d_fused is optional: torch's conv stands in)
REQUIRED = {
    "zmaxpool": ("zmaxpool_forward", "zmaxpool_backward"),
    "conv_bn_act": ("channel_stats", "bn_act_apply", "bn_act_backward", "zmaxpool_forward", "zmaxpool_backward"),
    "bn_act_conv": ("channel_stats", "bn_act_apply", "bn_act_backward"),
    "bn": ("channel_stats", "bn_act_apply", "bn_act_backward"),  # BN pieces (synchronized BN)
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (kernel, stride) pairs conv3d_fused is used for; AH-Net's anisotropic convs
FUSED_KERNELS = ((3, 3, 1), (1, 1, 3), (1, 1, 1))
FUSED_STRIDES = ((1, 1, 1), (2, 2, 1))
_ZPOOL_KERNEL = {"none": "none", "before_bn": "before_affine", "after_bn": "after_affine"}


def _next_args(next_bn: tuple) -> tuple:
    """(gamma, beta, eps, update) of a next-BN tuple (gamma, beta, eps, running_mean, running_var,
    momentum), update = (running_mean, running_var, momentum) or None (no tracked statistics)."""
    gamma, beta, eps, rm, rv, momentum = next_bn
    return gamma, beta, eps, (None if rm is None else (rm, rv, momentum))


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _eval_affine(running_mean: Tensor, running_var: Tensor, bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], eps: float,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, var, scale, shift) in ``dtype`` (fp32 unless asked otherwise) of a BN
    normalising with its running statistics.

    Depends on the layer's parameters and buffers only, so it is built once per layer and
    rebuilt when one of them changes (``_plan.cached``): an eval forward then launches nothing
    but its convs. The tensors are shared between calls; callers must not write into them.
    """
    def build():
        mean, invstd, var = running_stats(running_mean, running_var, eps, dtype)
        w = None if bn_weight is None else bn_weight.detach().to(dtype)
        b = None if bn_bias is None else bn_bias.detach().to(dtype)
        scale, shift = bn_affine(mean, invstd, w, b)
        return mean, invstd, var, scale.contiguous(), shift.contiguous()

    return cached("eval_bn_affine", (running_mean, running_var, bn_weight, bn_bias), build, extra=(float(eps), dtype))


class FusedPipeline:
    """The fused ops over one set of launchers, loaded lazily by ``loader``.

    ``loader()`` returns a mapping name -> launcher for the launchers that exist (missing ones
    are simply absent) or raises ImportError/RuntimeError when none can be had; the error text
    becomes the refusal reason.
    """

    def __init__(self, name: str, loader: Callable[[], dict[str, Callable]],
                 extra_kernels: tuple[tuple[int, int, int], ...] = ()):
        self.name = name
        self._loader = loader
        # kernel shapes beyond FUSED_KERNELS that this backend's conv3d_fused serves
        self.fused_kernels = FUSED_KERNELS + tuple(extra_kernels)
        self._launchers: Optional[SimpleNamespace] = None
        self._error: Optional[str] = None

    # -- loading ------------------------------------------------------------------------------
    def launchers(self) -> Optional[SimpleNamespace]:
        if self._launchers is None and self._error is None:
            try:
                found = self._loader()
            except Exception as exc:  # ImportError, a failed build check, a triton error...
                self._error = f"{type(exc).__name__}: {exc}"
            else:
                self._launchers = SimpleNamespace(**{k: found.get(k) for k in LAUNCHERS + OPTIONAL_LAUNCHERS},
                                                  features=frozenset(found.get("features", ())))
        return self._launchers

    def load_error(self) -> Optional[str]:
        self.launchers()
        return self._error

    def missing(self, op: str) -> list[str]:
        lau = self.launchers()
        if lau is None:
            return list(REQUIRED[op])
        return [n for n in REQUIRED[op] if getattr(lau, n) is None]

    def has_conv(self) -> bool:
        lau = self.launchers()
        return lau is not None and lau.conv3d_fused is not None

    def call_reasons(self, op: str, tensors: Sequence[Optional[Tensor]]) -> list[str]:
        """Reasons (dtype, layout, missing launchers) this pipeline cannot serve a call."""
        out: list[str] = []
        err = self.load_error()
        if err is not None:
            out.append(f"{self.name} launchers could not be loaded ({err})")
        else:
            miss = self.missing(op)
            if miss:
                out.append(f"{self.name} launchers missing for {op}: {', '.join(miss)}")
        x = tensors[0]
        assert x is not None
        if x.dtype not in SUPPORTED_DTYPES:
            out.append(f"dtype {x.dtype} is not supported (accepted: float32, float16, bfloat16)")
        for t in tensors:
            if t is not None and t.dim() == 5 and not is_supported_layout(t):
                out.append(f"a (N, C, H, W, D) tensor with shape {tuple(t.shape)} and strides {t.stride()} "
                           "is neither contiguous nor channels_last_3d")
                break
        return out

    def _finalize_arg(self, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                      update: Optional[tuple]) -> dict:
        """``finalize=`` for the statistics launchers of a backend that fuses the BN finalize
        into its statistics merge (FEATURES), else nothing."""
        if "finalize_in_merge" not in self.launchers().features:
            return {}
        rm, rv, momentum = update if update is not None else (None, None, 0.0)
        return {"finalize": (_f32(bn_weight), _f32(bn_bias), float(eps), rm, rv, float(momentum))}

    @staticmethod
    def _finish_stats(stats: tuple, y: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
                      update: Optional[tuple]) -> tuple:
        """(mean, var, invstd, scale, shift, next_running_mean, next_running_var) of a training BN:
        as the statistics launch returned them (finalize fused), or finished with torch ops from
        (mean, var) (y: the tensor the statistics are of, for the unbiased count)."""
        if len(stats) == 7:
            return stats
        mean, var = stats
        invstd = torch.rsqrt(var + eps)
        scale, shift = bn_affine(mean, invstd, _f32(bn_weight), _f32(bn_bias))
        nxt = (None, None)
        if update is not None:
            rm, rv, momentum = update
            nxt = next_running_stats(rm, rv, mean, var, y.numel() // max(y.shape[1], 1), momentum)
        return mean, var, invstd, scale.contiguous(), shift.contiguous(), *nxt

    def conv_fused_ok(self, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
        k = tuple(weight.shape[2:])
        return (self.has_conv() and k in self.fused_kernels and tuple(stride) in FUSED_STRIDES
                and all(p in (0, kk // 2) for p, kk in zip(padding, k)))

    # -- zmaxpool --------------------------------------------------------------------------------
    def zmaxpool_forward(self, x: Tensor) -> Tensor:
        return self.launchers().zmaxpool_forward(x)

    def zmaxpool_backward(self, x: Tensor, grad_y: Tensor) -> Tensor:
        return self.launchers().zmaxpool_backward(x, grad_y)

    # -- conv -> BN -> act -------------------------------------------------------------------------
    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, fused: bool, **kw):
        if fused:
            if weight.is_cuda and not weight.is_contiguous(memory_format=torch.channels_last_3d):
                # on a GPU the fused conv reads weights K-contiguous (channels_last_3d, the fast
                # model's parameter layout there, read in place); another layout is converted
                # once per change of the weight (once per optimizer step in training), not on
                # every call. The interpreter reads any layout in place.
                w = weight
                weight = cached("cl3d_conv_weight", (w,),
                                lambda: w.detach().contiguous(memory_format=torch.channels_last_3d))
            return self.launchers().conv3d_fused(x, weight, stride=tuple(stride), padding=tuple(padding),
                                                 bias=bias, **kw)
        assert not kw
        return F.conv3d(x, weight, bias, list(stride), list(padding))

    def conv_bn_act_forward(self, x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
                            stride, padding, training, eps, zpool, relu, save, update=None):
        """(out, c or None, mean, invstd, var, next_running_mean, next_running_var); ``update`` =
        (running_mean, running_var, momentum) of a training BN with tracked statistics: their
        next values are returned (None otherwise), the buffers are not written."""
        L = self.launchers()
        fused = self.conv_fused_ok(weight, stride, padding)
        before, after = zpool == "before_bn", zpool == "after_bn"
        c: Optional[Tensor] = None
        nxt = (None, None)
        if training:
            fin = self._finalize_arg(bn_weight, bn_bias, eps, update)
            if fused and not save:
                # pool-before inside the conv epilogue; stats of the pooled raw values
                y, stats = self._conv(x, weight, conv_bias, stride, padding, True,
                                      zpool="before_affine" if before else "none", compute_stats=True, **fin)
            elif fused and not before:
                c, stats = self._conv(x, weight, conv_bias, stride, padding, True, compute_stats=True, **fin)
                y = c
            else:
                c = self._conv(x, weight, conv_bias, stride, padding, fused)
                y = L.zmaxpool_forward(c) if before else c
                stats = L.channel_stats(y, **fin)
            mean, var, invstd, scale, shift, *nxt = self._finish_stats(stats, y, bn_weight, bn_bias, eps, update)
        else:
            mean, invstd, var, scale, shift = _eval_affine(running_mean, running_var, bn_weight, bn_bias, eps)
        if not training and not save and fused:
            # inference: BN folded into the conv epilogue, everything in one kernel
            out = self._conv(x, weight, conv_bias, stride, padding, True, out_scale=scale, out_shift=shift,
                             zpool=_ZPOOL_KERNEL[zpool], residual=residual, relu=relu)
            return out, None, mean, invstd, var, None, None
        if not training:
            c = self._conv(x, weight, conv_bias, stride, padding, fused)
            y = L.zmaxpool_forward(c) if before else c
        out = L.bn_act_apply(y, scale, shift, zpool="after_affine" if after else "none",
                             residual=residual, relu=relu)
        return (out, (c if save else None), mean, invstd, var, *nxt)

    def conv_bn_act_backward(self, grad_out, x, weight, c, mean, invstd, bn_weight, bn_bias, out, stride, padding,
                             training, zpool, relu, has_residual, has_conv_bias, output_mask):
        L = self.launchers()
        before = zpool == "before_bn"
        y = L.zmaxpool_forward(c) if before else c
        beta = None
        if relu and out is None:  # mask recomputed as t > 0 (no residual, no pool-after)
            beta = _f32(bn_bias) if bn_bias is not None else torch.zeros_like(mean, dtype=torch.float32)
        grad_y, g_gamma, g_beta, g_res = L.bn_act_backward(
            grad_out, y, mean.float(), invstd.float(), _f32(bn_weight), out=out if relu else None,
            zpool="after_affine" if zpool == "after_bn" else "none", relu=relu, batch_stats=training,
            residual_grad=bool(has_residual and output_mask[5]), beta=beta)
        grad_c = L.zmaxpool_backward(c, grad_y) if before else grad_y
        gx, gw, gb = reference._conv_backward(grad_c, x, weight, stride, padding, has_conv_bias, output_mask[:3])
        return gx, gw, gb, g_gamma, g_beta, g_res

    # -- BN -> act -> conv -------------------------------------------------------------------------
    def bn_act_conv_forward(self, x, bn_weight, bn_bias, running_mean, running_var, weight, conv_bias, stride,
                            padding, training, eps, relu, out=None, out_channel_offset=0, residual=None,
                            update=None, stats=None, next_bn=None, pre_activated=False, out_affine=None):
        """(out, mean, invstd, var, next_running_mean, next_running_var, out_stats, out_next_running_mean,
        out_next_running_var); see conv_bn_act_forward for ``update``.

        Inference forms (``bn_act_conv_into``): ``pre_activated``: x is already the activation,
        the conv runs without a prologue (mean/invstd/var None); ``out_affine`` = (scale, shift,
        relu): the next pre-activation layer's eval BN (+ReLU) applied in the epilogue.

        ``stats`` (training): x's batch statistics as a (5, Cin) fp32 tensor (rows mean, var,
        invstd, scale, shift) computed by x's producer: no statistics pass over x here.
        ``next_bn`` = (gamma, beta, eps, running_mean, running_var, momentum) of the training BN
        that reads this op's output next: its statistics come back the same way (out_stats and
        that BN's next running statistics), from this conv's epilogue and merge launch."""
        L = self.launchers()
        nxt = (None, None)
        if pre_activated:
            mean = var = invstd = scale = shift = None
        elif training and stats is not None:
            mean, var, invstd, scale, shift = stats.unbind(0)
        elif training:
            st = L.channel_stats(x, **self._finalize_arg(bn_weight, bn_bias, eps, update))
            mean, var, invstd, scale, shift, *nxt = self._finish_stats(st, x, bn_weight, bn_bias, eps, update)
        else:
            mean, invstd, var, scale, shift = _eval_affine(running_mean, running_var, bn_weight, bn_bias, eps)
        ostats = (None, None, None)
        if self.conv_fused_ok(weight, stride, padding):
            kw = {}
            fused_next = next_bn is not None and "finalize_in_merge" in L.features and out is None
            if fused_next:
                # the next BN's statistics from this conv's epilogue, finalized in its merge
                buf = torch.empty((5, weight.shape[0]), dtype=torch.float32, device=x.device)
                kw = dict(compute_stats=True, stats_out=buf, **self._finalize_arg(*_next_args(next_bn)))
            if out_affine is not None:
                kw.update(out_scale=_f32(out_affine[0]), out_shift=_f32(out_affine[1]), relu=bool(out_affine[2]))
            o = self._conv(x, weight, conv_bias, stride, padding, True, in_scale=scale, in_shift=shift,
                           in_relu=relu, residual=residual, out=out, out_channel_offset=out_channel_offset, **kw)
            if fused_next:
                o, st = o
                ostats = (buf, st[5], st[6])
            elif next_bn is not None:
                ostats = self._stats_of(o, next_bn)
            return (o, mean, invstd, var, *nxt, *ostats)
        z = x if pre_activated else L.bn_act_apply(x, scale, shift, relu=relu)
        o = F.conv3d(z, weight, conv_bias, list(stride), list(padding))
        if residual is not None:
            o = o.add_(residual)
        if out_affine is not None:
            o = L.bn_act_apply(o, _f32(out_affine[0]).contiguous(), _f32(out_affine[1]).contiguous(),
                               relu=bool(out_affine[2]))
        if next_bn is not None:
            ostats = self._stats_of(o, next_bn)
        if out is not None:
            out.narrow(1, out_channel_offset, o.shape[1]).copy_(o)
            return (out, mean, invstd, var, *nxt, *ostats)
        return (o, mean, invstd, var, *nxt, *ostats)

    def _stats_of(self, y: Tensor, next_bn: tuple) -> tuple:
        """(stats (5, C), next running mean, next running var) of y for the training BN next_bn."""
        gamma, beta, eps, update = _next_args(next_bn)
        fin = self._finalize_arg(gamma, beta, eps, update)
        if fin:
            buf = torch.empty((5, y.shape[1]), dtype=torch.float32, device=y.device)
            st = self.launchers().channel_stats(y, out=buf, **fin)
            return buf, st[5], st[6]
        st = self._finish_stats(self.launchers().channel_stats(y), y, gamma, beta, eps, update)
        return torch.stack(st[:5]), st[5], st[6]

    def bn_act_conv_backward(self, grad_out, x, bn_weight, bn_bias, mean, invstd, weight, stride, padding, training,
                             relu, has_conv_bias, output_mask, add_grad=None):
        """Gradients of bn_act_conv; ``add_grad`` (x's shape) is summed into grad_x."""
        L = self.launchers()
        if "apply_from_stats" in L.features:
            # the affine formed inside the apply kernel: no launches of its own
            z = L.bn_act_apply(x, _f32(bn_weight), _f32(bn_bias), relu=relu, mean=mean.float(),
                               invstd=invstd.float())  # transient recompute
        else:
            scale, shift = bn_affine(mean.float(), invstd.float(), _f32(bn_weight), _f32(bn_bias))
            z = L.bn_act_apply(x, scale.contiguous(), shift.contiguous(), relu=relu)  # transient recompute
        need_bn = bool(output_mask[0] or output_mask[1] or output_mask[2])
        gz, gw, gb = reference._conv_backward(grad_out, z, weight, stride, padding, has_conv_bias,
                                              [need_bn, output_mask[3], output_mask[4]])
        gx = g_gamma = g_beta = None
        if need_bn:
            if not is_supported_layout(gz):
                gz = gz.contiguous(memory_format=torch.channels_last_3d if x.stride(1) == 1 else torch.contiguous_format)
            fused_add = add_grad is not None and "add_to_grad_y" in L.features
            gx, g_gamma, g_beta, _ = L.bn_act_backward(gz, x, mean.float(), invstd.float(), _f32(bn_weight),
                                                       out=z if relu else None, relu=relu, batch_stats=training,
                                                       **({"add_to_grad_y": add_grad} if fused_add else {}))
            if add_grad is not None and not fused_add:
                gx = gx + add_grad
        elif add_grad is not None and output_mask[0]:
            gx = add_grad.clone()
        return gx, g_gamma, g_beta, gw, gb

    # -- BN pieces (the synchronized BatchNorm strings them together around its collectives) -----
    def bn_stats(self, y):
        return self.launchers().channel_stats(y)

    def bn_apply(self, y, scale, shift, residual, pool_after, relu):
        return self.launchers().bn_act_apply(y, _f32(scale), _f32(shift),
                                             zpool="after_affine" if pool_after else "none",
                                             residual=residual, relu=relu)

    def bn_backward(self, grad_out, y, mean, invstd, gamma, beta, out, pool_after, relu, batch_stats, residual_grad):
        if relu and out is None and beta is None:
            beta = torch.zeros_like(mean, dtype=torch.float32)
        return self.launchers().bn_act_backward(
            grad_out, y, _f32(mean), _f32(invstd), _f32(gamma), out=out if relu else None,
            zpool="after_affine" if pool_after else "none", relu=relu, batch_stats=batch_stats,
            residual_grad=residual_grad, beta=_f32(beta) if relu and out is None else None)
