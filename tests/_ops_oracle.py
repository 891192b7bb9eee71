"""Shared checking harness for the fused ops (imported by tests/test_ops_*.py and test_nn.py).

Every check draws fresh random inputs (never zeros), rounds them to the dtype under test, and
compares the op (run on one backend, dtype and layout) with the float64 torch composition of the
SAME rounded inputs: outputs, every gradient, and the updated running statistics.

Tolerances (DESIGN.md): float32 relative error <= 1e-5 (TF32 is off, see conftest); float16 and
bfloat16 error <= 2x the error of the same-dtype torch composition (nn.Conv3d/BatchNorm3d/ReLU
run in that dtype), where that reference error is taken as at least the rounding of the result
into the dtype (half an ulp of its largest value) - nothing can do better than that; never NaN.
Relative error = max |a - ref| / max |ref|.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ahnet_fast.ops import bn_act_conv, conv_bn_act, use_backend, zmaxpool
from ahnet_fast.ops.reference import without_onednn, onednn_conv_backward_unsafe

CL = torch.channels_last_3d
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": CL}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv_bn_act / bn_act_conv call: shapes and options."""
    n: int
    cin: int
    cout: int
    hwd: tuple[int, int, int]
    kernel: tuple[int, int, int] = (3, 3, 1)
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (1, 1, 0)
    zpool: str = "none"
    residual: bool = False
    relu: bool = True
    training: bool = True
    bias: bool = False

    def id(self) -> str:
        k = "".join(map(str, self.kernel))
        s = "s2" if self.stride[0] == 2 else ""
        flags = [self.zpool if self.zpool != "none" else "", "res" if self.residual else "",
                 "" if self.relu else "norelu", "train" if self.training else "eval", "bias" if self.bias else ""]
        return f"n{self.n}_{self.cin}to{self.cout}_{'x'.join(map(str, self.hwd))}_k{k}{s}_" + "_".join(f for f in flags if f)


K331 = dict(kernel=(3, 3, 1), padding=(1, 1, 0))
K331S2 = dict(kernel=(3, 3, 1), stride=(2, 2, 1), padding=(1, 1, 0))
K113 = dict(kernel=(1, 1, 3), padding=(0, 0, 1))
K111 = dict(kernel=(1, 1, 1), padding=(0, 0, 0))
K111S2 = dict(kernel=(1, 1, 1), stride=(2, 2, 1), padding=(0, 0, 0))
STEM = dict(kernel=(7, 7, 3), stride=(2, 2, 1), padding=(3, 3, 1))


def combos(cases, *, half_dtypes: bool = True, float32_both_layouts: bool = True):
    """(spec, dtype, layout) params: float32 in both layouts for every case (or in one,
    alternating); float16 and bfloat16 once per case, alternating layouts between cases
    (pairwise coverage of dtype x layout x case; the CPU and the interpreter are slow)."""
    import pytest

    lays = list(LAYOUTS)
    out = []
    for i, spec in enumerate(cases):
        for lay in (lays if float32_both_layouts else [lays[(i + 1) % 2]]):
            out.append(pytest.param(spec, "float32", lay, id=f"{spec.id()}-float32-{lay}"))
        if half_dtypes:
            for j, dt in enumerate(("float16", "bfloat16")):
                lay = lays[(i + j) % 2]
                out.append(pytest.param(spec, dt, lay, id=f"{spec.id()}-{dt}-{lay}"))
    return out


