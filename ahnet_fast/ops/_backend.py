"""Backend policy for the fused ops: the ONLY place that decides which implementation runs.

Backends (each a module with the same functions, see ``reference.py``):

* ``reference`` - plain torch ops; the oracle and the CPU path. Serves every input.
* ``triton``    - the Triton launchers in ``ahnet_fast.kernels``; CUDA tensors, or any tensor
  when the Triton interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
* ``cuda``      - the compiled extension loaded through ``ahnet_fast._cuda``.

Choice, most specific first: the innermost ``use_backend(name)`` context (context-local, so
threads and asyncio tasks do not leak into each other), else the ``AHNET_FAST_BACKEND``
environment variable, else ``auto``.

* An explicit backend that cannot serve a call raises :class:`BackendUnavailableError` listing
  every reason (device, dtype, layout, extension not built, interpreter off, ...).
* ``auto`` tries ``cuda`` then ``triton`` then ``reference`` for CUDA tensors (for the conv ops
  ``triton`` then ``reference`` until the CUDA conv is validated on a GPU, see
  ``CUDA_CONV_VALIDATED``) and only ``reference`` for other devices (the interpreter is a
  checking tool, never a fast path); every fallback is logged once per (op, backend, reasons)
  at debug level. For the forward ops on a GPU, where more than one backend can serve a call,
  auto times them once per shape class and keeps the fastest, remembered on disk per GPU and
  versions (``_autoselect``); the fixed order applies until then and wherever timing is off.
* Deterministic mode (``torch.use_deterministic_algorithms(True)``) excludes kernels that reduce
  with atomics: the Triton kernels never do (contract), the CUDA extension must declare it.

The requested name travels with each op call as a string argument so that the backward pass
uses the backend chosen where the forward ran. Under ``torch.compile`` the argument is ``""``
(a ContextVar cannot be traced), meaning "resolve when the op runs".
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from types import ModuleType
from typing import Callable, Iterator, Optional, Sequence

import torch

from . import _autoselect

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_status",
    "composite_path",
    "get_backend",
    "requested_backend",
    "select",
    "use_backend",
]

log = logging.getLogger("ahnet_fast.ops")

ENV_VAR = "AHNET_FAST_BACKEND"
BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda")
_NAMES: tuple[str, ...] = ("auto",) + BACKENDS
_MODULES = {
    "reference": "ahnet_fast.ops.reference",
    "triton": "ahnet_fast.ops.triton_backend",
    "cuda": "ahnet_fast.ops.cuda_backend",
}

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ahnet_fast_backend", default=None)
_logged: set[tuple[str, str, str]] = set()

# The CUDA extension's conv (csrc/cuda/conv_fused.cu) is WMMA/mma.sync, with no wgmma path on
# sm_90, while the Triton conv compiles to wgmma there; and the extension's conv has not yet run
# on a GPU. Until a GPU run has passed its tests and measured it against the Triton conv, auto
# does not choose it for the conv ops (the explicit backend "cuda" still runs it). The first
# GPU run that validates it flips this flag (bench/gpu_check.sh reports both backends).
CUDA_CONV_VALIDATED = False
_CONV_OPS = frozenset({"conv_bn_act", "bn_act_conv"})


def _auto_order(op: str) -> tuple[str, ...]:
    """Backends auto tries for a CUDA tensor, best first."""
    if op in _CONV_OPS and not CUDA_CONV_VALIDATED:
        return ("triton", "reference")
    return ("cuda", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message lists every reason."""


