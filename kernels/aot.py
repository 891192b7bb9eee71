"""What the launchers make Triton compile on a GPU, known on a machine without one.

Triton compiles one kernel per *specialisation* of a launch: the constexpr values, the type of
every argument, which int arguments equal 1 (they become constants) or are multiples of 16, and
which pointers are 16-byte aligned; plus num_warps/num_stages.  ``spec_of`` computes exactly that
key from a launch's arguments with Triton's rules (the arguments a kernel lists in
``do_not_specialize`` keep only their type), so distinct ``KernelSpec``s are distinct compiles.

``record_specs()`` runs launchers with the kernels replaced by a recorder (nothing is executed)
and with GPU tiles (``_common.gpu_plans``): under the Triton interpreter on a CPU it yields the
list of specs a GPU would compile for the same calls.  ``compile_spec`` compiles one spec for a
given architecture ahead of time with Triton's own ptxas (no GPU needed; the process must not
have TRITON_INTERPRET=1, under which ``triton.jit`` gives interpreted functions).

Used by the compile-count test, ``bench/static_sm90.py`` and ``ahnet-fast warmup``.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from ._common import gpu_plans

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}

# kernel function name -> (module, attribute); the kernels a launcher in this package can launch
KERNELS = {
    "_conv_kernel": ("conv", "_conv_kernel"),
    "_splitk_epilogue_kernel": ("conv", "_splitk_epilogue_kernel"),
    "_stats_partial_kernel": ("batchnorm", "_stats_partial_kernel"),
    "stats_merge_kernel": ("batchnorm", "stats_merge_kernel"),
    "_bn_apply_kernel": ("batchnorm", "_bn_apply_kernel"),
    "_bn_bwd_reduce_kernel": ("batchnorm", "_bn_bwd_reduce_kernel"),
    "_sum_partials_kernel": ("batchnorm", "_sum_partials_kernel"),
    "_bn_bwd_apply_kernel": ("batchnorm", "_bn_bwd_apply_kernel"),
    "_zpool_fwd_kernel": ("zpool", "_zpool_fwd_kernel"),
    "_zpool_bwd_kernel": ("zpool", "_zpool_bwd_kernel"),
}

# Launch options Triton reads from the call (defaults of the CUDA backend)
_OPTION_DEFAULTS = {"num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None}


@dataclass(frozen=True)
class KernelSpec:
    """One compile: kernel, argument types and specialisations, launch options."""

    kernel: str
    signature: tuple[tuple[str, str], ...]      # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[str, Any], ...]     # (argument, value), incl. ints specialised to 1
    aligned: tuple[str, ...]                    # arguments with tt.divisibility=16
    options: tuple[tuple[str, Any], ...] = field(default=())   # num_warps, num_stages, ...

    @property
    def num_warps(self) -> int:
        return dict(self.options).get("num_warps", _OPTION_DEFAULTS["num_warps"])

    @property
    def num_stages(self) -> int:
        return dict(self.options).get("num_stages", _OPTION_DEFAULTS["num_stages"])

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "signature": [list(p) for p in self.signature],
                "constexprs": [list(p) for p in self.constexprs], "aligned": list(self.aligned),
                "options": [list(p) for p in self.options]}

    @classmethod
    def from_json(cls, d: dict) -> "KernelSpec":
        return cls(d["kernel"], tuple(tuple(p) for p in d["signature"]),
                   tuple(tuple(p) for p in d["constexprs"]), tuple(d["aligned"]),
                   tuple(tuple(p) for p in d.get("options", ())))

    def short(self) -> str:
        """A readable one-line label: kernel, dtype of the first pointer, user constexprs, options."""
        ptr = next((t for _, t in self.signature if t.startswith("*")), "")
        cx = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{ptr[1:]}]({cx}) w{self.num_warps}s{self.num_stages}"


def _python_fn(kernel) -> Any:
    return getattr(kernel, "fn", kernel)


def _do_not_specialize(kernel) -> set:
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter's wrapper keeps the jit keywords
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    arg_names = list(inspect.signature(_python_fn(kernel)).parameters)
    return {arg_names[n] if isinstance(n, int) else n for n in names}


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _int_type(v: int) -> str:
    if -2**31 <= v < 2**31:
        return "i32"
    if 2**63 <= v < 2**64:
        return "u64"
    return "i64"


def spec_of(kernel, args: tuple, kwargs: dict) -> KernelSpec:
    """The compile key of ``kernel[grid](*args, **kwargs)`` with Triton's specialisation rules:
    tensors -> '*dtype' (+ 16-byte alignment of the data pointer), ints -> i32/i64 (+ '== 1'
    becomes a constant, '% 16 == 0' an alignment attribute) unless listed in do_not_specialize,
    floats -> fp32, bools -> u1, None -> constant."""
    fn = _python_fn(kernel)
    sig = inspect.signature(fn)
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in sig.parameters}
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    dns = _do_not_specialize(kernel)
    signature, constexprs, aligned = [], [], []
    for name, value in bound.arguments.items():
        if _is_constexpr(sig.parameters[name]):
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        spec = name not in dns
        if isinstance(value, torch.Tensor):
            signature.append((name, "*" + _DTYPES[value.dtype]))
            if spec and value.data_ptr() % 16 == 0:
                aligned.append(name)
        elif isinstance(value, bool):
            signature.append((name, "u1"))
        elif isinstance(value, int):
            if spec and value == 1:
                signature.append((name, "constexpr"))
                constexprs.append((name, 1))
            else:
                signature.append((name, _int_type(value)))
                if spec and value % 16 == 0:
                    aligned.append(name)
        elif isinstance(value, float):
            signature.append((name, "fp32"))
        elif value is None:
            signature.append((name, "constexpr"))
            constexprs.append((name, None))
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={value!r}")
    opts = {**{k: v for k, v in _OPTION_DEFAULTS.items() if v is not None}, **options}
    return KernelSpec(fn.__name__, tuple(signature), tuple(constexprs), tuple(aligned),
                      tuple(sorted(opts.items())))


def int_args(kernel, args: tuple, kwargs: dict) -> dict[str, int]:
    """The int (non-constexpr, non-bool) arguments of a launch by name: sizes, strides, channels."""
    fn = _python_fn(kernel)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    return {k: v for k, v in bound.arguments.items()
            if isinstance(v, int) and not isinstance(v, bool) and not _is_constexpr(sig.parameters[k])}


@dataclass
class SpecLog:
    """What ``record_specs`` saw: one (spec, grid, int arguments) per launch, in launch order."""

    launches: list = field(default_factory=list)

    @property
    def specs(self) -> list[KernelSpec]:
        return [s for s, _, _ in self.launches]

    def distinct(self) -> list[KernelSpec]:
        return list(dict.fromkeys(self.specs))


@contextlib.contextmanager
def record_specs() -> Iterator[SpecLog]:
    """Record every Triton launch as a KernelSpec instead of running it, with GPU tiles.

    Outputs of the launchers stay uninitialised: use it to learn what would be compiled and
    launched, never for results.  Not thread-safe (it patches the launch method of Triton's
    kernel classes for the duration)."""
    from triton.runtime.jit import JITFunction
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported triton has the interpreter
        pass
    log = SpecLog()

    def run(self, *args, grid, warmup, **kwargs):
        log.launches.append((spec_of(self, args, kwargs), grid, int_args(self, args, kwargs)))
        return None

    saved = [(cls, cls.__dict__["run"]) for cls in classes]
    for cls in classes:
        cls.run = run
    try:
        with gpu_plans():
            yield log
    finally:
        for cls, orig in saved:
            cls.run = orig


def kernel_by_name(name: str):
    import importlib
    module, attr = KERNELS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def compile_spec(spec: KernelSpec, arch: int = 90, options: Optional[dict] = None):
    """Compile ``spec`` for sm_<arch> (e.g. 90, 80) with Triton's own toolchain; returns Triton's
    compiled kernel (``.asm`` holds ttgir/ptx/cubin, ``.metadata.shared`` the shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_by_name(spec.kernel)
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("compile_spec needs compiled (not interpreted) kernels: "
                           "run it in a process without TRITON_INTERPRET=1")
    index = {n: i for i, n in enumerate(fn.arg_names)}
    attrs = {(index[n],): [["tt.divisibility", 16]] for n in spec.aligned}
    src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
    opts = {k: v for k, v in spec.options if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    opts.update(options or {})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
