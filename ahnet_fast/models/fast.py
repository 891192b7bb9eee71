"""The fast AH-Net: MONAI's topology run through the fused ops.

``FastAHNet`` is :class:`ahnet_fast.models.ahnet.AHNet` with another block set: every block
class below subclasses its reference twin and overrides only ``forward``, so parameters,
buffers, initial weights and state_dict keys are exactly the reference's (and MONAI's). A
checkpoint of either model loads into the other unchanged.

What runs fused (3D; see ``ahnet_fast.ops`` for the op contracts):

- stem: conv 7x7x3 /(2,2,1) -> z-pool -> BN -> ReLU as one ``conv_bn_act`` (the max is taken
  on the raw conv output, before the BN affine);
- encoder bottlenecks: conv1/conv2/conv3 each ``conv_bn_act`` (post-activation); in the first
  block of layer2..4 the shortcut is ``conv_bn_act(zpool="before_bn", relu=False)`` and the
  main path's z-pool, the residual add and the last ReLU are the epilogue of conv3's op;
- decoder (pre-activation): every BN -> ReLU -> conv of Pseudo3DLayer, UpTransition,
  Projection and Final is one ``bn_act_conv`` (BN+ReLU applied as the input is loaded, zero
  padding after that transform);
- dense blocks: when autograd is not recording (inference) the block allocates its concat
  buffer once and each layer writes its new features straight into its channel slice, so no
  ``torch.cat`` copies the growing feature map; in training the ``torch.cat`` form is kept
  (autograd needs the separate tensors);
- inference on the fused (GPU) path, invisible in values, shapes and layouts: the concat
  buffers, the head's concatenation and each Pseudo3D layer's 20-channel tensors are views of
  buffers whose channel count is rounded up to 16 bytes (``channel_padded_empty``), so the
  convs reading them load aligned 16-byte vectors; and bn2 + ReLU of each Pseudo3D layer runs
  in the epilogue of the 1x1x1 before it (the bottleneck has no other reader), so the 3x3x1
  reads an activated input with no prologue (``bn_act_conv(out_affine=...)`` then
  ``activated_conv``). Training keeps the per-tap prologue: the BN needs the batch statistics
  of the whole bottleneck output before it can be applied.

What stays plain torch: the stem's 2x2x2 (or 3x3x3) max-pool, the transposed convs and
interpolations of the upsampling, the PSP branch (1-channel convs), and the skip additions.
2D networks (``spatial_dims=2``) run through the same ops on (N, C, H, W, 1) views; their
stem pools along W and stays on the reference path.

Extra constructor argument (everything else is MONAI's): ``activation_checkpointing=True``
recomputes each encoder stage and each dense block in the backward pass instead of keeping
their activations, for GPUs with too little memory. BatchNorm running statistics are updated
once per forward (the recomputation does not update them again).
"""
from __future__ import annotations

import contextlib
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ahnet_fast.models.ahnet import AHNet as ReferenceAHNet
from ahnet_fast.models.ahnet import (
    BlockSet,
    Bottleneck3x3x1,
    DenseBlock,
    Final,
    PSP,
    Projection,
    Pseudo3DLayer,
    UpTransition,
)
from ahnet_fast.models.validation import check_input
from ahnet_fast.nn.functional import (
    activated_conv_modules,
    bn_act_conv_chain_modules,
    bn_act_conv_fold_modules,
    bn_act_conv_modules,
    bn_sync_group,
    chainable,
    conv_args,
    conv_bn_act_modules,
    recomputing,
)
from ahnet_fast.nn.sync import convert_sync_batchnorm
from ahnet_fast.ops import _running
from ahnet_fast.ops._backend import composite_path
from ahnet_fast.ops._util import conv_out_shape, memory_format
from ahnet_fast.ops.composite import cat_channels, conv3d

__all__ = [
    "AHNet",
    "FAST_BLOCKS",
    "FastAHNet",
    "FusedBottleneck3x3x1",
    "FusedDenseBlock",
    "FusedFinal",
    "FusedProjection",
    "FusedPseudo3DLayer",
    "FusedUpTransition",
]

Tensor = torch.Tensor


def _pools_depth(pool: nn.Module) -> bool:
    """True for the (1, 1, 2) z-pool of a 3D shortcut; False for MONAI's no-op (1, 1, 1)/2D pools."""
    k = pool.kernel_size
    k = tuple(k) if isinstance(k, (tuple, list)) else (k,)
    return len(k) == 3 and k[-1] > 1


