"""Per-op benchmarks: every contender for AH-Net's conv blocks and z-pool, side by side.

Cases (``OpCase``; tensors (N, C, H, W, D), D = slice axis):

* ``post``  conv -> BatchNorm -> ReLU (encoder, ``ahnet_fast.ops.conv_bn_act``)
* ``pre``   BatchNorm -> ReLU -> conv (decoder, ``ahnet_fast.ops.bn_act_conv``)
* ``zpool`` (1,1,2) max-pool along D (``ahnet_fast.ops.zmaxpool``)

Modes: ``infer`` (eval BN, running statistics, no autograd) and ``train`` (batch statistics;
forward + backward for the input, the conv weight and BN gamma/beta).

Contenders (all in the case's dtype; layout channels_last_3d unless named ``contig``):
eager torch in both layouts (the baseline), folded-BN conv (+ReLU), cuDNN's fused
conv+bias+ReLU, the zero-copy 2D-view conv2d identities (3x3x1 = conv2d on (N,C,H,W*D)
with dilation (1,D); 1x1x3 = conv2d on (N,C,H*W,D)), torch.compile (max-autotune;
inductor freezing, which folds BN, for inference), and ours through each backend
(reference, triton, cuda). z-pool: F.max_pool3d in both layouts, max over a (D/2, 2)
view, compiled, ours. A contender that cannot run here is reported as
``unavailable: <reason>``; one that raises is ``failed: <error>``; one that fails the
correctness gate is ``wrong: <errors>`` and is not timed.

Minimal bytes (for GB/s) and FLOPs (for TFLOP/s), E = element size:

* conv infer: bytes = (|x| + |y| + |w|) E, flops = 2 |y| Cin kh kw kd
* conv train: bytes = (3|x| + 3|y| + 3|w|) E: forward reads x, writes y; backward reads
  grad_y, x (weight grad) and y (BN/ReLU backward), writes grad_x; w read twice, grad_w
  written; flops = 3x forward (fprop, dgrad, wgrad)
* zpool infer: bytes = (|x| + |y|) E; train: (3|x| + 2|y|) E (forward x->y; backward
  reads x and grad_y, writes grad_x)

Run: ``python -m bench.ops [--shapes ...] [--quick] [--out DIR]`` or ``ahnet-fast bench ops``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench import common
from bench.common import Unavailable, short_error

CL3D = torch.channels_last_3d
EPS = 1e-5
MOMENTUM = 0.1


# ----------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class OpCase:
    """One op at one shape. ``c_out`` is ignored for ``zpool`` (it keeps C)."""

    name: str
    kind: str  # "post" | "pre" | "zpool"
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    d: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        if self.kind not in ("post", "pre", "zpool"):
            raise ValueError(f"case {self.name}: kind {self.kind!r} not in post, pre, zpool")
        if min(self.n, self.c_in, self.c_out, self.h, self.w, self.d) < 1:
            raise ValueError(f"case {self.name}: every size must be >= 1")
        if self.kind == "zpool" and self.d < 2:
            raise ValueError(f"case {self.name}: z-pool needs D >= 2, got {self.d}")

    @property
    def padding(self) -> tuple[int, int, int]:
        return tuple((k - 1) // 2 for k in self.kernel)  # type: ignore[return-value]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.n, self.c_in, self.h, self.w, self.d)

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.kind == "zpool":
            return (self.n, self.c_in, self.h, self.w, self.d // 2)
        dims = [(s + 2 * p - k) // st + 1 for s, p, k, st in
                zip((self.h, self.w, self.d), self.padding, self.kernel, self.stride)]
        return (self.n, self.c_out, *dims)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, self.c_in, *self.kernel)

    @property
    def bn_channels(self) -> int:
        return self.c_out if self.kind == "post" else self.c_in

    def flops(self, mode: str) -> float:
        y = math.prod(self.out_shape)
        if self.kind == "zpool":
            return float(y if mode == "infer" else y + math.prod(self.in_shape))
        fwd = 2.0 * y * self.c_in * math.prod(self.kernel)
        return fwd if mode == "infer" else 3.0 * fwd

    def min_bytes(self, mode: str, elt: int) -> float:
        x, y = math.prod(self.in_shape), math.prod(self.out_shape)
        if self.kind == "zpool":
            return float((x + y if mode == "infer" else 3 * x + 2 * y) * elt)
        w = math.prod(self.weight_shape)
        return float((x + y + w if mode == "infer" else 3 * (x + y + w)) * elt)

    def describe(self) -> str:
        shape = "x".join(map(str, (self.n, self.h, self.w, self.d)))
        if self.kind == "zpool":
            return f"zpool C={self.c_in} @ {shape}"
        k = "x".join(map(str, self.kernel))
        s = "" if self.stride == (1, 1, 1) else " stride " + "x".join(map(str, self.stride))
        return f"{self.kind} {k} {self.c_in}->{self.c_out}{s} @ {shape}"


def _case(name: str, kind: str, kernel: str | None, cin: int, cout: int, shape: str) -> OpCase:
    n, h, w, d = (int(v) for v in shape.split("x"))
    k = tuple(int(v) for v in kernel.split("x")) if kernel else (1, 1, 1)
    return OpCase(name, kind, n, cin, cout, h, w, d, k)  # type: ignore[arg-type]


def _default_cases() -> dict[str, OpCase]:
    cases = [
        _case("dec_3x3x1_80-20", "pre", "3x3x1", 80, 20, "2x96x96x32"),
        _case("dec_1x1x3_20-20", "pre", "1x1x3", 20, 20, "2x96x96x32"),
        _case("enc_3x3x1_64-64", "post", "3x3x1", 64, 64, "2x48x48x16"),
        _case("stem_zpool_64", "zpool", None, 64, 64, "2x96x96x64"),
        # layer3/layer4 of a 1x192x192x64 input: few output tiles, deep K (split-K on a GPU)
        _case("deep_3x3x1_256-256", "post", "3x3x1", 256, 256, "1x12x12x4"),
        _case("deep_3x3x1_512-512", "post", "3x3x1", 512, 512, "1x6x6x2"),
    ]
    for kind in ("post", "pre"):
        for kernel in ("3x3x1", "1x1x3"):
            for c in (64, 128, 256):
                cases.append(_case(f"syn_{kind}_{kernel}_C{c}", kind, kernel, c, c, "1x192x192x64"))
    return {c.name: c for c in cases}


DEFAULT_CASES: dict[str, OpCase] = _default_cases()
#: a GPU subset that runs in well under a minute
QUICK_CASES = ["dec_3x3x1_80-20", "dec_1x1x3_20-20", "enc_3x3x1_64-64", "stem_zpool_64",
               "syn_post_3x3x1_C128", "deep_3x3x1_512-512"]
#: CPU smoke-test shapes: odd sizes, C not a multiple of 16
TINY_CASES: dict[str, OpCase] = {c.name: c for c in [
    _case("tiny_pre_3x3x1_6-5", "pre", "3x3x1", 6, 5, "1x6x5x4"),
    _case("tiny_post_1x1x3_5-7", "post", "1x1x3", 5, 7, "2x5x3x3"),
    _case("tiny_post_3x3x1_4-4", "post", "3x3x1", 4, 4, "1x5x6x2"),
    _case("tiny_zpool_5", "zpool", None, 5, 5, "1x4x3x6"),
]}
GROUPS = {
    "all": list(DEFAULT_CASES),
    "quick": QUICK_CASES,
    "tiny": list(TINY_CASES),
    "decoder": ["dec_3x3x1_80-20", "dec_1x1x3_20-20"],
    "encoder": ["enc_3x3x1_64-64"],
    "zpool": ["stem_zpool_64"],
    "deep": ["deep_3x3x1_256-256", "deep_3x3x1_512-512"],
    "synthetic": [n for n in DEFAULT_CASES if n.startswith("syn_")],
    "ahnet": ["dec_3x3x1_80-20", "dec_1x1x3_20-20", "enc_3x3x1_64-64", "stem_zpool_64"],
}

_SPEC = re.compile(r"^(post|pre):(\d+x\d+x\d+):(\d+)-(\d+):(\d+x\d+x\d+x\d+)$")
_ZSPEC = re.compile(r"^zpool:(\d+):(\d+x\d+x\d+x\d+)$")
SPEC_HELP = ("comma-separated case names, groups (" + ", ".join(GROUPS) + ") or specs "
             "KIND:KHxKWxKD:CIN-COUT:NxHxWxD (KIND post|pre) / zpool:C:NxHxWxD")


def parse_cases(spec: str | Sequence[str] | None, *, quick: bool = False) -> list[OpCase]:
    """Names, groups or explicit specs -> cases (default: all, or the quick group)."""
    if spec is None or spec == "" or spec == []:
        items = list(GROUPS["quick" if quick else "all"])
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [s.strip() for part in spec for s in part.split(",") if s.strip()]
    known = {**DEFAULT_CASES, **TINY_CASES}
    out: list[OpCase] = []
    for item in items:
        if item in GROUPS:
            out.extend(known[n] for n in GROUPS[item])
        elif item in known:
            out.append(known[item])
        elif m := _SPEC.match(item):
            out.append(_case(item, m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)))
        elif m := _ZSPEC.match(item):
            out.append(_case(item, "zpool", None, int(m.group(1)), int(m.group(1)), m.group(2)))
        else:
            raise ValueError(f"unknown op case {item!r}; accepted: {SPEC_HELP}; names: "
                             + ", ".join(known))
    seen: dict[str, OpCase] = {}
    for c in out:
        seen.setdefault(c.name, c)
    return list(seen.values())


# ----------------------------------------------------------------------------
# parameters, inputs, the reference


@dataclass
class Params:
    weight: torch.Tensor  # (Cout, Cin, kh, kw, kd), case dtype, contiguous
    gamma: torch.Tensor  # (C_bn,) float32
    beta: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def to(self, dtype: torch.dtype | None = None, layout: str = "contig") -> "Params":
        """Detached copies (never aliases) in ``dtype`` (BN tensors float32, or float64)."""
        w = self.weight.detach().to(dtype or self.weight.dtype, copy=True)
        if layout == "cl3d":
            w = w.contiguous(memory_format=CL3D)
        bn_dtype = dtype if dtype == torch.float64 else torch.float32
        return Params(w, *(t.detach().to(bn_dtype, copy=True)
                           for t in (self.gamma, self.beta, self.running_mean, self.running_var)))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval BN folded into the conv (post-activation only): w' = w*s, b' = beta - mean*s."""
        scale = self.gamma / torch.sqrt(self.running_var + EPS)
        w = (self.weight.float() * scale.view(-1, 1, 1, 1, 1)).to(self.weight.dtype)
        b = (self.beta - self.running_mean * scale).to(self.weight.dtype)
        return w, b


