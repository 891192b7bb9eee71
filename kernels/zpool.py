"""Z max-pool (kernel (1,1,2), stride (1,1,2)) forward and backward, with no index tensor.

Tiling: a program owns a [BLOCK_S, BLOCK_C] tile of *pooled* positions x channels.  Rows are
flattened (n, h, w, j) positions, columns channels.  In the channels-last kind a row is one
contiguous C vector (coalesced, vectorisable); in the contiguous kind the launcher uses
BLOCK_C = 1 and long rows, so consecutive rows are consecutive z-pairs of one channel.
The backward recomputes the pair argmax from x (2 reads of x, 1 of grad_y, 2 writes) instead of
reading an int64 index tensor (eager max_pool3d stores 8 bytes of index per output).

Semantics are exactly torch's max_pool3d: the first element of a pair is kept unless the second
is greater or is NaN (so a tie goes to d=2j, and NaN propagates and takes the gradient).
Comparisons are done in fp32 (exact for every input dtype; also avoids the interpreter's bf16
tl.maximum bug).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (cdiv, check_tensor5, empty5, flat_strides, interp_tiles, is_channels_last,
                      needs_i64, next_pow2, tile_offsets, to_dtype, vec_aligns)


@triton.jit
def pair_take_second(a, b):
    """torch max-pool rule for a pair (a first): take b iff b > a or b is NaN (fp32 inputs)."""
    return (b > a) | (b != b)


# Sizes and strides are not specialised by Triton: one compiled kernel per layout/dtype serves
# every input size; XV/YV/... = _common.vec_align(tensor) carry the layout (see batchnorm.py).
@triton.jit(do_not_specialize=("S", "HWDp", "Dp", "D", "sxn", "sxp", "sxc", "syn", "syp", "syc"))
def _zpool_fwd_kernel(x_ptr, y_ptr, S, HWDp, Dp, D, C,
                      sxn, sxp, sxc, syn, syp, syc,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
                      XV: tl.constexpr, YV: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    if I64:
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    else:
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n = s // HWDp
    q = s % HWDp            # pooled spatial index (h*W + w)*Dp + j
    hw = q // Dp
    j = q % Dp
    p_in = hw * D + 2 * j   # input spatial index of the first element of the pair
    mask = (s < S)[:, None] & (c < C)[None, :]
    xo = tile_offsets(n * sxn + p_in * sxp, c, sxc, XV)
    a = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    xo2 = tile_offsets(n * sxn + p_in * sxp + sxp, c, sxc, XV)
    b = tl.load(x_ptr + xo2, mask=mask, other=0.0).to(tl.float32)
    r = tl.where(pair_take_second(a, b), b, a)
    yo = tile_offsets(n * syn + q * syp, c, syc, YV)
    tl.store(y_ptr + yo, to_dtype(r, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=("S", "HWJ", "J", "Dp", "D", "sxn", "sxp", "sxc", "sgn", "sgp", "sgc",
                               "sxgn", "sxgp", "sxgc"))
def _zpool_bwd_kernel(x_ptr, gy_ptr, gx_ptr, S, HWJ, J, Dp, D, C,
                      sxn, sxp, sxc, sgn, sgp, sgc, sxgn, sxgp, sxgc,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
                      XV: tl.constexpr, GV: tl.constexpr, XGV: tl.constexpr):
    # rows: (n, hw, jj) with jj in [0, J), J = ceil(D/2); jj == Dp is the odd tail slice (grad 0)
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    if I64:
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    else:
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n = s // HWJ
    r = s % HWJ
    hw = r // J
    jj = r % J
    p_in = hw * D + 2 * jj
    row_ok = s < S
    cm = (c < C)[None, :]
    m_first = row_ok[:, None] & cm
    m_pair = (row_ok & (jj < Dp))[:, None] & cm
    xo = tile_offsets(n * sxn + p_in * sxp, c, sxc, XV)
    a = tl.load(x_ptr + xo, mask=m_pair, other=0.0).to(tl.float32)
    xo2 = tile_offsets(n * sxn + p_in * sxp + sxp, c, sxc, XV)
    b = tl.load(x_ptr + xo2, mask=m_pair, other=0.0).to(tl.float32)
    go = tile_offsets(n * sgn + (hw * Dp + jj) * sgp, c, sgc, GV)
    g = tl.load(gy_ptr + go, mask=m_pair, other=0.0).to(tl.float32)
    second = pair_take_second(a, b)
    ga = tl.where(second, 0.0, g)
    gb = tl.where(second, g, 0.0)
    xgo = tile_offsets(n * sxgn + p_in * sxgp, c, sxgc, XGV)
    tl.store(gx_ptr + xgo, to_dtype(ga, gx_ptr.dtype.element_ty), mask=m_first)
    xgo2 = tile_offsets(n * sxgn + p_in * sxgp + sxgp, c, sxgc, XGV)
    tl.store(gx_ptr + xgo2, to_dtype(gb, gx_ptr.dtype.element_ty), mask=m_pair)


def _tile(C: int, S: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, num_warps): ~2K pooled outputs per program (4K+ elements moved),
    on a GPU independent of S (no per-size compile), fewer rows under the interpreter."""
    interp = interp_tiles()
    if channels_last or interp:   # the interpreter pays per program: few, wide tiles
        bc = min(next_pow2(C), 64)
        bs = max(2048 // bc, 16)
    else:
        bc, bs = 1, 2048
    if interp:
        bs = max(min(bs, next_pow2(S)), 16)
    return bs, bc, 4


def zmaxpool_forward(x: torch.Tensor) -> torch.Tensor:
    """Max-pool over z-pairs: (N, C, H, W, D) -> (N, C, H, W, D // 2), like nn.MaxPool3d((1,1,2)).

    x: float32/bfloat16/float16, channels_last_3d or contiguous (channel slices of either are
    fine).  The output has x's dtype and memory format.  D == 1 gives an empty (…, 0) output.
    No index tensor is produced; ``zmaxpool_backward`` recomputes the argmax from x.
    """
    check_tensor5("x", x)
    N, C, H, W, D = x.shape
    Dp = D // 2
    y = empty5((N, C, H, W, Dp), x)
    if y.numel() == 0:
        return y
    x, sxn, sxp, sxc = flat_strides(x)
    _, syn, syp, syc = flat_strides(y)
    S = N * H * W * Dp
    bs, bc, nw = _tile(C, S, is_channels_last(x))
    grid = (cdiv(S, bs), cdiv(C, bc))
    xv, yv = vec_aligns(x, y)
    _zpool_fwd_kernel[grid](x, y, S, H * W * Dp, Dp, D, C, sxn, sxp, sxc, syn, syp, syc,
                            BLOCK_S=bs, BLOCK_C=bc, I64=needs_i64(x, y, extra=S + bs),
                            XV=xv, YV=yv, num_warps=nw)
    return y


def zmaxpool_backward(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """Gradient of ``zmaxpool_forward`` w.r.t. x.

    x: (N, C, H, W, D) forward input; grad_y: (N, C, H, W, D // 2), same dtype and device.
    Returns grad_x shaped and laid out like x: grad_y routed to the pair argmax (first wins ties,
    NaN takes the gradient), zero at the other element and at an odd tail slice.
    """
    check_tensor5("x", x)
    check_tensor5("grad_y", grad_y, dtype=x.dtype, device=x.device)
    N, C, H, W, D = x.shape
    Dp = D // 2
    if tuple(grad_y.shape) != (N, C, H, W, Dp):
        raise ValueError(f"grad_y must have shape {(N, C, H, W, Dp)} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(grad_y.shape)}")
    gx = empty5((N, C, H, W, D), x)
    if gx.numel() == 0:
        return gx
    x, sxn, sxp, sxc = flat_strides(x)
    grad_y, sgn, sgp, sgc = flat_strides(grad_y)
    _, sxgn, sxgp, sxgc = flat_strides(gx)
    J = (D + 1) // 2
    S = N * H * W * J
    bs, bc, nw = _tile(C, S, is_channels_last(x))
    grid = (cdiv(S, bs), cdiv(C, bc))
    xv, gv, xgv = vec_aligns(x, grad_y, gx)
    _zpool_bwd_kernel[grid](x, grad_y, gx, S, H * W * J, J, Dp, D, C,
                            sxn, sxp, sxc, sgn, sgp, sgc, sxgn, sxgp, sxgc,
                            BLOCK_S=bs, BLOCK_C=bc, I64=needs_i64(x, grad_y, gx, extra=S + bs),
                            XV=xv, GV=gv, XGV=xgv, num_warps=nw)
    return gx