class FusedBottleneck3x3x1(Bottleneck3x3x1):
    """Post-activation bottleneck: three ``conv_bn_act`` calls (+ the shortcut's)."""

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act_modules(x, self.conv1, self.bn1, relu=True)
        out = conv_bn_act_modules(out, self.conv2, self.bn2, relu=True)
        residual = x
        zpool = "none"
        if self.downsample is not None:
            ds_conv, ds_pool, ds_bn = self.downsample[0], self.downsample[1], self.downsample[2]
            residual = conv_bn_act_modules(
                x, ds_conv, ds_bn, zpool="before_bn" if _pools_depth(ds_pool) else "none", relu=False
            )
            # MONAI pools the main path exactly when the shortcut's pool changed the shape
            if residual.shape[-1] != out.shape[-1]:
                zpool = "after_bn"
        return conv_bn_act_modules(out, self.conv3, self.bn3, zpool=zpool, residual=residual, relu=True)


class FusedProjection(Projection):
    """BN -> ReLU -> 1x1x1 conv as one ``bn_act_conv``."""

    def forward(self, x: Tensor) -> Tensor:
        return bn_act_conv_modules(x, self.norm, self.conv)


class FusedUpTransition(UpTransition):
    """``bn_act_conv`` (1x1x1) then the upsampling (transposed conv or interpolation)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.up(bn_act_conv_modules(x, self.norm, self.conv))


class FusedFinal(Final):
    """``bn_act_conv`` (3x3x1) then the upsampling."""

    def forward(self, x: Tensor, out_format: torch.memory_format | None = None) -> Tensor:
        """``out_format``: the memory format the network's output must have. In inference the
        conv writes its (few-channel) output straight in that layout, so the upsampling that
        follows produces it too and no conversion pass over the full-size output is needed."""
        if out_format is None or _plain_path() or x.dim() != 5 or memory_format(x) == out_format:
            c = bn_act_conv_modules(x, self.norm, self.conv)
            if (out_format is not None and c.requires_grad and not c.is_contiguous(memory_format=out_format)
                    and _composite(c)):
                # training on the CPU: the caller's layout before the x2 upsampling, on a tensor
                # 4-8x smaller than the output (its gradient goes back channels-last)
                c = _ToCallerFormat.apply(c, out_format)
            return self.up(c)
        shape = (x.shape[0], self.conv.out_channels, *_conv_out_spatial(x, self.conv))
        buf = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format)
        return self.up(bn_act_conv_modules(x, self.norm, self.conv, out=buf))


def channel_padded_empty(like: Tensor, channels: int, spatial: Sequence[int] | None = None) -> Tensor:
    """An uninitialised ``(N, channels, *spatial)`` tensor with ``like``'s dtype, device and
    memory format (``spatial`` defaults to like's). On the fused path in channels-last it is
    the first ``channels`` channels of a buffer whose channel count is rounded up to 16 bytes
    (20 -> 24 in bf16, 1084 -> 1088): every (n, h, w, d) row then starts 16-byte aligned and the
    convs that read it load whole aligned 16-byte vectors, the padding included and zeroed in
    registers (kernels/conv.py, XPAD), where 20 channels at a 40-byte pitch allow 8-byte
    vectors at most. A view; its values, shape and layout kind are what a dense tensor's would
    be. The composite (CPU) path gets a dense tensor: its convs want contiguous inputs."""
    spatial = tuple(like.shape[2:]) if spatial is None else tuple(spatial)
    fmt = memory_format(like)
    vec = 16 // like.element_size()
    if like.dim() != 5 or fmt != torch.channels_last_3d or channels % vec == 0 or _composite(like):
        return torch.empty((like.shape[0], channels, *spatial), dtype=like.dtype, device=like.device,
                           memory_format=fmt)
    padded = -(-channels // vec) * vec
    buf = torch.empty((like.shape[0], padded, *spatial), dtype=like.dtype, device=like.device, memory_format=fmt)
    return buf.narrow(1, 0, channels)


def _conv_out_spatial(x: Tensor, conv: nn.Module) -> list[int]:
    """The output spatial size of ``conv`` (3-D, no dilation) on ``x``."""
    stride, padding = conv_args(conv)
    return conv_out_shape(x.shape, conv.weight.shape, stride, padding)[2:]


class FusedPseudo3DLayer(Pseudo3DLayer):
    """Four pre-activation convs (1x1x1 in->80, 3x3x1 80->20, 1x1x3 20->20, 1x1x1 20->20)."""

    def new_features(self, x: Tensor, out: Tensor | None = None, out_channel_offset: int = 0) -> Tensor:
        """The layer's ``growth_rate`` new channels (N, 20, H, W, D), optionally written into
        ``out[:, out_channel_offset:out_channel_offset + 20]`` (inference only)."""
        if out is None and torch.is_grad_enabled() and chainable(x, self.bn1, self.bn2, self.bn3, self.bn4):
            # training: bn2..bn4's statistics come from the epilogue of the conv before them,
            # finalized in that conv's merge launch; no statistics pass over a, x3x3x1, summed
            a, s2 = bn_act_conv_chain_modules(x, self.bn1, self.conv1, next_bn=self.bn2)
            x3x3x1, s3 = bn_act_conv_chain_modules(a, self.bn2, self.conv2, stats=s2, next_bn=self.bn3)
            summed, s4 = bn_act_conv_chain_modules(x3x3x1, self.bn3, self.conv3, residual=x3x3x1, stats=s3,
                                                   next_bn=self.bn4)
            return bn_act_conv_chain_modules(summed, self.bn4, self.conv4, stats=s4)[0]
        if _plain_path() or x.dim() != 5 or _composite(x):
            a = bn_act_conv_modules(x, self.bn1, self.conv1)
            x3x3x1 = bn_act_conv_modules(a, self.bn2, self.conv2)
            # x3x3x1 + conv1x1x3(...): the sum is the 1x1x3 conv's epilogue, not a pass of its own
            summed = bn_act_conv_modules(x3x3x1, self.bn3, self.conv3, residual=x3x3x1)
        else:
            if self._foldable():
                # the bottleneck's only reader is bn2 -> ReLU -> 3x3x1: that eval BN+ReLU runs in
                # the 1x1x1's epilogue, once per element, and the 3x3x1 (9 taps) loads an
                # activated input without a prologue
                z = channel_padded_empty(x, self.conv1.out_channels, _conv_out_spatial(x, self.conv1))
                bn_act_conv_fold_modules(x, self.bn1, self.conv1, self.bn2, z)
                x3x3x1 = channel_padded_empty(z, self.conv2.out_channels, _conv_out_spatial(z, self.conv2))
                activated_conv_modules(z, self.conv2, x3x3x1)
            else:
                a = bn_act_conv_modules(x, self.bn1, self.conv1)
                x3x3x1 = channel_padded_empty(a, self.conv2.out_channels, _conv_out_spatial(a, self.conv2))
                bn_act_conv_modules(a, self.bn2, self.conv2, out=x3x3x1)
            # inference: the two growth-channel tensors (20 channels) in channel-padded buffers,
            # so that the 1x1x3 and the last 1x1x1 read them in 16-byte vectors
            summed = channel_padded_empty(x3x3x1, self.conv3.out_channels, _conv_out_spatial(x3x3x1, self.conv3))
            bn_act_conv_modules(x3x3x1, self.bn3, self.conv3, residual=x3x3x1, out=summed)
        return bn_act_conv_modules(summed, self.bn4, self.conv4, out=out, out_channel_offset=out_channel_offset)

    def _foldable(self) -> bool:
        """True when bn2 (+ReLU) can run in conv1's epilogue: both BNs in eval mode with running
        statistics and not synchronised (x3x3x1 has two readers, bn3 and the residual, so bn3
        cannot fold the same way; the dense block's buffer has many)."""
        bn1, bn2 = self.bn1, self.bn2
        return (not bn1.training and not bn2.training and bn2.running_mean is not None
                and bn2.running_var is not None and not bn_sync_group(bn1)[0] and not bn_sync_group(bn2)[0])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.new_features(x)], 1)