def make_params(case: OpCase, device: torch.device, dtype: torch.dtype, seed: int) -> Params:
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = case.bn_channels
    fan_in = case.c_in * math.prod(case.kernel)
    weight = torch.randn(case.weight_shape, generator=g) * math.sqrt(2.0 / fan_in)
    gamma = 0.5 + torch.rand(c, generator=g)
    beta = 0.1 * torch.randn(c, generator=g)
    mean = 0.1 * torch.randn(c, generator=g)
    var = 0.5 + torch.rand(c, generator=g)
    return Params(weight.to(device, dtype), *(t.to(device) for t in (gamma, beta, mean, var)))


class Inputs:
    """Rotating input sets (x_i, grad_y_i), fresh random normal values, both layouts on demand."""

    def __init__(self, case: OpCase, mode: str, device: torch.device, dtype: torch.dtype, sets: int, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        self.x = [torch.randn(case.in_shape, generator=g, device=device, dtype=dtype) for _ in range(sets)]
        self.gy = ([torch.randn(case.out_shape, generator=g, device=device, dtype=dtype) for _ in range(sets)]
                   if mode == "train" else [None] * sets)
        self._cl: list[tuple] | None = None

    def sets(self, layout: str) -> list[tuple]:
        if layout == "contig":
            return list(zip(self.x, self.gy))
        if self._cl is None:
            self._cl = [(x.contiguous(memory_format=CL3D), None if gy is None else gy.contiguous(memory_format=CL3D))
                        for x, gy in zip(self.x, self.gy)]
        return self._cl


def output_names(case: OpCase, mode: str) -> list[str]:
    if mode == "infer":
        return ["out"]
    return ["out", "grad_x"] if case.kind == "zpool" else ["out", "grad_x", "grad_w", "grad_gamma", "grad_beta"]


def _bn(x: torch.Tensor, p: Params, training: bool) -> torch.Tensor:
    return F.batch_norm(x, p.running_mean, p.running_var, p.gamma, p.beta, training, MOMENTUM, EPS)


def eager_forward(case: OpCase, p: Params, training: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain torch composition (what a user writes); running stats are updated in training."""
    if case.kind == "post":
        return lambda x: F.relu(_bn(F.conv3d(x, p.weight, None, case.stride, case.padding), p, training))
    if case.kind == "pre":
        return lambda x: F.conv3d(F.relu(_bn(x, p, training)), p.weight, None, case.stride, case.padding)
    return lambda x: F.max_pool3d(x, (1, 1, 2), (1, 1, 2))


def grad_leaves(case: OpCase, p: Params) -> list[torch.Tensor]:
    """The parameters whose gradients a training contender returns (made leaves requiring grad)."""
    if case.kind == "zpool":
        return []
    return [p.weight.requires_grad_(True), p.gamma.requires_grad_(True), p.beta.requires_grad_(True)]


def train_wrap(forward: Callable[[torch.Tensor], torch.Tensor], leaves: Sequence[torch.Tensor]) -> Callable:
    """fn(x, grad_y) -> [out, grad_x, *grads of leaves] through autograd."""

    def fn(x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
        xg = x.detach().requires_grad_(True)
        out = forward(xg)
        grads = torch.autograd.grad(out, [xg, *leaves], gy)
        return [out.detach(), *grads]

    return fn


def infer_wrap(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    return lambda x, gy=None: [forward(x)]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 oracle for float32 runs; float32 (TF32 off) for bf16/fp16 runs."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def compute_reference(case: OpCase, mode: str, params: Params, x: torch.Tensor, gy: torch.Tensor | None,
                      dtype: torch.dtype) -> list[torch.Tensor]:
    rdt = reference_dtype(dtype)
    p = params.to(rdt)
    fwd = eager_forward(case, p, mode == "train")
    with common.no_tf32():
        if mode == "infer":
            with torch.no_grad():
                return [fwd(x.to(rdt))]
        return [t.detach() for t in train_wrap(fwd, grad_leaves(case, p))(x.to(rdt), gy.to(rdt))]


# ----------------------------------------------------------------------------
# contenders


@dataclass
class BuildContext:
    case: OpCase
    mode: str
    device: torch.device
    dtype: torch.dtype
    params: Params  # case dtype, contiguous; contenders take copies via params.to(layout=...)
    compile_mode: str = "max-autotune"


@dataclass
class Contender:
    """``build(ctx)`` returns fn(x, grad_y) -> list of outputs (see output_names) or raises
    Unavailable. ``family`` groups contenders for the summary ratios."""

    name: str
    family: str  # "eager" | "alternative" | "compile" | "ours"
    layout: str  # "contig" | "cl3d"
    build: Callable[[BuildContext], Callable]
    kinds: frozenset = frozenset({"post", "pre", "zpool"})
    modes: frozenset = frozenset({"infer", "train"})
    graphable: bool = True  # False: never capture into our own CUDA graph (compile uses its own)
    unavailable_on_error: bool = False  # optional baselines: an error at the first call = unavailable
    note: str = ""


def _layout_params(ctx: BuildContext, layout: str) -> Params:
    """Each contender gets its own copies (training updates running statistics in place)."""
    return ctx.params.to(None, layout)


def _build_eager(layout: str) -> Callable[[BuildContext], Callable]:
    def build(ctx: BuildContext) -> Callable:
        p = _layout_params(ctx, layout)
        fwd = eager_forward(ctx.case, p, ctx.mode == "train")
        return infer_wrap(fwd) if ctx.mode == "infer" else train_wrap(fwd, grad_leaves(ctx.case, p))

    return build


def _build_folded(ctx: BuildContext) -> Callable:
    w, b = _layout_params(ctx, "cl3d").folded()
    w = w.contiguous(memory_format=CL3D)
    case = ctx.case
    return infer_wrap(lambda x: F.relu(F.conv3d(x, w, b, case.stride, case.padding), inplace=True))


def _build_cudnn_relu(ctx: BuildContext) -> Callable:
    if ctx.device.type != "cuda":
        raise Unavailable("torch.cudnn_convolution_relu needs CUDA")
    fn = getattr(torch, "cudnn_convolution_relu", None)
    if fn is None:
        raise Unavailable("torch.cudnn_convolution_relu not in this torch build")
    w, b = _layout_params(ctx, "cl3d").folded()
    w = w.contiguous(memory_format=CL3D)
    case = ctx.case
    return infer_wrap(lambda x: fn(x, w, b, list(case.stride), list(case.padding), [1, 1, 1], 1))


def _view_conv(case: OpCase) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The zero-copy conv2d identity of a 3x3x1 or 1x1x3 stride-1 conv (both layouts)."""
    if case.stride != (1, 1, 1) or case.kernel not in ((3, 3, 1), (1, 1, 3)):
        raise Unavailable(f"2D-view identity covers 3x3x1 / 1x1x3 stride 1, not {case.describe()}")

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        n, c, h, wd, d = x.shape
        co = w.shape[0]
        if case.kernel == (3, 3, 1):
            y = F.conv2d(x.view(n, c, h, wd * d), w.view(co, c, 3, 3), b, 1, (1, d), (1, d))
        else:
            y = F.conv2d(x.view(n, c, h * wd, d), w.view(co, c, 1, 3), b, 1, (0, 1))
        return y.view(n, co, h, wd, d)

    return conv


def _build_view(ctx: BuildContext) -> Callable:
    case = ctx.case
    conv = _view_conv(case)
    p = _layout_params(ctx, "cl3d")
    training = ctx.mode == "train"
    if case.kind == "post" and not training:
        w, b = p.folded()
        w = w.contiguous(memory_format=CL3D)
        return infer_wrap(lambda x: F.relu(conv(x, w, b), inplace=True))
    if case.kind == "post":
        fwd = lambda x: F.relu(_bn(conv(x, p.weight, None), p, training))  # noqa: E731
    else:
        fwd = lambda x: conv(F.relu(_bn(x, p, training)), p.weight, None)  # noqa: E731
    return infer_wrap(fwd) if not training else train_wrap(fwd, grad_leaves(case, p))


def _build_view_pool(ctx: BuildContext) -> Callable:
    d2 = ctx.case.d // 2

    def fwd(x: torch.Tensor) -> torch.Tensor:
        v = x[..., : 2 * d2].unflatten(4, (d2, 2))
        # amax splits the gradient between ties; max(dim) routes it to one index like max_pool3d
        return v.amax(-1) if ctx.mode == "infer" else v.max(-1).values

    return infer_wrap(fwd) if ctx.mode == "infer" else train_wrap(fwd, [])


class _Block(nn.Module):
    """The case as nn modules (for torch.compile; freezing folds the BN in eval)."""

    def __init__(self, case: OpCase, p: Params):
        super().__init__()
        self.kind = case.kind
        if case.kind == "zpool":
            return
        self.conv = nn.Conv3d(case.c_in, case.c_out, case.kernel, case.stride, case.padding, bias=False,
                              device=p.weight.device, dtype=p.weight.dtype)
        self.bn = nn.BatchNorm3d(case.bn_channels, eps=EPS, momentum=MOMENTUM, device=p.gamma.device)
        with torch.no_grad():
            self.conv.weight.copy_(p.weight)
            self.conv.weight.data = self.conv.weight.data.contiguous(memory_format=CL3D)
            self.bn.weight.copy_(p.gamma)
            self.bn.bias.copy_(p.beta)
            self.bn.running_mean.copy_(p.running_mean)
            self.bn.running_var.copy_(p.running_var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "post":
            return F.relu(self.bn(self.conv(x)))
        if self.kind == "pre":
            return self.conv(F.relu(self.bn(x)))
        return F.max_pool3d(x, (1, 1, 2), (1, 1, 2))


def _build_compiled(ctx: BuildContext) -> Callable:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # no recompile limits or dynamic shapes carried over from other cases
    block = _Block(ctx.case, ctx.params.to(None, "cl3d"))
    training = ctx.mode == "train"
    block.train(training)
    compiled = torch.compile(block, mode=ctx.compile_mode, dynamic=False, fullgraph=True)
    x0 = torch.randn(ctx.case.in_shape, device=ctx.device, dtype=ctx.dtype).contiguous(memory_format=CL3D)
    if not training:
        # compile now (first call), with freezing: parameters become constants, BN folds into the conv
        with inductor_config.patch(freezing=True), torch.no_grad():
            compiled(x0)
        return infer_wrap(compiled)
    leaves = [] if ctx.case.kind == "zpool" else [block.conv.weight, block.bn.weight, block.bn.bias]
    fn = train_wrap(compiled, leaves)
    fn(x0, torch.randn(ctx.case.out_shape, device=ctx.device, dtype=ctx.dtype).contiguous(memory_format=CL3D))
    return fn


def _ours_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (ImportError, NotImplementedError)):
        return True
    if type(exc).__name__ == "BackendUnavailableError":
        return True
    return bool(re.search(r"not built|unavailable|not available|cannot serve", str(exc), re.IGNORECASE))


def _build_ours(backend: str, split_k: bool = True, conv_kernel: str | None = None) -> Callable[[BuildContext], Callable]:
    """Our op through one backend; conv_kernel pins the CUDA backend's conv kernel ("wmma"/"wgmma")."""
    def build(ctx: BuildContext) -> Callable:
        if backend != "reference" and ctx.device.type != "cuda":
            raise Unavailable(f"the {backend} backend is timed on CUDA tensors only "
                              "(the Triton interpreter is a checking tool)")
        kernel_ctx: Callable[[], Any] = contextlib.nullcontext
        if conv_kernel is not None:
            from ahnet_fast import _cuda

            if conv_kernel == "wgmma" and not _cuda.wgmma_supported(ctx.device):
                raise Unavailable("the wgmma conv needs a compute capability 9.0 GPU and a 9.0a build "
                                  f"({_cuda.status()[1]})")
            kernel_ctx = lambda: _cuda.use_conv_kernel(conv_kernel)  # noqa: E731
        op_name = {"post": "conv_bn_act", "pre": "bn_act_conv", "zpool": "zmaxpool"}[ctx.case.kind]
        try:
            ops = importlib.import_module("ahnet_fast.ops")
            op = getattr(ops, op_name)
            use_backend = ops.use_backend
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"ahnet_fast.ops.{op_name}: {short_error(exc)}") from None
        case = ctx.case
        p = _layout_params(ctx, "cl3d")
        training = ctx.mode == "train"
        if case.kind == "post":
            fwd = lambda x: op(x, p.weight, p.gamma, p.beta, p.running_mean, p.running_var,  # noqa: E731
                               stride=case.stride, padding=case.padding, training=training,
                               momentum=MOMENTUM, eps=EPS, relu=True)
        elif case.kind == "pre":
            fwd = lambda x: op(x, p.gamma, p.beta, p.running_mean, p.running_var, p.weight,  # noqa: E731
                               stride=case.stride, padding=case.padding, training=training,
                               momentum=MOMENTUM, eps=EPS, relu=True)
        else:
            fwd = op
        inner = infer_wrap(fwd) if not training else train_wrap(fwd, grad_leaves(case, p))

        from ahnet_fast.kernels.conv import automatic_split_k

        def fn(x: torch.Tensor, gy: torch.Tensor | None) -> list[torch.Tensor]:
            # backward runs inside too: it resolves the backend at run time
            with use_backend(backend), automatic_split_k(split_k), kernel_ctx():
                return inner(x, gy)

        return fn

    return build


def default_contenders(*, compile: bool = True) -> list[Contender]:
    conv = frozenset({"post", "pre"})
    out = [
        Contender("eager contig", "eager", "contig", _build_eager("contig"),
                  note="F.conv3d/F.batch_norm/F.relu or F.max_pool3d, contiguous"),
        Contender("eager cl3d", "eager", "cl3d", _build_eager("cl3d"), note="same, channels_last_3d"),
        Contender("folded-BN conv+ReLU", "alternative", "cl3d", _build_folded, kinds=frozenset({"post"}),
                  modes=frozenset({"infer"}), note="BN folded into weight/bias; conv3d + in-place ReLU"),
        Contender("cudnn conv+bias+ReLU", "alternative", "cl3d", _build_cudnn_relu, kinds=frozenset({"post"}),
                  modes=frozenset({"infer"}), unavailable_on_error=True,
                  note="torch.cudnn_convolution_relu with folded BN"),
        Contender("conv2d view", "alternative", "cl3d", _build_view, kinds=conv,
                  note="3x3x1 = conv2d (N,C,H,W*D) dilation (1,D); 1x1x3 = conv2d (N,C,H*W,D)"),
        Contender("max over (D/2,2) view", "alternative", "cl3d", _build_view_pool, kinds=frozenset({"zpool"}),
                  note="amax (infer) / max(dim).values (train) over x.unflatten(4, (D//2, 2))"),
    ]
    if compile:
        out.append(Contender("torch.compile", "compile", "cl3d", _build_compiled, graphable=False,
                             note="nn modules, fullgraph; inference with inductor freezing"))
    for backend in ("triton", "cuda", "reference"):
        out.append(Contender(f"ours[{backend}]", "ours", "cl3d", _build_ours(backend)))
    out.append(Contender("ours[cuda] wgmma", "ours", "cl3d", _build_ours("cuda", conv_kernel="wgmma"), kinds=conv,
                         note="the CUDA backend with the sm_90a wgmma + TMA conv (not chosen by default until verified)"))
    out.append(Contender("ours[triton] unsplit", "ours", "cl3d", _build_ours("triton", split_k=False), kinds=conv,
                         note="the Triton conv without its split-K plan (what split-K buys on few-tile convs)"))
    return out


# ----------------------------------------------------------------------------
# running


def _metrics(case: OpCase, mode: str, dtype: torch.dtype, ms: float, ceilings: dict) -> dict:
    elt = torch.empty((), dtype=dtype).element_size()
    flops, nbytes = case.flops(mode), case.min_bytes(mode, elt)
    rec = {"gbps": nbytes / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12}
    bw, peak = ceilings.get("copy_GBps"), ceilings.get("matmul_TFLOPs")
    if bw and peak:
        floor_ms = max(nbytes / (bw * 1e9), flops / (peak * 1e12)) * 1e3
        rec["floor_ms"] = floor_ms
        pct = {"pct_bw": 100 * rec["gbps"] / bw, "pct_flops": 100 * rec["tflops"] / peak,
               "pct_roofline": 100 * floor_ms / ms}
        if max(pct.values()) > 100.0:  # faster than the roof: the ceiling was under-measured, not the op
            rec["roofline_note"] = (f"{max(pct.values()):.0f}% of a measured ceiling: the ceiling is too low "
                                    "(cache-resident op or a noisy measurement); no % reported")
        else:
            rec.update(pct)
    return rec


def _case_record(case: OpCase, mode: str, dtype: torch.dtype, ceilings: dict) -> dict:
    elt = torch.empty((), dtype=dtype).element_size()
    flops, nbytes = case.flops(mode), case.min_bytes(mode, elt)
    rec = {"case": case.name, "describe": case.describe(), "kind": case.kind, "mode": mode,
           "dtype": common.dtype_name(dtype), "in_shape": list(case.in_shape), "out_shape": list(case.out_shape),
           "kernel": list(case.kernel), "flops": flops, "min_bytes": nbytes,
           "intensity": flops / nbytes if nbytes else None}
    bw, peak = ceilings.get("copy_GBps"), ceilings.get("matmul_TFLOPs")
    if bw and peak:
        ridge = peak * 1e12 / (bw * 1e9)
        rec["bound"] = "memory" if rec["intensity"] < ridge else "compute"
    return rec


def run_contender(contender: Contender, ctx: BuildContext, inputs: Inputs, refs: list[torch.Tensor],
                  base_errors: list[float] | None, *, reps: int, warmup: int, max_seconds: float) -> dict:
    """Build, check, time and measure one contender; never raises (the record says what happened)."""
    rec: dict[str, Any] = {"contender": contender.name, "family": contender.family, "layout": contender.layout,
                           "note": contender.note}
    device, mode = ctx.device, ctx.mode
    names = output_names(ctx.case, mode)
    grad_ctx = torch.no_grad if mode == "infer" else contextlib.nullcontext
    t0 = time.perf_counter()
    fn = None
    try:
        with grad_ctx():
            fn = contender.build(ctx)
            sets = inputs.sets(contender.layout)
            outs = fn(*sets[0])
            common.sync(device)
    except Unavailable as exc:
        return {**rec, "status": f"unavailable: {exc}"}
    except Exception as exc:  # report and move on: one broken contender must not end the run
        unavailable = contender.unavailable_on_error or (contender.family == "ours" and _ours_unavailable(exc))
        return {**rec, "status": f"{'unavailable' if unavailable else 'failed'}: {short_error(exc)}"}
    rec["build_s"] = time.perf_counter() - t0
    check = common.check_outputs(outs, refs, names, ctx.dtype, base_errors)
    rec["check"] = check.as_dict()
    if contender.layout == "cl3d" and mode == "infer" and outs[0].dim() == 5 \
            and not outs[0].is_contiguous(memory_format=CL3D) and outs[0].shape[1] > 1:
        rec["layout_note"] = "output not channels_last_3d"
    del outs
    if not check.ok:
        return {**rec, "status": f"wrong: {check.reason}"}
    try:
        with grad_ctx():
            timing = common.time_fn(fn, sets, device, reps=reps, warmup=warmup,
                                    graph="auto" if contender.graphable else False, max_seconds=max_seconds)
            rec["timing"] = timing.as_dict()
            rec["ms"] = timing.ms
            rec["peak_bytes"] = common.peak_memory_bytes(fn, sets[0], device)
    except Exception as exc:
        return {**rec, "status": f"failed: timing: {short_error(exc)}"}
    rec["status"] = "ok"
    return rec


def run_ops(
    cases: Sequence[OpCase],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    modes: Sequence[str] = ("infer", "train"),
    reps: int = 100,
    warmup: int = 5,
    max_seconds: float = 10.0,
    compile: bool = True,
    compile_mode: str = "max-autotune",
    contenders: Sequence[Contender] | None = None,
    only: Sequence[str] | None = None,
    extra_contenders: Sequence[Contender] = (),
    out_dir: str | Path | None = None,
    budget_s: float | None = None,
    compile_min_left_s: float = 45.0,
    quick_ceilings: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = common.log,
) -> dict:
    """Run every (case, mode, contender); return the payload (also written to
    ``out_dir``/ops.json and ops.md after every case when ``out_dir`` is given).

    Order: AH-Net's own shapes (names not starting with ``syn_``) with every contender
    but torch.compile, then those shapes compiled, then the synthetic shapes the same
    way; so a time budget (``budget_s``) runs out on what matters least. Contenders
    that do not fit are recorded as ``skipped``. ``only``: contender names to keep
    (substring match)."""
    from bench import report

    for m in modes:
        if m not in ("infer", "train"):
            raise ValueError(f"mode {m!r} not in infer, train")
    deadline = common.Deadline(budget_s)
    flags = common.set_flags(dtype)
    env = common.env_record(device)
    log(f"[ops] device {env.get('gpu') or env['device']}, torch {env['torch']}, dtype {common.dtype_name(dtype)}, "
        f"{reps} timed calls per contender")
    if device.type != "cuda":
        log(f"[ops] {common.CPU_NOTE}")
    ceilings = common.measure_ceilings(device, quick=quick_ceilings, dtype=dtype)
    log(f"[ops] {common.describe_ceilings(ceilings)}")
    cudnn = common.cudnn_conv_check(device) if device.type == "cuda" else {"skipped": "no CUDA device"}
    all_contenders = list(contenders if contenders is not None else default_contenders(compile=compile))
    all_contenders += list(extra_contenders)
    if only:
        all_contenders = [c for c in all_contenders if any(o in c.name for o in only)]
    payload: dict[str, Any] = {
        "suite": "ops", "env": env, "flags": flags, "ceilings": ceilings, "cudnn_check": cudnn,
        **({"note": common.CPU_NOTE} if device.type != "cuda" else {}),
        "config": {"dtype": common.dtype_name(dtype), "modes": list(modes), "reps": reps, "warmup": warmup,
                   "max_seconds": max_seconds, "compile_mode": compile_mode if compile else None,
                   "budget_s": budget_s, "cases": [c.name for c in cases],
                   "reference": f"eager composition in {common.dtype_name(reference_dtype(dtype))}, TF32 off"},
        "results": [],
    }
    out = Path(out_dir) if out_dir is not None else None

    def save(plot: bool = False) -> None:
        if out is not None:
            report.write_suite(out, payload, plot=plot)

    t_start = time.monotonic()
    # AH-Net's own shapes first (cheap contenders, then compiled), synthetic shapes after them
    cheap = [c for c in all_contenders if c.family != "compile"]
    compiled = [c for c in all_contenders if c.family == "compile"]
    first = [c for c in cases if not c.name.startswith("syn_")]
    later = [c for c in cases if c.name.startswith("syn_")]
    stages = [(group, todo_all, todo_all is compiled) for group in (first, later) if group
              for todo_all in (cheap, compiled) if todo_all]
    for stage_no, (stage_cases, stage_contenders, is_compile) in enumerate(stages):
        for case in stage_cases:
            for mode in modes:
                todo = [c for c in stage_contenders if case.kind in c.kinds and mode in c.modes]
                if not todo:
                    continue
                base = _case_record(case, mode, dtype, ceilings)
                min_left = compile_min_left_s if is_compile else 3.0
                if deadline.expired(min_left):
                    for c in todo:
                        payload["results"].append({**base, "contender": c.name, "family": c.family,
                                                   "layout": c.layout, "status": "skipped: time budget spent"})
                    continue
                t_case = time.perf_counter()
                try:
                    state = _prepare(case, mode, device, dtype, seed)
                except Exception as exc:  # e.g. out of memory at this shape
                    for c in todo:
                        payload["results"].append({**base, "contender": c.name, "family": c.family,
                                                   "layout": c.layout, "status": f"failed: setup: {short_error(exc)}"})
                    common.free_memory(device)
                    continue
                params, inputs, refs, base_errors = state
                ctx = BuildContext(case, mode, device, dtype, params, compile_mode)
                for c in todo:
                    if deadline.expired(min_left):
                        rec = {"contender": c.name, "family": c.family, "layout": c.layout,
                               "status": "skipped: time budget spent"}
                    else:
                        rec = run_contender(c, ctx, inputs, refs, base_errors, reps=reps, warmup=warmup,
                                            max_seconds=max_seconds)
                        if rec.get("status") == "ok":
                            rec.update(_metrics(case, mode, dtype, rec["ms"], ceilings))
                    payload["results"].append({**base, **rec})
                    ms = f"{rec['ms']:.4f} ms" if rec.get("ms") is not None and rec["status"] == "ok" else ""
                    log(f"[ops] {case.name:24s} {mode:5s} {c.name:24s} {rec['status']} {ms}".rstrip())
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                del state, params, inputs, refs, ctx
                common.free_memory(device)
                log(f"[ops] {case.name} {mode}: {time.perf_counter() - t_case:.1f} s, budget left "
                    f"{deadline.left():.0f} s")
                save()
        if stage_no < len(stages) - 1:
            save(plot=True)  # later stages may be cut short by the budget: keep a plot of this one
    payload["elapsed_s"] = time.monotonic() - t_start
    save(plot=True)
    return payload


def _prepare(case: OpCase, mode: str, device: torch.device, dtype: torch.dtype, seed: int):
    elt = torch.empty((), dtype=dtype).element_size()
    per_set = math.prod(case.in_shape) * elt + (math.prod(case.out_shape) * elt if mode == "train" else 0)
    sets = common.rotation_sets(per_set, device)
    params = make_params(case, device, dtype, seed)
    inputs = Inputs(case, mode, device, dtype, sets, seed + 1)
    refs = compute_reference(case, mode, params, inputs.x[0], inputs.gy[0], dtype)
    # error of the plain same-dtype torch composition: the yardstick of the gate
    base_fn = _build_eager("contig")(BuildContext(case, mode, device, dtype, params))
    with torch.no_grad() if mode == "infer" else contextlib.nullcontext():
        base_outs = base_fn(inputs.x[0], inputs.gy[0])
    base_errors = [common.rel_err(o, r) for o, r in zip(base_outs, refs)]
    del base_outs
    return params, inputs, refs, base_errors


# ----------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser, *, shapes_flag: str = "--shapes") -> None:
    parser.add_argument(shapes_flag, dest="shapes", default=None, help=SPEC_HELP)
    parser.add_argument("--modes", default=None, help="infer,train (comma-separated; default both)")
    parser.add_argument("--contenders", default=None,
                        help="keep only contenders whose name contains one of these (comma-separated)")


#: the cases of a CPU run when none are named: the GPU shapes take minutes per contender on a CPU
CPU_DEFAULT_GROUP = "tiny"


def parse_modes(spec: str | None) -> list[str]:
    """``"infer,train"`` -> the modes (default both); raises ValueError naming a wrong one."""
    modes = [m.strip() for m in (spec or "infer,train").split(",") if m.strip()]
    bad = [m for m in modes if m not in ("infer", "train")]
    if bad or not modes:
        raise ValueError(f"--modes {spec!r}: expected infer, train or infer,train")
    return modes


def run_from_args(args: argparse.Namespace) -> dict:
    modes = parse_modes(args.modes)
    opts = common.run_options(args)
    shapes = args.shapes
    if shapes is None and opts.device.type != "cuda":
        shapes = CPU_DEFAULT_GROUP
        common.log(f"[ops] CPU run: the '{CPU_DEFAULT_GROUP}' cases by default (--shapes names others)")
    cases = parse_cases(shapes, quick=args.quick)
    only = [s.strip() for s in args.contenders.split(",")] if args.contenders else None
    payload = run_ops(cases, device=opts.device, dtype=opts.dtype, modes=modes, reps=opts.reps,
                      compile=opts.compile, compile_mode=args.compile_mode, only=only, out_dir=opts.out,
                      budget_s=opts.budget_s, quick_ceilings=args.quick, max_seconds=opts.max_seconds)
    common.log(f"[ops] results in {opts.out}")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    return common.suite_main(argv, prog="python -m bench.ops", description=__doc__.split("\n")[0],
                             add_arguments=add_arguments, run_from_args=run_from_args)


if __name__ == "__main__":
    sys.exit(main())
