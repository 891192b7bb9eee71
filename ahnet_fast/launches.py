"""Count what a forward or a training step launches, exactly, on any machine (a CPU included).

At batch 1 on a GPU the fast AH-Net is decided by launch overhead as much as by any kernel,
so the number of device kernels one forward issues is a budget the tests enforce
(tests/test_launch_budget.py) and ``bench/model.py`` prints. Two kinds are counted:

* Triton kernel launches (``kernel[grid](...)``): intercepted where triton starts a kernel
  (``JITFunction.run`` and, under TRITON_INTERPRET=1, ``InterpretedFunction.run``). With
  ``run_triton=False`` they are recorded and NOT run (their outputs stay uninitialised), so a
  full-size model "runs" on a CPU in seconds; the records keep the kernel name, the grid and a
  description of every argument, enough to know which specialisation and config a GPU would
  compile.
* torch operators that launch a kernel: every ATen op seen by a TorchDispatchMode, except
  views, allocations and metadata ops (they launch nothing). The bodies of the project's own
  custom ops (``ahnet_fast::*``) are entered, so the torch ops they issue are counted and the
  op itself is not (it is a Python function, not a kernel).

This is a measuring instrument for tests and benchmarks: it patches triton's launch entry
points only inside the context and never changes what is computed when ``run_triton=True``.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchLog", "TensorArg", "TritonLaunch", "count_launches", "model_launches", "record_launches"]


@dataclass(frozen=True)
class TensorArg:
    """What a kernel sees of a tensor argument: shape, dtype and strides (not the data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...]


@dataclass(frozen=True)
class TritonLaunch:
    """One Triton kernel launch: kernel name, grid (None when it is a callable of the config),
    positional arguments (tensors as :class:`TensorArg`) and keyword arguments (constexprs)."""

    kernel: str
    grid: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class LaunchLog:
    """What ran inside :func:`record_launches`."""

    triton: list[TritonLaunch] = field(default_factory=list)
    torch_ops: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Device kernels launched: Triton launches plus kernel-launching torch ops."""
        return len(self.triton) + sum(self.torch_ops.values())

    def triton_counts(self) -> Counter:
        return Counter(rec.kernel for rec in self.triton)

    def summary(self, top: int = 12) -> str:
        """A short human-readable breakdown (for test failures and benchmark logs)."""
        tri = ", ".join(f"{k} x{v}" for k, v in self.triton_counts().most_common(top))
        ops = ", ".join(f"{k} x{v}" for k, v in self.torch_ops.most_common(top))
        return (f"{self.total} launches: {len(self.triton)} Triton [{tri}]; "
                f"{sum(self.torch_ops.values())} torch ops [{ops}]")


# ATen ops that launch no device kernel: allocations, metadata, and aliasing (views).
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::lift_fresh", "aten::alias", "aten::_unsafe_view", "aten::set_",
    "aten::resize_", "aten::_reshape_alias", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
}


def _launches_kernel(func: torch._ops.OpOverload) -> bool:
    name = func._schema.name
    if name in _NO_KERNEL:
        return False
    rets = func._schema.returns
    # a view returns an alias of an input and writes nothing
    if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
        return False
    return True


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorArg(tuple(v.shape), v.dtype, tuple(v.stride()))
    if isinstance(v, (list, tuple)):
        return type(v)(_describe(t) for t in v)
    return v


_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd


class _OpCounter(TorchDispatchMode):
    def __init__(self, log: LaunchLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ahnet_fast":
            # run the custom op's Python body with this mode active again, so the torch ops it
            # issues are counted (the op itself is not a kernel)
            opdef = torch._library.custom_ops._maybe_get_opdef(func._name)
            if opdef is None:  # pragma: no cover - every ahnet_fast op is a custom_op
                raise RuntimeError(f"cannot enter {func._name}: not a torch.library.custom_op")
            with self:
                return opdef._init_fn(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _IMPLICIT):
            # below autograd (inside a custom op's body) composite ops such as `to` or
            # `contiguous` arrive undecomposed: decompose them here so that what they really
            # run (a copy, or nothing) is seen
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if _launches_kernel(func):
            self.log.torch_ops[func._schema.name] += 1
        return func(*args, **kwargs)


_patch_lock = threading.Lock()


def _run_targets() -> list[type]:
    """The classes whose ``run`` starts a Triton kernel (compiled and interpreted)."""
    import triton.runtime.jit as jit

    targets: list[type] = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        pass
    else:
        targets.append(InterpretedFunction)
    return targets


@contextlib.contextmanager
def _triton_recorder(log: LaunchLog, run: bool) -> Iterator[None]:
    try:
        targets = _run_targets()
    except ImportError:  # no triton: nothing to record
        yield
        return
    with _patch_lock:
        originals = {cls: cls.__dict__["run"] for cls in targets}

        def make(orig):
            def run_and_record(self, *args, grid, warmup, **kwargs):
                if warmup:
                    return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
                fn = getattr(self, "fn", None)
                name = getattr(fn, "__name__", None) or getattr(self, "__name__", "kernel")
                g = grid if not callable(grid) else None
                log.triton.append(TritonLaunch(str(name), _describe(g), _describe(args),
                                               {k: _describe(v) for k, v in kwargs.items()}))
                if run:
                    return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
                return None
            return run_and_record

        for cls, orig in originals.items():
            cls.run = make(orig)
    try:
        yield
    finally:
        with _patch_lock:
            for cls, orig in originals.items():
                cls.run = orig


@contextlib.contextmanager
def record_launches(*, run_triton: bool = False, count_torch: bool = True) -> Iterator[LaunchLog]:
    """Record every device kernel launched inside the block; yields the :class:`LaunchLog`.

    Args:
        run_triton: run the Triton kernels as well (default False: record only, so results
            computed by Triton kernels are garbage inside the block).
        count_torch: count kernel-launching torch operators (a TorchDispatchMode; autograd's
            backward on CPU tensors runs on the calling thread and is counted too).
    """
    log = LaunchLog()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_triton_recorder(log, run_triton))
        if count_torch:
            stack.enter_context(_OpCounter(log))
        yield log


def count_launches(fn, *args: Any, run_triton: bool = False, **kwargs: Any) -> tuple[Any, LaunchLog]:
    """``fn(*args, **kwargs)`` inside :func:`record_launches`; returns (result, log)."""
    with record_launches(run_triton=run_triton) as log:
        out = fn(*args, **kwargs)
    return out, log


def model_launches(model: torch.nn.Module, x: torch.Tensor, *, train: bool, run_triton: bool = False) -> LaunchLog:
    """Launches of one eval forward (``train=False``, under no_grad) or of one training
    forward + backward of a mean-square loss (``train=True``, gradients set to None first, as
    ``optimizer.zero_grad()`` leaves them). Leaves the model in that mode."""
    model.train(train)
    if train:
        model.zero_grad(set_to_none=True)
    with record_launches(run_triton=run_triton) as log:
        if train:
            model(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(x)
    return log