def _validate(name: str, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _NAMES:
        raise ValueError(f"{source}={name!r} is not a backend; accepted: {', '.join(_NAMES)}")
    return name.strip().lower()


def requested_backend() -> str:
    """The backend name requested here and now: use_backend context > env var > 'auto'."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    if env is None or env.strip() == "":
        return "auto"
    return _validate(env, ENV_VAR)


def get_backend() -> str:
    """Public alias of :func:`requested_backend` ('auto', 'reference', 'triton' or 'cuda')."""
    return requested_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the fused ops inside it with backend ``name``.

    ``name`` is one of 'auto', 'reference', 'triton', 'cuda'. Context-local (a ContextVar):
    other threads and tasks are unaffected; nesting restores the outer choice on exit.
    The backward of an op uses the backend its forward was called with.
    """
    token = _override.set(_validate(name, "use_backend(name)"))
    try:
        yield name
    finally:
        _override.reset(token)


def call_arg() -> str:
    """The backend string passed to each op call ('' under torch.compile: resolve at run time)."""
    if torch.compiler.is_compiling():
        return ""
    return requested_backend()


def composite_path(x: torch.Tensor) -> bool:
    """True when a call on ``x`` takes the composite path (``ahnet_fast.ops.composite``: plain
    torch ops that autograd and inductor see through) instead of a custom op.

    That is ``auto`` for any tensor not on a CUDA device: there the only custom-op backend
    would be the reference one, whose opaque ops cost extra passes eagerly and block
    inductor's BN folding and fusion. Under ``torch.compile`` a ``use_backend`` context cannot
    be read while tracing, so CPU tensors always take the composite path there unless the
    AHNET_FAST_BACKEND environment variable names an explicit backend.
    """
    if x.device.type == "cuda":
        return False
    if torch.compiler.is_compiling():
        env = os.environ.get(ENV_VAR)
        return env is None or env.strip().lower() in ("", "auto")
    return requested_backend() == "auto"


def module(name: str) -> ModuleType:
    """Import a backend module (cheap: backend modules import their kernels lazily)."""
    return importlib.import_module(_MODULES[name])


def backend_status() -> dict[str, tuple[bool, str]]:
    """name -> (usable on this machine at all, human-readable reason). Used by `ahnet-fast info`.

    'usable' means the backend can serve some input here (e.g. triton with the interpreter on a
    CPU machine); per-call limits (dtype, layout, ...) are reported when a call is refused.
    """
    return {name: module(name).availability() for name in BACKENDS}


def _reasons(name: str, op: str, tensors: Sequence[Optional[torch.Tensor]]) -> list[str]:
    try:
        mod = module(name)
    except Exception as exc:  # a broken backend module must not break the others
        return [f"backend module failed to import ({type(exc).__name__}: {exc})"]
    ok, why = mod.availability()
    reasons = [] if ok else [why]
    reasons += mod.reasons(op, tensors)
    if torch.are_deterministic_algorithms_enabled() and op in mod.atomic_ops():
        reasons.append(
            f"deterministic mode is on and the {name} kernels for {op} reduce with atomics "
            "(or do not declare that they do not)")
    # de-duplicate, keep order
    return list(dict.fromkeys(reasons))


def select(op: str, requested: str, tensors: Sequence[Optional[torch.Tensor]], *, variant: object = "",
           run: Optional[Callable[[ModuleType], object]] = None) -> ModuleType:
    """Pick the backend module for one call of ``op`` on ``tensors`` (first tensor = the input).

    ``requested`` is the string the op received ('' means: resolve now). Raises
    BackendUnavailableError for an explicit backend that cannot serve the call. ``run(module)``
    (a forward op passes it, with ``variant`` naming its flags): runs the call on a backend, so
    that auto on a GPU can time the candidates (``_autoselect``).
    """
    name = _validate(requested, "backend") if requested else requested_backend()
    x = tensors[0]
    assert x is not None
    if name != "auto":
        reasons = _reasons(name, op, tensors)
        if reasons:
            raise BackendUnavailableError(
                f"ahnet_fast.ops.{op}: backend {name!r} cannot serve this call "
                f"(input {tuple(x.shape)} {x.dtype} on {x.device}):\n  - " + "\n  - ".join(reasons)
                + f"\nUse backend 'auto' (falls back quietly) or 'reference' (always works), via "
                f"{ENV_VAR} or ahnet_fast.use_backend(name).")
        return module(name)
    order = _auto_order(op) if x.device.type == "cuda" else ("reference",)
    if run is not None and x.device.type == "cuda":
        name = _autoselect.decide(op, variant, tensors, order, lambda c: not _reasons(c, op, tensors),
                                  lambda c: run(module(c)))
        if name is not None:
            return module(name)
    for cand in order:
        reasons = _reasons(cand, op, tensors)
        if not reasons:
            return module(cand)
        key = (op, cand, "; ".join(reasons))
        if key not in _logged:
            _logged.add(key)
            log.debug("ahnet_fast.ops.%s: auto skips backend %r: %s", op, cand, key[2])
    raise AssertionError("the reference backend refused a call")  # pragma: no cover
