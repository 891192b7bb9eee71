"""The one loader of the compiled CUDA extension ``ahnet_fast._C`` (sources in csrc/).

Nothing here touches CUDA or loads the extension at import time. :func:`load` loads it on first use
after checking the build metadata that setup.py recorded (``ahnet_fast/_build_info.json``) against
the running torch, so a build made for another torch fails with a message naming both versions
instead of a raw ``undefined symbol``. :func:`status` says whether the backend is usable here and
why not.

The Python wrappers below have the same names and signatures as the Triton launchers in
``ahnet_fast.kernels`` (see notes/OPS_CONTRACT.md), so the ops layer can call either module; they
call ``torch.ops.ahnet_fast_cuda.<op>``. :func:`implemented` lists the wrappers whose kernels the
loaded extension registers; a wrapper is an attribute of this module only while its kernel is
there (``getattr(ahnet_fast._cuda, "conv3d_fused", None)`` is None otherwise), so the ops layer can
probe for launchers exactly as it does in ahnet_fast.kernels.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import threading
from types import ModuleType
from typing import Any, Iterator

import torch

__all__ = ["CudaExtensionError", "build_info", "check_build_info", "load", "status", "implemented",
           "DETERMINISTIC_OPS", "CONV_KERNELS", "CONV_KERNEL_ENV", "WGMMA_VERIFIED_ON_GPU", "default_conv_kernel",
           "conv_kernel", "set_conv_kernel", "use_conv_kernel", "wgmma_supported", "conv_launch_counts"]

# ops (ahnet_fast.ops names) whose kernels here reduce without atomics: every reduction writes
# per-block partials merged in a fixed order, so results are bitwise reproducible
DETERMINISTIC_OPS = ("zmaxpool", "conv_bn_act", "bn_act_conv")

NAMESPACE = "ahnet_fast_cuda"
EXTENSION = "ahnet_fast._C"
BUILD_INFO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
REBUILD_HINT = "rebuild it against this torch: pip install --no-build-isolation --force-reinstall --no-deps ."

# wrapper name -> the torch.ops.ahnet_fast_cuda schemas it needs
_WRAPPER_OPS: dict[str, tuple[str, ...]] = {
    "zmaxpool_forward": ("zmaxpool_forward",),
    "zmaxpool_backward": ("zmaxpool_backward",),
    "channel_stats": ("channel_stats",),
    "bn_act_apply": ("bn_act_apply", "bn_act_apply_out"),
    "bn_act_backward": ("bn_act_backward",),
    "conv3d_fused": ("conv3d_fused", "conv3d_fused_out"),
}


class CudaExtensionError(RuntimeError):
    """The CUDA extension cannot be used here; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# which device path conv3d_fused takes (csrc/cuda/conv_policy.h)
# ------------------------------------------------------------------------------------------------
#: "wmma": conv_fused_kernel (WMMA/FMA, sm_80+) everywhere; "wgmma": the Hopper wgmma + TMA kernel
#: (csrc/cuda/conv_wgmma.cuh) for every call it accepts (bf16/fp16, x channels-last or one channel),
#: an error on a GPU that cannot run it; "auto": wgmma where the GPU and the call allow, else WMMA
CONV_KERNELS = ("wmma", "wgmma", "auto")
CONV_KERNEL_ENV = "AHNET_FAST_CUDA_CONV"
#: The wgmma kernel was written and compiled for sm_90a on machines without a GPU (its SASS is in
#: bench/results/static_sm90.md); until tests/test_cuda_conv.py has passed with it on a Hopper GPU,
#: nothing chooses it unless asked to (set_conv_kernel / AHNET_FAST_CUDA_CONV). The first GPU run
#: that passes flips this to True, which makes "auto" the default.
WGMMA_VERIFIED_ON_GPU = False


