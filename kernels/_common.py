"""Shared helpers for the Triton launchers: input validation, layouts, index width.

Nothing here touches CUDA at import time. ``INTERPRET`` is read once, at import: the
Triton interpreter must be chosen (TRITON_INTERPRET=1) before triton is imported,
so it cannot change later in the process anyway.

Layout vocabulary used by every launcher (tensors are logical (N, C, H, W, D)):

* channels-last kind: ``stride(C) == 1`` (memory order N, H, W, D, C); a channel
  slice ``buf[:, a:b]`` of a channels_last_3d buffer is of this kind too.
* contiguous kind: ``stride(D) == 1`` (memory order N, C, H, W, D); a channel slice
  of a contiguous buffer is of this kind too.

The elementwise/reduction kernels address an element as ``n*sN + p*sP + c*sC`` with
``p = (h*W + w)*D + d``; that needs (H, W, D) to collapse into one strided axis,
which holds for both kinds and for channel slices of them.  Anything else is copied
into the matching dense layout (correct, and never hit by the ops layer).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_C = tl.constexpr(INTERPRET)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_GPU_PLANS = False


@contextlib.contextmanager
def gpu_plans() -> Iterator[None]:
    """Inside this context the launchers choose tiles, warps and flags as on a GPU even under
    the interpreter.  Only for recording launches that are NOT run (the CPU census of what a GPU
    compiles: tests, bench/static_sm90.py): interpreted with GPU tiles and without the bf16
    upcast, results would be slow and wrong."""
    global _GPU_PLANS
    prev, _GPU_PLANS = _GPU_PLANS, True
    try:
        yield
    finally:
        _GPU_PLANS = prev


def interp_tiles() -> bool:
    """True when launchers must choose the interpreter's tiles and flags (see gpu_plans)."""
    return INTERPRET and not _GPU_PLANS

# Offsets are computed in int32 unless some tensor's furthest element could pass this.
_I32_LIMIT = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(v: int) -> int:
    v = max(int(v), 1)
    return 1 << (v - 1).bit_length()


def pow2_part(v: int) -> int:
    """Largest power of two dividing v (v > 0)."""
    v = int(v)
    return v & -v if v > 0 else 1


def check_tensor5(name: str, t: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None) -> None:
    """Raise a clear error unless ``t`` is a 5-D (N, C, H, W, D) tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(f"{name} must be 5-D (N, C, H, W, D), got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: float32, bfloat16, float16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input dtype {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")
    check_device(name, t)


def check_device(name: str, t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on any tensor under the interpreter."""
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for CPU checks)")


def check_channel_vec(name: str, v: Optional[torch.Tensor], C: int, device: torch.device,
                      *, required: bool = False) -> Optional[torch.Tensor]:
    """Validate a per-channel fp32 vector of shape (C,); returns it contiguous."""
    if v is None:
        if required:
            raise ValueError(f"{name} is required (an fp32 tensor of shape ({C},))")
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (per-channel BN parameters are fp32), got {v.dtype}")
    if tuple(v.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the input is on {device}")
    return v.contiguous()


def check_zpool(zpool: str, allowed: Sequence[str]) -> None:
    if zpool not in allowed:
        raise ValueError(f"zpool={zpool!r} is not accepted here; choose one of {list(allowed)}")


def is_channels_last(t: torch.Tensor) -> bool:
    """True for the channels-last kind (C is the unit-stride axis), incl. channel slices."""
    if t.size(1) > 1:
        return t.stride(1) == 1
    # C == 1: both layouts coincide except when D is strided; take channels-last iff D is not
    # the unit-stride axis and the tensor is channels_last_3d-contiguous.
    return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format of outputs allocated for input ``t``. A tensor that is both
    contiguous and channels-last (one channel) gets channels_last_3d, the kernels' fast layout
    and the ops layer's rule (ahnet_fast.ops._util.memory_format): a 1-channel input must not
    drag the network into NCDHW."""
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.channels_last_3d if is_channels_last(t) else torch.contiguous_format


def empty5(shape: Sequence[int], like: torch.Tensor, *, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Uninitialised (N, C, H, W, D) tensor in the memory format of ``like``."""
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device,
                       memory_format=memory_format_of(like))


def prepare_output(shape: tuple, like: torch.Tensor, residual: Optional[torch.Tensor],
                   out: Optional[torch.Tensor], offset: int) -> torch.Tensor:
    """Check ``residual`` against the output ``shape`` and return where to write the output: a
    new tensor in ``like``'s memory format, or the channel slice ``out[:, offset:offset + C]``
    of a preallocated (N, Ctot, ...) buffer."""
    if residual is not None:
        check_tensor5("residual", residual, dtype=like.dtype, device=like.device)
        if tuple(residual.shape) != tuple(shape):
            raise ValueError(f"residual must have the output shape {tuple(shape)}, got {tuple(residual.shape)}")
    if out is None:
        return empty5(shape, like)
    check_tensor5("out", out, dtype=like.dtype, device=like.device)
    N, C = shape[0], shape[1]
    if out.shape[0] != N or tuple(out.shape[2:]) != tuple(shape[2:]):
        raise ValueError(f"out must have shape (N={N}, Ctot, {', '.join(map(str, shape[2:]))}), "
                         f"got {tuple(out.shape)}")
    if not (0 <= offset and offset + C <= out.shape[1]):
        raise ValueError(f"out_channel_offset={offset} with {C} channels does not fit in "
                         f"out's {out.shape[1]} channels")
    view = out[:, offset:offset + C]
    if flat_strides(view)[0].data_ptr() != view.data_ptr():
        raise ValueError("out must be contiguous or channels_last_3d (a channel slice is written into it)")
    return view