class FusedDenseBlock(DenseBlock):
    """Dense block whose layers write into one preallocated concat buffer in inference."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_sum(x, None)

    def forward_sum(self, a: Tensor, b: Tensor | None) -> Tensor:
        """``forward(a + b)`` (``forward(a)`` when ``b`` is None). In inference the sum is
        written straight into the first channels of the block's concat buffer, and every
        layer writes its new features into its own channel slice: no copy of the growing
        feature map, no separate copy of the input."""
        layers = list(self.children())
        if _plain_path() or not layers:
            return super().forward(a if b is None else a + b)
        growth = layers[0].conv4.out_channels
        c0 = a.shape[1]
        # channel-padded (1084 -> 1088 in bf16): every layer's input slice buf[:, :c] and the
        # next block's input rows start 16-byte aligned
        buf = channel_padded_empty(a, c0 + growth * len(layers))
        if b is None:
            buf[:, :c0].copy_(a)
        else:
            torch.add(a, b, out=buf[:, :c0])
        for i, layer in enumerate(layers):
            c = c0 + i * growth
            layer.new_features(buf[:, :c], out=buf, out_channel_offset=c)
        return buf


def _plain_path() -> bool:
    """True where the buffer-writing inference forms (``out=`` into preallocated buffers) must not
    be used: under autograd (they are not differentiable) and under torch.compile (``out=``
    into a slice breaks dynamo's graph; inductor plans those buffers itself)."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling()


class FastPSP(PSP):
    """PSP (1-channel convs and pools: nothing worth fusing) whose 1x1x1 projections take the
    composite path's conv on the CPU under autograd: its GEMM backward returns the gradient
    channels-last, where torch's conv backward would hand the decoder an NCDHW one."""

    def _project(self, conv: nn.Module, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.dim() == 5 and _composite(x)):
            return conv(x)
        return conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, training=self.training)