# ----------------------------------------------------------------------------- error metrics
def rel_err(a: torch.Tensor, ref: torch.Tensor, scale_floor: float = 0.0) -> float:
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    scale = max(r64.abs().max().item() if r64.numel() else 0.0, scale_floor)
    diff = (a64 - r64).abs().max().item() if r64.numel() else 0.0
    return diff / max(scale, 1e-30)


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                 torch_same_dtype: Optional[torch.Tensor], scale_floor: float = 0.0) -> None:
    """``scale_floor``: for a gradient that is exactly zero in theory (the conv bias under
    batch-statistics BN), the magnitude its rounding errors are measured against."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the result"
    err = rel_err(got, ref64, scale_floor)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
        return
    assert torch_same_dtype is not None
    base = max(rel_err(torch_same_dtype, ref64, scale_floor), 0.5 * torch.finfo(dtype).eps)
    assert err <= 2 * base, f"{name}: error {err:.3e} > 2x the {dtype} torch composition's ({base:.3e})"


def poison_allocator(device: torch.device, nbytes: int = 1 << 22) -> None:
    """Fill freshly freed memory with NaN so outputs a kernel forgets to write show up."""
    t = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del t


# ----------------------------------------------------------------------------- input drawing
def _draw(spec: ConvSpec, dtype: torch.dtype, pre: bool, gen: torch.Generator) -> dict:
    """Float64 master tensors already rounded to ``dtype`` (so rounding of inputs is not error)."""
    h, w, d = spec.hwd
    k = spec.kernel
    fan_in = spec.cin * k[0] * k[1] * k[2]
    bn_c = spec.cin if pre else spec.cout

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).double()

    def u(*shape, lo, hi):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype).double()

    t = {
        "x": r(spec.n, spec.cin, h, w, d, shift=0.3),
        "weight": r(spec.cout, spec.cin, *k, scale=fan_in ** -0.5),
        "conv_bias": r(spec.cout, scale=0.2) if spec.bias else None,
        # negative gammas included: a pool before the affine must not be flipped by them
        "bn_weight": u(bn_c, lo=-1.5, hi=1.5),
        "bn_bias": r(bn_c, scale=0.5),
        "running_mean": r(bn_c, scale=0.2),
        "running_var": u(bn_c, lo=0.5, hi=1.5),
    }
    return t


def _to(t: Optional[torch.Tensor], dtype, device, fmt=None, grad=False) -> Optional[torch.Tensor]:
    if t is None:
        return None
    out = t.to(device=device, dtype=dtype)
    if fmt is not None and out.dim() == 5:
        out = out.contiguous(memory_format=fmt)
    out = out.detach().clone(memory_format=torch.preserve_format) if fmt is not None else out.detach().clone()
    return out.requires_grad_(grad)


# ----------------------------------------------------------------------------- compositions
def torch_conv_bn_act(t: dict, spec: ConvSpec, residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn-equivalent composition; returns (out, running_mean, running_var) (stats updated in place)."""
    c = F.conv3d(t["x"], t["weight"], t["conv_bias"], spec.stride, spec.padding)
    if spec.zpool == "before_bn":
        c = F.max_pool3d(c, (1, 1, 2))
    y = F.batch_norm(c, t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], spec.training, 0.1, 1e-5)
    if spec.zpool == "after_bn":
        y = F.max_pool3d(y, (1, 1, 2))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if spec.relu else y


def torch_bn_act_conv(t: dict, spec: ConvSpec, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    z = F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], spec.training,
                     0.1, 1e-5)
    if spec.relu:
        z = torch.relu(z)
    o = F.conv3d(z, t["weight"], t["conv_bias"], spec.stride, spec.padding)
    return o if residual is None else o + residual