def default_conv_kernel(env: dict[str, str] | None = None) -> str:
    """The policy the extension starts with: $AHNET_FAST_CUDA_CONV if set, else "auto" once the wgmma
    kernel is verified on a GPU and "wmma" until then. ValueError naming the accepted values."""
    env = os.environ if env is None else env
    name = env.get(CONV_KERNEL_ENV, "").strip().lower()
    if name:
        if name not in CONV_KERNELS:
            raise ValueError(f"{CONV_KERNEL_ENV}={env[CONV_KERNEL_ENV]!r} is not accepted; use one of "
                             f"{', '.join(CONV_KERNELS)}")
        return name
    return "auto" if WGMMA_VERIFIED_ON_GPU else "wmma"


# ------------------------------------------------------------------------------------------------
# build metadata and loading
# ------------------------------------------------------------------------------------------------
def build_info(path: str | None = None) -> dict[str, Any] | None:
    """The metadata setup.py recorded at install time, or None if there is none (not installed with
    pip from this source tree). Keys: cuda_extension (bool), reason, torch_version, torch_cuda,
    nvcc_version, cuda_arch_list, python, build_date."""
    path = BUILD_INFO_PATH if path is None else path
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"cuda_extension": False, "reason": f"unreadable build metadata {path}: {exc}"}
    return data if isinstance(data, dict) else {"cuda_extension": False, "reason": f"malformed build metadata {path}"}


def _release(version: str | None) -> str | None:
    """'2.14.1+cu130' -> '2.14.1' (the local part names the CUDA flavour, compared separately)."""
    return None if version is None else version.split("+", 1)[0]


def _cuda_mm(version: str | None) -> str | None:
    """'13.0' / '13.0.88' -> '13.0'."""
    return None if not version else ".".join(version.split(".")[:2])