FAST_BLOCKS = BlockSet(
    bottleneck=FusedBottleneck3x3x1,
    projection=FusedProjection,
    pseudo3d_layer=FusedPseudo3DLayer,
    dense_block=FusedDenseBlock,
    up_transition=FusedUpTransition,
    final=FusedFinal,
    psp=FastPSP,
)


def _checkpoint_contexts():
    """torch.utils.checkpoint ``context_fn``: plain forward; the recomputation leaves the
    BatchNorm running statistics alone (they were updated by the forward)."""
    return contextlib.nullcontext(), recomputing()


class FastAHNet(ReferenceAHNet):
    """Drop-in AH-Net on the fused ops: MONAI's arguments, state_dict and outputs.

    Args: those of :class:`ahnet_fast.models.ahnet.AHNet` (= ``monai.networks.nets.AHNet``),
    plus ``activation_checkpointing`` (keyword, default False): recompute each encoder stage
    (layer1..4) and each dense block in the backward pass to save activation memory, and
    ``sync_bn`` (keyword, default False): BatchNorm statistics over every process of the
    default group in multi-process (DDP) training, see ``ahnet_fast.nn.convert_sync_batchnorm``
    (which also takes a process group). Neither changes the state_dict.

    Input ``(B, in_channels, H, W, D)``, float32/bfloat16/float16 (or float64 on the
    reference backend), contiguous or channels_last_3d (the fast layout on GPUs); under
    ``torch.autocast`` the fused ops run in the autocast dtype. Output
    ``(B, out_channels, H, W, D)``.
    """

    blocks: ClassVar[BlockSet] = FAST_BLOCKS

    def __init__(self, *args, activation_checkpointing: bool = False, sync_bn: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_gpu_weight_layout(only_cuda=True)
        self.activation_checkpointing = bool(activation_checkpointing)
        if sync_bn:
            convert_sync_batchnorm(self)

    # ---- parameter layout ----------------------------------------------------------------
    def use_gpu_weight_layout(self, only_cuda: bool = False) -> "FastAHNet":
        """Lay the 3-D conv weights out channels_last_3d (those on a GPU only, with
        ``only_cuda``). Done on every GPU model by construction and ``.to()``/``.cuda()``: the
        fused conv reads them in place (K-contiguous B tiles) and cuDNN's conv backward returns
        their gradients in that layout for channels-last activations, so a training step
        neither repacks a weight nor restrides a gradient. On a CPU the weights stay NCDHW (the
        layout torch's CPU conv backward returns weight gradients in); calling this there
        reproduces the GPU's kernel launches (the static sm_90 report does). Values, state_dict
        and optimizer semantics are unchanged. Returns self."""
        for m in self.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, nn.Conv3d) and isinstance(w, torch.Tensor) and (w.is_cuda or not only_cuda)
                    and not w.is_contiguous(memory_format=torch.channels_last_3d)):
                w.data = w.data.contiguous(memory_format=torch.channels_last_3d)
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() all come through here: a model moved to a GPU gets its layout
        super()._apply(fn, recurse)
        self.use_gpu_weight_layout(only_cuda=True)
        return self

    # ---- conversions -------------------------------------------------------------------
    def _config(self) -> dict:
        """This model's AHNet constructor arguments (those MONAI takes)."""
        return _config_of(self)

    @classmethod
    def from_monai(cls, model: nn.Module, *, activation_checkpointing: bool = False) -> "FastAHNet":
        """A FastAHNet with the configuration and weights of a MONAI (or reference) AHNet.

        The configuration is read from the model's modules (MONAI keeps no copy of its
        arguments); the state_dict is loaded strictly, so any mismatch raises.
        """
        cfg = _config_of(model)
        fast = cls(**cfg, activation_checkpointing=activation_checkpointing)
        p = next(model.parameters())
        fast.load_state_dict(model.state_dict(), strict=True)
        fast.to(device=p.device, dtype=p.dtype)
        fast.train(model.training)
        return fast

    def to_reference(self) -> ReferenceAHNet:
        """The plain-PyTorch :class:`AHNet` with this model's configuration, weights and mode."""
        ref = ReferenceAHNet(**self._config())
        p = next(self.parameters())
        ref.load_state_dict(self.state_dict(), strict=True)
        ref.to(device=p.device, dtype=p.dtype)
        ref.train(self.training)
        return ref

    # ---- forward -------------------------------------------------------------------------
    def _maybe_checkpoint(self, fn, *xs: Tensor) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *xs, use_reentrant=False, context_fn=_checkpoint_contexts)
        return fn(*xs)

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.spatial_dims != 3:
            return super()._stem(x)
        conv_x = conv_bn_act_modules(x, self.conv1, self.bn0, zpool="before_bn", relu=True)
        return conv_x, self.maxpool(conv_x)

    def _encode(self, pool_x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        fm1 = self._maybe_checkpoint(self.layer1, pool_x)
        fm2 = self._maybe_checkpoint(self.layer2, fm1)
        fm3 = self._maybe_checkpoint(self.layer3, fm2)
        fm4 = self._maybe_checkpoint(self.layer4, fm3)
        return fm1, fm2, fm3, fm4

    def _decode(self, conv_x: Tensor, pool_x: Tensor, fms: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        fm1, fm2, fm3, fm4 = fms
        ck = self._maybe_checkpoint
        if self.training and torch.is_grad_enabled():
            d0 = ck(self.dense0, self.up0(fm4) + fm3)
            d1 = ck(self.dense1, self.up1(d0) + fm2)
            d2 = ck(self.dense2, self.up2(d1) + fm1)
            d3 = ck(self.dense3, self.trans1(d2) + pool_x)
            return ck(self.dense4, self.up3(d3) + conv_x)
        # each skip sum is written straight into its dense block's concat buffer
        d0 = self.dense0.forward_sum(self.up0(fm4), fm3)
        d1 = self.dense1.forward_sum(self.up1(d0), fm2)
        d2 = self.dense2.forward_sum(self.up2(d1), fm1)
        d3 = self.dense3.forward_sum(self.trans1(d2), pool_x)
        return self.dense4.forward_sum(self.up3(d3), conv_x)

    def _head(self, d4: Tensor, out_format: torch.memory_format | None = None) -> Tensor:
        if self.psp_block_num == 0:
            return self.final(d4, out_format)
        parts = [*self.psp.maps(d4), d4]
        if d4.dim() != 5 or torch.compiler.is_compiling():
            return self.final(torch.cat(parts, dim=1), out_format)
        if _plain_path():
            if not _composite(d4):
                return self.final(torch.cat(parts, dim=1), out_format)
            # torch.cat lays the result out like its first input, a 1-channel PSP map (NCDHW),
            # and the head's conv would then run, and send its input gradient back through d4
            # and the whole decoder, in NCDHW against channels-last activations
            return self.final(cat_channels(parts, memory_format(d4)), out_format)
        # inference: one concatenation (not PSP's own plus this one), laid out like d4: torch.cat
        # would pick NCDHW for 1-channel maps followed by a channels-last d4
        buf = channel_padded_empty(d4, sum(p.shape[1] for p in parts))
        return self.final(torch.cat(parts, dim=1, out=buf), out_format)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``, in ``x``'s memory
        format (on CUDA the network itself always runs channels_last_3d)."""
        if not self.training:
            return self._forward(x)
        # every BN layer's running statistics and batch counter committed in two launches at
        # the end of the forward, not three per layer (ops/_running.py)
        with _running.deferred_running_updates():
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        out_format = _output_format(x)
        if x.dim() == 5 and x.device.type == "cuda":
            # the fused kernels' layout, whatever the caller's (a no-op for 1-channel input,
            # whose outputs the ops then lay out channels-last, see ops._util.memory_format)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        dtype = _autocast_dtype(x)
        if dtype is not None:
            # the fused ops are custom ops (no autocast rule of their own): run the whole
            # network in the autocast dtype, as autocast runs conv3d; BN math stays fp32
            # inside the ops
            with torch.autocast(x.device.type, enabled=False):
                out = _cast_run(self, x, dtype)
        else:
            check_input(self.input_spec, x, training=self.training)
            conv_x, pool_x = self._stem(x)
            fms = self._encode(pool_x)
            out = self._head(self._decode(conv_x, pool_x, fms), out_format)
        # a no-op where the head already gave the output's layout (inference: the final conv
        # wrote it; CPU training: FusedFinal converted before its upsampling)
        return out if out_format is None else out.contiguous(memory_format=out_format)


def _composite(t: Tensor) -> bool:
    return composite_path(t) and not torch.compiler.is_compiling()


class _ToCallerFormat(torch.autograd.Function):
    """The network's output in the caller's memory format, its gradient back in the network's.

    On the CPU (composite path) the network runs channels_last_3d while a 1-channel input asks
    for an NCDHW output. A plain ``.contiguous()`` passes the loss gradient through in NCDHW,
    and the backward ops upstream then follow that layout against channels-last activations
    (ReLU backward and residual adds on mixed strides, conversions inside the conv backward).
    Converting the one gradient here keeps it channels-last. With the composite path's
    channels-last conv gradients and the head's channels-last concatenation this took the
    mixed-layout share of the elementwise backward from 30% to 1.7% of its elements
    (1x1x64x64x32) and a training step from 1.17 to 0.80-0.85 of MONAI eager's CPU time
    (bench/results/cpu_train.md)."""

    @staticmethod
    def forward(ctx, y: Tensor, out_format: torch.memory_format) -> Tensor:  # type: ignore[override]
        ctx.net_format = memory_format(y)
        return y.contiguous(memory_format=out_format)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.contiguous(memory_format=ctx.net_format), None


def _output_format(x: Tensor) -> torch.memory_format | None:
    """The memory format the output must have to follow the input (None: leave it as it is).

    A contiguous input (1-channel inputs included) gets a contiguous output, a
    channels_last_3d one a channels_last_3d output; only 5-D inputs are converted."""
    if x.dim() != 5:
        return None
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``x``'s device type, or None."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _cast_run(model: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Forward with conv weights and activations in ``dtype``; BN parameters and buffers stay
    as they are (the ops keep BN math in fp32 and update the real running statistics). The
    casts are differentiable, so gradients reach the fp32 parameters as under autocast."""
    cast = {
        name: p.to(dtype)
        for name, p in model.named_parameters()
        if p.is_floating_point() and not isinstance(_owner(model, name), nn.modules.batchnorm._BatchNorm)
    }
    return functional_call(model, cast, (x.to(dtype),), strict=False)


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _config_of(model: nn.Module) -> dict:
    """AHNet constructor arguments recovered from a built MONAI/reference AHNet."""
    spatial_dims = model.conv1.weight.dim() - 2
    layers = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    in_channels = model.conv1.weight.shape[1]
    out_channels = model.final.conv.out_channels
    psp_block_num = len(model.psp.pool_modules)
    up = model.up0.up
    if isinstance(up, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        upsample_mode = "transpose"
    else:
        upsample_mode = up.mode
    return dict(
        layers=layers,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        psp_block_num=psp_block_num,
        upsample_mode=upsample_mode,
    )


#: ``from ahnet_fast import AHNet`` is the fast model (a drop-in for MONAI's AHNet)
AHNet = FastAHNet