def _out_shape(spec: ConvSpec) -> list[int]:
    h, w, d = spec.hwd
    sp = [(s + 2 * p - k) // st + 1 for s, p, k, st in zip((h, w, d), spec.padding, spec.kernel, spec.stride)]
    if spec.zpool != "none":
        sp[-1] //= 2
    return [spec.n, spec.cout, *sp]


_GRAD_KEYS = ("x", "weight", "conv_bias", "bn_weight", "bn_bias", "residual")


def _run(kind: str, t: dict, spec: ConvSpec, dtype, device, fmt, backend: Optional[str], grad_out64,
         grad: bool = True):
    """Run the op (backend given) or the torch composition (backend None) in ``dtype``.

    grad=False runs the forward only, under torch.no_grad (the inference paths: one fused
    kernel in eval, stats straight from the conv epilogue in training)."""
    tt = {k: _to(v, dtype, device, fmt, grad=grad and k not in ("running_mean", "running_var"))
          for k, v in t.items() if k != "residual"}
    res = _to(t.get("residual"), dtype, device, fmt, grad=grad)
    if not grad:
        with torch.no_grad():
            out, _, rm, rv = _run_forward(kind, tt, spec, res, backend, device)
        return out, {}, rm, rv
    out, tt, _, _ = _run_forward(kind, tt, spec, res, backend, device)
    inputs = [(k, tt[k]) for k in _GRAD_KEYS if tt.get(k) is not None]
    go = grad_out64.to(device=device, dtype=dtype)
    if fmt is not None:
        go = go.contiguous(memory_format=fmt)
    # torch's oneDNN conv backward is wrong on some CPUs where the kernel exceeds the input
    # (ahnet_fast.ops.reference.onednn_conv_backward_unsafe): the same-dtype torch composition
    # that sets the 16-bit tolerance must not be that garbage, so it uses torch's other kernel
    unsafe = backend is None and onednn_conv_backward_unsafe(tt["x"], tt["weight"])
    with use_backend(backend or "reference"), without_onednn(unsafe):
        grads = torch.autograd.grad(out, [v for _, v in inputs], go)
    return out, dict(zip([k for k, _ in inputs], grads)), tt["running_mean"], tt["running_var"]


def _run_forward(kind: str, tt: dict, spec: ConvSpec, res, backend: Optional[str], device):
    if backend is None:
        out = torch_conv_bn_act(tt, spec, res) if kind == "conv_bn_act" else torch_bn_act_conv(tt, spec, res)
    else:
        poison_allocator(device)
        with use_backend(backend):
            if kind == "conv_bn_act":
                out = conv_bn_act(tt["x"], tt["weight"], tt["bn_weight"], tt["bn_bias"], tt["running_mean"],
                                  tt["running_var"], conv_bias=tt["conv_bias"], stride=spec.stride,
                                  padding=spec.padding, training=spec.training, momentum=0.1, eps=1e-5,
                                  zpool=spec.zpool, residual=res, relu=spec.relu)
            else:
                out = bn_act_conv(tt["x"], tt["bn_weight"], tt["bn_bias"], tt["running_mean"], tt["running_var"],
                                  tt["weight"], conv_bias=tt["conv_bias"], stride=spec.stride, padding=spec.padding,
                                  training=spec.training, momentum=0.1, eps=1e-5, relu=spec.relu, residual=res)
    tt["residual"] = res
    return out, tt, tt["running_mean"], tt["running_var"]


def check_conv_op(kind: str, spec: ConvSpec, dtype: torch.dtype, layout: str, backend: str,
                  device: str = "cpu", seed: int = 0) -> None:
    """Check conv_bn_act or bn_act_conv on one backend against the float64 composition."""
    gen = torch.Generator().manual_seed(seed)
    t = _draw(spec, dtype, kind == "bn_act_conv", gen)
    oshape = _out_shape(spec) if kind == "conv_bn_act" else _out_shape(dataclasses.replace(spec, zpool="none"))
    if spec.residual:
        t["residual"] = (torch.randn(*oshape, generator=gen, dtype=torch.float64)).to(dtype).double()
    grad_out = torch.randn(*oshape, generator=gen, dtype=torch.float64).to(dtype).double()
    fmt = LAYOUTS[layout]
    dev = torch.device(device)

    ref = _run(kind, t, spec, torch.float64, torch.device("cpu"), None, None, grad_out)
    got = _run(kind, t, spec, dtype, dev, fmt, backend, grad_out)
    same = _run(kind, t, spec, dtype, dev, fmt, None, grad_out) if dtype in (torch.float16, torch.bfloat16) else None

    out, grads, rm, rv = got
    assert out.dtype == dtype and out.device.type == dev.type
    assert out.is_contiguous(memory_format=fmt), f"output does not follow the input layout {layout}"
    assert_close("output", out, ref[0], dtype, same[0] if same else None)
    for k, g_ref in ref[1].items():
        assert k in grads, f"missing gradient for {k}"
        # with batch statistics the conv bias cancels exactly (its gradient is 0 in theory):
        # measure it on the scale of the sums it is made of, ~ the weight gradient's
        floor = ref[1]["weight"].abs().max().item() if k == "conv_bias" else 0.0
        assert_close(f"grad {k}", grads[k], g_ref, dtype, same[1][k] if same else None, floor)
    if spec.training:
        assert_close("running_mean", rm, ref[2], dtype, same[2] if same else None)
        assert_close("running_var", rv, ref[3], dtype, same[3] if same else None)
    else:  # eval leaves the running statistics alone
        assert torch.equal(rm.double().cpu(), t["running_mean"]) and torch.equal(rv.double().cpu(), t["running_var"])

    # the no-grad forward takes other paths (eval: BN folded into one fused conv kernel)
    out_ng, _, rm_ng, rv_ng = _run(kind, t, spec, dtype, dev, fmt, backend, grad_out, grad=False)
    assert out_ng.is_contiguous(memory_format=fmt)
    assert_close("no-grad output", out_ng, ref[0], dtype, same[0] if same else None)
    if spec.training:
        assert_close("no-grad running_mean", rm_ng, ref[2], dtype, same[2] if same else None)
        assert_close("no-grad running_var", rv_ng, ref[3], dtype, same[3] if same else None)


def zpool_input(shape, dtype: torch.dtype, gen: torch.Generator, specials: bool = True) -> torch.Tensor:
    """Random input with exact ties and NaNs placed in some pairs (both orders, and NaN-NaN)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    if specials and shape[-1] >= 2:
        flat = x.view(-1, shape[-1])
        rows = flat.shape[0]
        flat[0::3, 1] = flat[0::3, 0]                 # ties: first wins
        flat[1::5, 0] = float("nan")                  # NaN first
        if shape[-1] >= 4:
            flat[2::7, 3] = float("nan")              # NaN second
            flat[min(4, rows - 1), 2:4] = float("nan")  # NaN-NaN: the second takes the gradient
    return x


def check_zmaxpool(shape, dtype: torch.dtype, layout: str, backend: str, device: str = "cpu", seed: int = 0,
                   specials: bool = True) -> None:
    """zmaxpool vs F.max_pool3d((1,1,2)): values and gradients equal bit for bit (NaN == NaN)."""
    gen = torch.Generator().manual_seed(seed)
    x = zpool_input(shape, dtype, gen, specials).to(device).contiguous(memory_format=LAYOUTS[layout])
    go = torch.randn(*shape[:4], shape[4] // 2, generator=gen, dtype=torch.float64).to(dtype).to(device)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.max_pool3d(xr, (1, 1, 2))
    (g_ref,) = torch.autograd.grad(ref, xr, go)
    xo = x.detach().clone().requires_grad_(True)
    poison_allocator(x.device)
    with use_backend(backend):
        out = zmaxpool(xo)
        (g,) = torch.autograd.grad(out, xo, go)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ"
    assert torch.equal(out.nan_to_num(0.0), ref.detach().nan_to_num(0.0)), "values differ"
    assert torch.equal(g, g_ref), "gradients differ (tie/NaN routing or odd tail)"