def check_build_info(info: dict[str, Any] | None, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why an extension described by ``info`` cannot be loaded into this torch, or None if it can.

    The C++ ABI of torch changes between releases, so the torch release (major.minor.patch) and the
    CUDA major.minor must both match the ones the extension was compiled against.
    """
    if info is None:
        return ("extension not built (no build metadata: ahnet_fast/_build_info.json is missing; "
                "install ahnet_fast with pip)")
    if not info.get("cuda_extension"):
        return f"extension not built (CPU-only install): {info.get('reason') or 'no reason recorded'}"
    built_torch, built_cuda = info.get("torch_version"), info.get("torch_cuda")
    if _release(built_torch) != _release(torch_version) or _cuda_mm(built_cuda) != _cuda_mm(torch_cuda):
        return (f"extension built for torch {built_torch} (CUDA {built_cuda}), running torch {torch_version} "
                f"(CUDA {torch_cuda or 'none: CPU build'}); {REBUILD_HINT}")
    return None


_lock = threading.Lock()
_loaded: ModuleType | None = None
_load_error: CudaExtensionError | None = None


def _load_uncached() -> ModuleType:
    info = build_info()
    reason = check_build_info(info, torch.__version__, torch.version.cuda)
    if reason is not None:
        raise CudaExtensionError(reason)
    assert info is not None
    try:
        spec = importlib.util.find_spec(EXTENSION)
    except ModuleNotFoundError:  # the parent package itself is missing
        spec = None
    if spec is None:
        raise CudaExtensionError(f"extension missing: the build metadata says {EXTENSION} was built for torch "
                                 f"{info.get('torch_version')}, but no compiled {EXTENSION} module is installed; "
                                 f"{REBUILD_HINT}")
    try:
        module = importlib.import_module(EXTENSION)
    except (ImportError, OSError) as exc:
        # e.g. "undefined symbol: _ZN3c10..." when torch changed under the extension, or a missing
        # libcudart: translate, keep the original as __cause__ for whoever needs the details
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CudaExtensionError(
            f"{EXTENSION} failed to load ({first_line}); it was built for torch {info.get('torch_version')} "
            f"(CUDA {info.get('torch_cuda')}) and this is torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none: CPU build'}); {REBUILD_HINT}") from exc
    compiled = getattr(module, "torch_version", None)
    if compiled is not None and compiled != _release(torch.__version__):
        raise CudaExtensionError(f"{EXTENSION} was compiled against torch {compiled} headers, running torch "
                                 f"{torch.__version__}; {REBUILD_HINT}")
    if hasattr(module, "set_conv_kernel"):
        try:
            module.set_conv_kernel(default_conv_kernel())
        except ValueError as exc:
            raise CudaExtensionError(str(exc)) from None
    return module


def load() -> ModuleType:
    """Load the extension (once) and return the module; raises CudaExtensionError saying why not."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _load_error is not None:
            raise _load_error
        try:
            _loaded = _load_uncached()
        except CudaExtensionError as exc:
            _load_error = exc
            raise
        return _loaded


def _arch_entries(arch_list: str | None) -> list[tuple[tuple[int, int], bool]]:
    """'8.0;9.0+PTX' -> [((8, 0), False), ((9, 0), True)]."""
    out = []
    for entry in (arch_list or "").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        major, minor = entry.removesuffix("+PTX").rstrip("a").split(".")
        out.append(((int(major), int(minor)), ptx))
    return out


def status() -> tuple[bool, str]:
    """(usable, reason): whether the cuda backend can run here, e.g. (False, "no CUDA device")."""
    try:
        load()
    except CudaExtensionError as exc:
        return False, str(exc)
    if not torch.cuda.is_available():
        return False, "no CUDA device (the extension is built and loads)"
    info = build_info() or {}
    archs = _arch_entries(info.get("cuda_arch_list"))
    cap = torch.cuda.get_device_capability()
    # a cubin runs on its own major version with minor >= its own; PTX is JIT-compiled for newer GPUs
    runs = any((c[0] == cap[0] and c[1] <= cap[1]) or (ptx and c <= cap) for c, ptx in archs)
    if archs and not runs:
        return False, (f"GPU {torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]} but the extension was built for "
                       f"TORCH_CUDA_ARCH_LIST={info.get('cuda_arch_list')}; rebuild with "
                       f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
    return True, (f"built for torch {info.get('torch_version')} with nvcc {info.get('nvcc_version')} "
                  f"for {info.get('cuda_arch_list')}; {len(implemented())} ops")


_implemented: frozenset[str] | None = None


def implemented() -> set[str]:
    """Names of the wrappers in this module whose kernels the loaded extension registers for CUDA
    (empty if the extension cannot be loaded)."""
    global _implemented
    if _implemented is not None:
        return set(_implemented)
    try:
        load()
    except CudaExtensionError:
        return set()
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    names = set()
    for wrapper, schemas in _WRAPPER_OPS.items():
        ok = True
        for schema in schemas:
            try:
                getattr(getattr(torch.ops, NAMESPACE), schema)
            except (AttributeError, RuntimeError):
                ok = False
                break
            if has_kernel is not None and not has_kernel(f"{NAMESPACE}::{schema}", "CUDA"):
                ok = False
                break
        if ok:
            names.add(wrapper)
    _implemented = frozenset(names)
    return names


def _op(wrapper: str, schema: str | None = None) -> Any:
    load()
    if wrapper not in (_implemented if _implemented is not None else implemented()):
        raise NotImplementedError(f"the ahnet_fast CUDA extension has no kernel for {wrapper} "
                                  f"(implemented: {sorted(implemented())}); use the triton or reference backend")
    return getattr(getattr(torch.ops, NAMESPACE), schema or wrapper)


# ------------------------------------------------------------------------------------------------
# wrappers: same names and signatures as the Triton launchers in ahnet_fast.kernels
# ------------------------------------------------------------------------------------------------
def _check_zpool(name: str, zpool: str, accepted: tuple[str, ...]) -> None:
    if zpool not in accepted:
        raise ValueError(f"{name}: zpool={zpool!r} is not accepted; use one of {accepted}")


def _channel_slice(name: str, out: torch.Tensor, offset: int, channels: int,
                   shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """out[:, offset:offset+channels] after checking that it can hold a (N, channels, *spatial) result."""
    if out.dim() != 5:
        raise ValueError(f"{name}: out must be 5-D (N, Ctot, H, W, D), got shape {tuple(out.shape)}")
    if out.dtype != dtype:
        raise ValueError(f"{name}: out has dtype {out.dtype}, the result is {dtype}")
    if not (0 <= offset and offset + channels <= out.shape[1]):
        raise ValueError(f"{name}: out_channel_offset={offset} with {channels} channels does not fit in out's "
                         f"{out.shape[1]} channels")
    expected = (shape[0], *shape[2:])
    got = (out.shape[0], *out.shape[2:])
    if got != expected:
        raise ValueError(f"{name}: out has (N, H, W, D) = {got}, the result has {expected}")
    return out.narrow(1, offset, channels)


def zmaxpool_forward(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W, D) -> (N, C, H, W, D // 2): max over z-pairs like nn.MaxPool3d((1,1,2)), no
    indices. float32/bfloat16/float16 CUDA tensor, channels_last_3d or contiguous, D >= 2."""
    return _op("zmaxpool_forward")(x)


def zmaxpool_backward(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """grad_x (shape and memory format of x) for grad_y (N, C, H, W, D // 2); ties go to the first
    element of a pair, NaN takes the gradient, an odd tail slice gets 0."""
    return _op("zmaxpool_backward")(x, grad_y)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance), float32 (C,), over (N, H, W, D) of x (N, C, H, W, D);
    deterministic (fixed-order Chan merge of per-block partials), no atomics."""
    mean, var = _op("channel_stats")(x)
    return mean, var


def bn_act_apply(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, zpool: str = "none",
                 residual: torch.Tensor | None = None, relu: bool = True, out: torch.Tensor | None = None,
                 out_channel_offset: int = 0) -> torch.Tensor:
    """z = relu(pool(y * scale[c] + shift[c]) + residual).

    y: (N, C, H, W, D); scale/shift: float32 (C,); zpool "none" | "after_affine" (max over z-pairs
    of the affine result, output depth D // 2); residual: the output's shape; out: write into
    out[:, off:off+C] of a preallocated (N, Ctot, H, W, Dout) tensor and return that view.
    """
    _check_zpool("bn_act_apply", zpool, ("none", "after_affine"))
    if out is None:
        return _op("bn_act_apply")(y, scale, shift, zpool, residual, relu)
    n, c, h, w, d = y.shape
    shape = (n, c, h, w, d // 2 if zpool == "after_affine" else d)
    view = _channel_slice("bn_act_apply", out, out_channel_offset, c, shape, y.dtype)
    _op("bn_act_apply", "bn_act_apply_out")(y, scale, shift, zpool, residual, relu, view)
    return view


def bn_act_backward(grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    gamma: torch.Tensor | None, *, out: torch.Tensor | None = None, zpool: str = "none",
                    relu: bool = True, batch_stats: bool = True, residual_grad: bool = False,
                    beta: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Backward of o = relu(pool(gamma * (y - mean) * invstd + beta) + residual).

    Returns (grad_y, grad_gamma or None when gamma is None, grad_beta, grad_residual or None).
    grad_out/out: the forward output's shape; mean/invstd/gamma/beta: float32 (C,).
    The ReLU mask is ``not out <= 0`` when ``out`` (the forward output) is given, else recomputed
    from t = gamma * xhat + beta, which needs ``beta`` (an extra keyword of this backend; without it
    the mask needs ``out``). batch_stats=True differentiates through the batch mean/variance
    (M = N*H*W*D of y); False treats them as constants (eval).
    """
    _check_zpool("bn_act_backward", zpool, ("none", "after_affine"))
    grad_y, grad_gamma, grad_beta, grad_res = _op("bn_act_backward")(
        grad_out, y, mean, invstd, gamma, beta, out, zpool, relu, batch_stats, residual_grad)
    return grad_y, (grad_gamma if gamma is not None else None), grad_beta, (grad_res if residual_grad else None)


def conv3d_fused(x: torch.Tensor, weight: torch.Tensor, *, stride: tuple[int, int, int] = (1, 1, 1),
                 padding: tuple[int, int, int] = (0, 0, 0), bias: torch.Tensor | None = None,
                 in_scale: torch.Tensor | None = None, in_shift: torch.Tensor | None = None, in_relu: bool = True,
                 out_scale: torch.Tensor | None = None, out_shift: torch.Tensor | None = None,
                 zpool: str = "none", residual: torch.Tensor | None = None, relu: bool = False,
                 out: torch.Tensor | None = None, out_channel_offset: int = 0, compute_stats: bool = False,
                 ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Implicit-GEMM 3D conv with the contract's prologue (pre-activation BN+ReLU on load, zero padding
    after the transform) and epilogue (bias, affine, z-pool before/after the affine, residual, ReLU,
    channel-slice output, per-channel statistics). See notes/OPS_CONTRACT.md."""
    _check_zpool("conv3d_fused", zpool, ("none", "before_affine", "after_affine"))
    if compute_stats and (out_scale is not None or out_shift is not None or zpool == "after_affine"):
        raise ValueError("conv3d_fused: compute_stats=True needs out_scale/out_shift None and zpool in "
                         "('none', 'before_affine')")
    stride, padding = tuple(int(s) for s in stride), tuple(int(p) for p in padding)
    args = (x, weight, list(stride), list(padding), bias, in_scale, in_shift, in_relu, out_scale, out_shift,
            zpool, residual, relu, compute_stats)
    if out is None:
        y, mean, var = _op("conv3d_fused")(*args)
    else:
        n = x.shape[0]
        cout, kh, kw, kd = weight.shape[0], *weight.shape[2:]
        sizes = [(x.shape[2 + i] + 2 * padding[i] - k) // stride[i] + 1 for i, k in enumerate((kh, kw, kd))]
        if zpool != "none":
            sizes[2] //= 2
        view = _channel_slice("conv3d_fused", out, out_channel_offset, cout, (n, cout, *sizes), x.dtype)
        mean, var = _op("conv3d_fused", "conv3d_fused_out")(*args, view)
        y = view
    return (y, (mean, var)) if compute_stats else y


def _policy_module() -> ModuleType:
    module = load()
    if not hasattr(module, "set_conv_kernel"):
        raise CudaExtensionError(f"{EXTENSION} predates the conv kernel policy (no set_conv_kernel); {REBUILD_HINT}")
    return module


def conv_kernel() -> str:
    """The current conv3d_fused policy: "wmma", "wgmma" or "auto" (see CONV_KERNELS)."""
    return _policy_module().conv_kernel()


def set_conv_kernel(name: str) -> str:
    """Set the conv3d_fused policy for this process; returns the previous one. ValueError for a name
    outside CONV_KERNELS."""
    if name not in CONV_KERNELS:
        raise ValueError(f"set_conv_kernel({name!r}): accepted: {', '.join(CONV_KERNELS)}")
    return _policy_module().set_conv_kernel(name)


@contextlib.contextmanager
def use_conv_kernel(name: str) -> Iterator[None]:
    """``with use_conv_kernel("wgmma"): ...``: the policy inside the block, restored after it."""
    previous = set_conv_kernel(name)
    try:
        yield
    finally:
        set_conv_kernel(previous)


def wgmma_supported(device: int | torch.device | None = None) -> bool:
    """Whether the CUDA device can run the sm_90a wgmma conv: compute capability 9.0 and this build's
    sm_90a image loaded there (TORCH_CUDA_ARCH_LIST with 9.0a). False without a usable extension or GPU."""
    try:
        module = _policy_module()
    except CudaExtensionError:
        return False
    if not torch.cuda.is_available():
        return False
    if device is None:
        index = torch.cuda.current_device()
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    return bool(module.wgmma_supported(int(index)))


def conv_launch_counts() -> dict[str, int]:
    """{"wmma": n, "wgmma": m}: conv3d_fused launches per kernel in this process (tests and benchmarks
    use it to show which kernel actually ran)."""
    return dict(_policy_module().conv_launch_counts())


# The wrappers are reached through __getattr__ so that one whose kernel the extension lacks (or
# every one, when the extension cannot be loaded) is simply not an attribute.
_WRAPPERS = {name: globals().pop(name) for name in _WRAPPER_OPS}


def __getattr__(name: str) -> Any:
    wrapper = _WRAPPERS.get(name)
    if wrapper is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in implemented():
        ok, why = status()
        raise AttributeError(f"{__name__}.{name} is not available: "
                             + (why if not ok else f"the extension has no kernel for it (implemented: {sorted(implemented())})"))
    return wrapper


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WRAPPERS))
