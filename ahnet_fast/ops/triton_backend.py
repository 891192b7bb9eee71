"""Triton backend: the launchers in ``ahnet_fast.kernels`` strung together by ``_fused``.

Serves CUDA tensors, and any tensor while the Triton interpreter is on (TRITON_INTERPRET=1 set
before triton was first imported - the way CI checks the kernels on a CPU). The kernels are
imported on first use, never at import time, and never touch CUDA before a call.
The Triton kernels reduce without atomics (per-tile partials and a deterministic merge), so
deterministic mode may use them.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional, Sequence

import torch

from ._fused import LAUNCHERS, OPTIONAL_LAUNCHERS, FusedPipeline

NAME = "triton"
_MODULES = {  # launcher -> module of ahnet_fast.kernels that defines it (OPS_CONTRACT.md)
    "conv3d_fused": "conv",
    "channel_stats": "batchnorm",
    "bn_act_apply": "batchnorm",
    "bn_act_backward": "batchnorm",
    "zmaxpool_forward": "zpool",
    "zmaxpool_backward": "zpool",
}
assert set(_MODULES) == set(LAUNCHERS + OPTIONAL_LAUNCHERS)


def _load() -> dict[str, Callable]:
    importlib.import_module("triton")  # a clear ImportError when triton is absent
    found: dict[str, Callable] = {}
    for launcher, mod in _MODULES.items():
        try:
            m = importlib.import_module(f"ahnet_fast.kernels.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ahnet_fast.kernels.{mod}":
                raise
            continue
        fn = getattr(m, launcher, None)
        if fn is not None:
            found[launcher] = fn
    # optional keyword arguments the launchers take (FEATURES in _fused)
    found["features"] = frozenset({"finalize_in_merge", "apply_from_stats", "add_to_grad_y"})
    return found


# The Triton conv is a generic implicit GEMM (taps are constexprs), so it also serves the stem's
# 7x7x3 /(2,2,1): conv, z-pool, BN affine and ReLU become one launch in inference instead of
# a torch conv plus two passes over its (unpooled) 64-channel output.
STEM_KERNEL = (7, 7, 3)
_pipe = FusedPipeline(NAME, _load, extra_kernels=(STEM_KERNEL,))


def interpreting() -> bool:
    """True when the Triton kernels run under the interpreter (decided when triton is imported)."""
    try:
        from ahnet_fast.kernels import _common
    except Exception:
        return os.environ.get("TRITON_INTERPRET") == "1"
    return bool(_common.INTERPRET)


def availability() -> tuple[bool, str]:
    err = _pipe.load_error()
    if err is not None:
        return False, f"Triton kernels unavailable ({err})"
    lau = _pipe.launchers()
    missing = [n for n in LAUNCHERS if getattr(lau, n) is None]
    where = ("CUDA device" if torch.cuda.is_available() else
             "no CUDA device; CPU tensors through the Triton interpreter" if interpreting() else
             "no CUDA device and the interpreter is off (TRITON_INTERPRET=1 before import)")
    usable = torch.cuda.is_available() or interpreting()
    if len(missing) == len(LAUNCHERS):
        return False, "no Triton launchers found in ahnet_fast.kernels"
    note = f"; not yet available: {', '.join(missing)}" if missing else ""
    if "conv3d_fused" in missing:
        note += " (convs run through torch, BN/ReLU/pool stay fused)"
    return usable, where + note


def reasons(op: str, tensors: Sequence[Optional[torch.Tensor]]) -> list[str]:
    out = []
    x = tensors[0]
    assert x is not None
    if x.device.type != "cuda" and not interpreting():
        out.append(f"input is on {x.device}: Triton needs CUDA tensors, or the interpreter "
                   "(TRITON_INTERPRET=1 set before triton is imported) for CPU tensors")
    return out + _pipe.call_reasons(op, tensors)


def atomic_ops() -> frozenset[str]:
    return frozenset()  # contract: every reduction is per-tile partials + deterministic merge


zmaxpool_forward = _pipe.zmaxpool_forward
zmaxpool_backward = _pipe.zmaxpool_backward
conv_bn_act_forward = _pipe.conv_bn_act_forward
conv_bn_act_backward = _pipe.conv_bn_act_backward
bn_act_conv_forward = _pipe.bn_act_conv_forward
bn_act_conv_backward = _pipe.bn_act_conv_backward
bn_stats = _pipe.bn_stats
bn_apply = _pipe.bn_apply
bn_backward = _pipe.bn_backward
