"""Compiled CPU inference: ``torch.compile`` (inductor, with freezing) once per process and model.

On a CPU the fused ops take the composite path (``ahnet_fast.ops.composite``: plain torch ops),
so inductor sees the whole network: with freezing it folds every eval-mode BatchNorm into its
conv, prepacks the conv weights for oneDNN and fuses the elementwise tails (ReLU, residual add,
z-pool). :func:`inference_model` wraps a model once per process (a weak cache keyed on the
model object) and every later window, volume and call reuses it. Inductor's own on-disk caches
(FX graph and AOTAutograd caches, ``TORCHINDUCTOR_CACHE_DIR``) are left on, so a second process
with the same model and window shape compiles in a fraction of the first one's time.

The compile happens on the first call of each new input shape; :func:`compile_seconds` says
how long the first calls took beyond a steady call, so callers can report it apart from the
inference time.

Weights are frozen into the compiled graph: after ``load_state_dict``, an optimizer step or
``.to()`` call :func:`forget` (or ``inference_model(model, recompile=True)``) so the next call
compiles again with the new weights.
"""
from __future__ import annotations

import logging
import shutil
import time
import weakref
from typing import Callable

import torch
from torch import nn

__all__ = ["compile_available", "compile_seconds", "forget", "inference_model", "maybe_compiled", "should_compile"]

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# model -> _Compiled; weak: the compiled module dies with the model
_CACHE: "weakref.WeakKeyDictionary[nn.Module, _Compiled]" = weakref.WeakKeyDictionary()


def compile_available() -> tuple[bool, str]:
    """(inductor can compile for the CPU here, why not). Inductor's CPU backend needs a C++
    compiler; without one the eager composite path is used."""
    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            return True, f"C++ compiler {cxx} found"
    return False, "no C++ compiler (g++, c++, clang++) on PATH: inductor cannot build CPU kernels"


def should_compile(model: nn.Module, device: torch.device | str, *, enabled: bool | None = None) -> bool:
    """Whether to run ``model`` compiled: ``enabled`` True forces it, False refuses it, None
    (auto) decides by measurement.

    Measured (bench/results/cpu.md, AMD EPYC, 2 cores, torch 2.13.0, 1x1x128x128x32 eval): the
    compiled fast model does not pay today. Its steady forward is slower than the eager
    composite path (ratio to MONAI eager 0.92 against 0.57 on 1 thread), and the first call
    compiles for about 5 minutes; the no_grad dense-block buffers (``torch.add``/``torch.cat``
    with ``out=`` slices) break dynamo's graph. So auto is False; it only ever considers the
    CPU (CUDA has its own kernels and CUDA graphs), eval mode, and a machine where inductor
    can build CPU kernels."""
    if enabled is None or not enabled:
        return False
    if torch.device(device).type != "cpu" or model.training:
        return False
    ok, why = compile_available()
    if not ok:
        log.info("compiled inference off: %s", why)
    return ok


class _Compiled:
    """One model's compiled callable plus the time its compiling calls took."""

    def __init__(self, model: nn.Module) -> None:
        # freezing: weights become constants of the graph, so inductor folds BN into the convs
        # and prepacks oneDNN weights (inference only: eval mode, no autograd)
        self.module = model  # sliding_window_inference reads the model's size rules from it
        self.fn = torch.compile(model, options={"freezing": True})
        self.shapes: set[tuple] = set()
        self.compile_s = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device.type)
        with torch.no_grad():
            if key in self.shapes:
                return self.fn(x)
            t0 = time.perf_counter()
            y = self.fn(x)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            y = self.fn(x)
            steady = time.perf_counter() - t0
        self.shapes.add(key)
        self.compile_s += max(0.0, first - steady)
        log.info("compiled %s for input %s in %.1f s", type(self.fn).__name__, key[0], first - steady)
        return y


def inference_model(model: nn.Module, *, recompile: bool = False) -> Callable[[Tensor], Tensor]:
    """The compiled form of ``model`` for inference, built once per process and model.

    Call it like the model (under no_grad, which it applies itself). The model must be in eval
    mode; its weights are frozen into the compiled graph (see :func:`forget`)."""
    if model.training:
        raise ValueError("inference_model needs a model in eval mode (call model.eval()): freezing folds "
                         "the BatchNorm running statistics into the convs")
    hit = _CACHE.get(model)
    if hit is None or recompile:
        hit = _Compiled(model)
        _CACHE[model] = hit
    return hit


def maybe_compiled(model: nn.Module, device: torch.device | str, *, enabled: bool | None = None,
                   autocast_dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor] | nn.Module:
    """``inference_model(model)`` where :func:`should_compile` says so, else ``model``.

    Under autocast (bf16) the eager model is kept: the compiled bf16 path is not measured.
    This is what ``segment`` / ``evaluate`` call: ``--compile`` passes ``enabled=True``,
    ``--no-compile`` ``enabled=False``, neither ``None`` (auto)."""
    if autocast_dtype is not None or not should_compile(model, device, enabled=enabled):
        return model
    return inference_model(model)


def compile_seconds(model: nn.Module) -> float:
    """Seconds the compiling calls of ``model``'s compiled form took beyond a steady call
    (0 when it was never compiled in this process)."""
    hit = _CACHE.get(model)
    return hit.compile_s if hit is not None else 0.0


def forget(model: nn.Module) -> None:
    """Drop ``model``'s compiled form (e.g. after its weights changed)."""
    _CACHE.pop(model, None)
