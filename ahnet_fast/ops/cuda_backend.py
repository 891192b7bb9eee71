"""CUDA backend: the compiled extension (csrc/), reached only through ``ahnet_fast._cuda``.

``ahnet_fast._cuda`` exposes the same launchers as ``ahnet_fast.kernels`` (OPS_CONTRACT.md) for
the kernels it has, plus ``status() -> (usable, reason)``. It is imported lazily and every
failure (module absent, extension not built, built for another torch) becomes a refusal reason.
Kernels are assumed to reduce with atomics unless the extension lists the op in
``DETERMINISTIC_OPS``, so deterministic mode only uses what it declares safe.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence

import torch

from ._fused import LAUNCHERS, FusedPipeline

NAME = "cuda"


def _module():
    return importlib.import_module("ahnet_fast._cuda")


def _load() -> dict[str, Callable]:
    try:
        mod = _module()
    except ImportError as exc:
        raise ImportError(f"extension not built (ahnet_fast._cuda: {exc})") from exc
    status = getattr(mod, "status", None)
    if status is not None:
        ok, why = status()
        if not ok:
            raise RuntimeError(f"extension not usable: {why}")
    # the loader keeps Python wrappers for every launcher; `implemented()` names those whose
    # kernels the built extension really registers
    have = set(mod.implemented()) if hasattr(mod, "implemented") else set(LAUNCHERS)
    return {n: getattr(mod, n) for n in LAUNCHERS if n in have and getattr(mod, n, None) is not None}


_pipe = FusedPipeline(NAME, _load)


def availability() -> tuple[bool, str]:
    err = _pipe.load_error()
    if err is not None:
        return False, err
    lau = _pipe.launchers()
    missing = [n for n in LAUNCHERS if getattr(lau, n) is None]
    if len(missing) == len(LAUNCHERS):
        return False, "extension built but exposes no launchers"
    if not torch.cuda.is_available():
        return False, "extension built, but no CUDA device is visible"
    return True, "compiled extension" + (f"; not yet available: {', '.join(missing)}" if missing else "")


def reasons(op: str, tensors: Sequence[Optional[torch.Tensor]]) -> list[str]:
    out = []
    x = tensors[0]
    assert x is not None
    if x.device.type != "cuda":
        out.append(f"input is on {x.device}: the CUDA extension needs CUDA tensors")
    return out + _pipe.call_reasons(op, tensors)


def atomic_ops() -> frozenset[str]:
    try:
        declared = frozenset(getattr(_module(), "DETERMINISTIC_OPS", ()))
    except ImportError:
        declared = frozenset()
    return frozenset({"zmaxpool", "conv_bn_act", "bn_act_conv"}) - declared


zmaxpool_forward = _pipe.zmaxpool_forward
zmaxpool_backward = _pipe.zmaxpool_backward
conv_bn_act_forward = _pipe.conv_bn_act_forward
conv_bn_act_backward = _pipe.conv_bn_act_backward
bn_act_conv_forward = _pipe.bn_act_conv_forward
bn_act_conv_backward = _pipe.bn_act_conv_backward
bn_stats = _pipe.bn_stats
bn_apply = _pipe.bn_apply
bn_backward = _pipe.bn_backward