def _collapsed_p_stride(t: torch.Tensor) -> Optional[int]:
    """Stride of p = (h*W + w)*D + d if (H, W, D) collapse into one strided axis, else None."""
    dims = [(t.size(i), t.stride(i)) for i in (2, 3, 4) if t.size(i) != 1]
    if not dims:
        return 1
    inner = dims[-1][1]
    expected = dims[-1][0] * dims[-1][1]
    for size, st in reversed(dims[:-1]):
        if st != expected:
            return None
        expected = size * st
    return inner


def flat_strides(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Return (t', sN, sP, sC) with element (n, c, p) at ``n*sN + p*sP + c*sC``.

    p = (h*W + w)*D + d.  ``t'`` is ``t`` itself when (H, W, D) collapse (both layout
    kinds and their channel slices), otherwise a dense copy in ``t``'s layout kind.
    """
    sP = _collapsed_p_stride(t)
    if sP is None:
        t = t.contiguous(memory_format=memory_format_of(t))
        sP = _collapsed_p_stride(t)
        assert sP is not None
    return t, t.stride(0), sP, t.stride(1)


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset (in elements) reachable in ``t``."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def channel_room(t: torch.Tensor, extra: int) -> bool:
    """True when reading ``extra`` elements past the last channel of every (n, h, w, d) row of
    the channels-last ``t`` stays inside its storage: the rows' channel padding, or the channels
    after a slice (read, never used: the conv zeroes them in registers)."""
    if extra <= 0:
        return True
    if t.size(1) > 1 and t.stride(1) != 1:
        return False
    elems = t.untyped_storage().nbytes() // t.element_size()
    return t.storage_offset() + max_offset(t) + extra < elems


def needs_i64(*tensors: Optional[torch.Tensor], extra: int = 0) -> bool:
    """True when any offset or flat index could overflow int32 (so kernels must use int64)."""
    lim = _I32_LIMIT // 2  # margin: offsets are formed as sums of two partial products
    if extra > lim:
        return True
    for t in tensors:
        if t is None:
            continue
        if t.numel() > lim or max_offset(t) > lim:
            return True
    return False


def vec_align(t: torch.Tensor) -> int:
    """Layout constexpr of a (N, C, H, W, D) kernel operand: 0 when its channel stride is not 1
    (the contiguous kind), else the largest power of two <= 16 dividing every other stride (a
    channels-last buffer of Ctot channels: the power-of-two part of Ctot).  It depends on the
    layout and the buffer's channel count only, never on the spatial size, so it can replace
    Triton's per-launch stride specialisation (see conv._CONV_NO_SPEC)."""
    if t.size(1) > 1 and t.stride(1) != 1:
        return 0
    # no wider than one 16-byte vector: a larger value would be a separate compile for nothing
    g = 16 // t.element_size()
    for i in (0, 2, 3, 4):
        if t.size(i) > 1:
            g = math.gcd(g, abs(t.stride(i)))
    return g


def vec_aligns(primary: torch.Tensor, *others: Optional[torch.Tensor]) -> tuple[int, ...]:
    """vec_align of the tensor whose layout picks an elementwise kernel's tile, then of the
    others (None -> 0).  When the primary is of the contiguous kind its tiles are a few channels
    wide, so wide channel vectors of the others buy nothing: they get 0 (generic addressing,
    always correct), which keeps a mixed-layout call from compiling one more variant per
    alignment of the others.  The elementwise kernels mask channels with ``c < C`` and Triton
    only knows "C % 16 == 0": when it is not, no channel vector is provable whatever the
    alignment, so every channels-last value becomes 1 (same code, one variant instead of one
    per alignment)."""
    C = primary.size(1)

    def v(t):
        a = vec_align(t)
        return min(a, 1) if C % 16 else a

    vp = v(primary)
    return (vp, *((v(t) if (t is not None and vp > 0) else 0) for t in others))


def stats_partials(P: int, C: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers for per-tile (count, mean, M2) partials, each fp32 (P, C)."""
    return (torch.empty((P, C), dtype=torch.float32, device=device),
            torch.empty((P, C), dtype=torch.float32, device=device),
            torch.empty((P, C), dtype=torch.float32, device=device))


@triton.jit
def tile_offsets(rows, cols, cstride, V: tl.constexpr):
    """rows[:, None] + cols[None, :] * cstride: element offsets of a [rows, channels] tile.

    V > 0: the channel stride is 1 and every row offset is a multiple of V (the launcher passes
    vec_align(tensor), which guarantees it) -> contiguous, aligned channel vectors that the
    compiler turns into wide loads/stores even though no stride is specialised.  The multiple
    is written as (rows // V) * V (exact, since V divides rows) rather than tl.multiple_of: the
    hint attribute does not survive the layout conversions before a store or an elementwise
    load, nor the conv's pipelined K loop (the static report showed 16-bit accesses: the
    decoder's 3x3x1 80->20 loaded its A tile with scalar ld.global.b16 under the hint and with
    128-bit cp.async under the arithmetic), the arithmetic does.  V == 0: any channel stride
    (the contiguous kind)."""
    if V > 0:
        if V > 1:
            rows = (rows // V) * V
        return rows[:, None] + cols[None, :]
    else:
        return rows[:, None] + (cols * cstride)[None, :]


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """Cast fp32 ``v`` to ``dtype`` with round-to-nearest-even.

    On a GPU this is a plain cast (RNE).  The interpreter truncates fp32 -> bf16 (doubling the
    rounding error), so there the rounding is done on the bit pattern first (NaN kept as is).
    """
    if _INTERPRET_C and dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        v = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    return v.to(dtype)
