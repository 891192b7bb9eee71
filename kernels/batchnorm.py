"""BatchNorm pieces around the convs: batch statistics, normalize+act apply, and its backward.

All BN math is fp32 whatever the storage dtype.  Reductions are deterministic (no atomics):
every program writes per-channel partials into a (P, C) buffer and a second small kernel
combines them in a fixed tree order.

Tiling (shared by every kernel here): a program owns [BLOCK_S, BLOCK_C] = spatial rows x
channels.  Rows are flattened (n, h, w, d) positions (or (n, h, w, j) z-pairs when pooling);
in the channels-last kind a row is one contiguous C vector.  Per-channel vectors
(scale/shift/mean/...) are loaded once per program and broadcast down the rows.

* channel_stats: stats-partial kernel (each program walks ROWS_PER_PROG rows in BLOCK_S chunks,
  exact two-pass (mean, M2) per chunk held in registers, Chan merge across chunks) + merge kernel
  (tl.reduce with the Chan combine over BLOCK_P partials at a time).  1 read of x.
* bn_act_apply: y*scale+shift -> [z-pair max] -> [+residual] -> [ReLU], 1 read, 1 write.
* bn_act_backward: reduce pass (sum g_t, sum g_t*xhat) + apply pass (grad_y, grad_residual);
  the z-pair route is recomputed from y (no index tensor) and the ReLU mask from the forward
  output, so the forward saves only y (the conv output) and its own output.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (cdiv, check_channel_vec, check_tensor5, check_zpool, empty5,
                      flat_strides, interp_tiles, is_channels_last, needs_i64, next_pow2, prepare_output,
                      stats_partials, tile_offsets, to_dtype, vec_align, vec_aligns)
from .zpool import pair_take_second

# ----------------------------------------------------------------------------------------------
# Welford/Chan helpers (shared with the conv stats epilogue)
# ----------------------------------------------------------------------------------------------


@triton.jit
def chan_merge(na, ma, m2a, nb, mb, m2b):
    """Merge two (count, mean, M2) summaries (Chan et al.); any count may be 0."""
    n = na + nb
    frac = nb / tl.where(n > 0, n, 1.0)
    delta = mb - ma
    mean = ma + delta * frac
    m2 = m2a + m2b + delta * delta * na * frac
    return n, mean, m2


@triton.jit
def tile_stats(v, valid, nvalid):
    """Column-wise (mean, M2) of a [BLOCK_S, BLOCK_C] fp32 tile over its ``valid`` rows.

    Exact two-pass on registers: mean first, then the sum of squared deviations.
    ``nvalid`` is the number of valid rows (a scalar or a [BLOCK_C] vector).
    """
    cnt = tl.where(nvalid > 0, nvalid, 1.0)
    mean = tl.sum(tl.where(valid, v, 0.0), axis=0) / cnt
    dev = tl.where(valid, v - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    return mean, m2


# Sizes and strides are not specialised by Triton ("== 1" / "% 16"): they change with the input
# size, and a specialisation on them is one more compile per size.  One compiled kernel serves
# every size; the layout facts the compiler needs for wide channel loads come as the per-tensor
# constexprs XV/YV/... = _common.vec_align(tensor) (0: channel stride != 1).  C stays
# specialised (the channel mask's alignment).  RELU is a runtime flag of the apply/backward
# kernels (a scalar branch per tile costs nothing in these memory-bound kernels; as a constexpr
# it doubled their variants).
@triton.jit(do_not_specialize=("S", "HWD", "sxn", "sxp", "sxc", "ROWS_PER_PROG"))
def _stats_partial_kernel(x_ptr, pcnt_ptr, pmean_ptr, pm2_ptr, S, HWD, C, sxn, sxp, sxc,
                          ROWS_PER_PROG, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                          I64: tl.constexpr, XV: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if I64:
        row0 = pid_p.to(tl.int64) * ROWS_PER_PROG
        cc = c.to(tl.int64)
    else:
        row0 = pid_p * ROWS_PER_PROG
        cc = c
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    m_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_S):
        s = row0 + start + tl.arange(0, BLOCK_S)
        n = s // HWD
        p = s % HWD
        rv = s < S
        valid = rv[:, None] & cm[None, :]
        off = tile_offsets(n * sxn + p * sxp, cc, sxc, XV)
        v = tl.load(x_ptr + off, mask=valid, other=0.0).to(tl.float32)
        nb = tl.sum(rv.to(tl.float32), axis=0)
        mb, m2b = tile_stats(v, valid, nb)
        n_acc, m_acc, m2_acc = chan_merge(n_acc, m_acc, m2_acc, nb, mb, m2b)
    po = pid_p * C + c
    tl.store(pcnt_ptr + po, n_acc, mask=cm)
    tl.store(pmean_ptr + po, m_acc, mask=cm)
    tl.store(pm2_ptr + po, m2_acc, mask=cm)


@triton.jit
def _chan_combine(na, ma, m2a, nb, mb, m2b):
    return chan_merge(na, ma, m2a, nb, mb, m2b)


class BNFinalize(NamedTuple):
    """What turns batch statistics into a training BatchNorm's affine, in the statistics merge.

    gamma/beta: fp32 (C,) or None (affine=False). running_mean/running_var: the layer's buffers
    (C,), any float dtype, or both None (no tracked statistics): their next values are returned
    as nn.BatchNorm computes them (r + momentum*(batch - r), the variance unbiased by n/(n-1)),
    in new tensors of the buffers' dtype, not written in place: the caller commits them (the
    fused ops are functional, so autograd and torch.compile can hold them)."""

    gamma: Optional[torch.Tensor]
    beta: Optional[torch.Tensor]
    eps: float
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    momentum: float = 0.1


# partial buffers are tiny (P x C fp32): C is not specialised either, so one kernel serves all
@triton.jit(do_not_specialize=("P", "C"))
def stats_merge_kernel(pcnt_ptr, pmean_ptr, pm2_ptr, P, C, mean_ptr, var_ptr,
                       gamma_ptr, beta_ptr, invstd_ptr, scale_ptr, shift_ptr, rmean_ptr, rvar_ptr,
                       nmean_ptr, nvar_ptr, eps, momentum,
                       FINALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                       UPDATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Combine (P, C) partials into per-channel mean and biased variance (fixed order).

    FINALIZE also writes the training BN affine (invstd = 1/sqrt(var + eps), scale = gamma*invstd,
    shift = beta - mean*scale) and, with UPDATE, the next running statistics: the whole
    statistics-to-affine step of a BN layer in one launch instead of five (merge, finalize and
    the running-statistics update)."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    m_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        msk = (p < P)[:, None] & cm[None, :]
        off = (p * C)[:, None] + c[None, :]
        nb = tl.load(pcnt_ptr + off, mask=msk, other=0.0)
        mb = tl.load(pmean_ptr + off, mask=msk, other=0.0)
        m2b = tl.load(pm2_ptr + off, mask=msk, other=0.0)
        nr, mr, m2r = tl.reduce((nb, mb, m2b), 0, _chan_combine)
        n_acc, m_acc, m2_acc = chan_merge(n_acc, m_acc, m2_acc, nr, mr, m2r)
    var = m2_acc / tl.where(n_acc > 0, n_acc, 1.0)
    tl.store(mean_ptr + c, m_acc, mask=cm)
    tl.store(var_ptr + c, var, mask=cm)
    if FINALIZE:
        invstd = 1.0 / tl.sqrt(var + eps)
        scale = invstd
        if HAS_GAMMA:
            scale = scale * tl.load(gamma_ptr + c, mask=cm, other=0.0)
        shift = -m_acc * scale
        if HAS_BETA:
            shift = shift + tl.load(beta_ptr + c, mask=cm, other=0.0)
        tl.store(invstd_ptr + c, invstd, mask=cm)
        tl.store(scale_ptr + c, scale, mask=cm)
        tl.store(shift_ptr + c, shift, mask=cm)
        if UPDATE:
            # nn.BatchNorm: the running variance is the unbiased one, n/(n-1)
            unbiased = var * (n_acc / tl.where(n_acc > 1.0, n_acc - 1.0, 1.0))
            rm = tl.load(rmean_ptr + c, mask=cm, other=0.0).to(tl.float32)
            rv = tl.load(rvar_ptr + c, mask=cm, other=0.0).to(tl.float32)
            rm = rm + momentum * (m_acc - rm)
            rv = rv + momentum * (unbiased - rv)
            tl.store(nmean_ptr + c, rm.to(nmean_ptr.dtype.element_ty), mask=cm)
            tl.store(nvar_ptr + c, rv.to(nvar_ptr.dtype.element_ty), mask=cm)


def _check_finalize(fin: BNFinalize, C: int, device: torch.device) -> BNFinalize:
    if isinstance(fin, tuple) and not isinstance(fin, BNFinalize):
        fin = BNFinalize(*fin)
    if not isinstance(fin, BNFinalize):
        raise TypeError(f"finalize must be a kernels.batchnorm.BNFinalize, got {type(fin).__name__}")
    if (fin.running_mean is None) != (fin.running_var is None):
        raise ValueError("finalize: running_mean and running_var must be given together (or both None)")
    for name, t in (("running_mean", fin.running_mean), ("running_var", fin.running_var)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,) or t.device != device
                              or not t.is_floating_point() or not t.is_contiguous()):
            raise ValueError(f"finalize.{name} must be a contiguous float tensor of shape ({C},) on {device}")
    return fin._replace(gamma=check_channel_vec("gamma", fin.gamma, C, device),
                        beta=check_channel_vec("beta", fin.beta, C, device))


def merge_stats(pcnt: torch.Tensor, pmean: torch.Tensor, pm2: torch.Tensor,
                finalize: Optional[BNFinalize] = None,
                out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """(P, C) fp32 partials (count, mean, M2) -> (mean, var_biased), fp32 (C,); with
    ``finalize``, (mean, var, invstd, scale, shift, next_running_mean, next_running_var) (the
    last two None without running statistics), all from the same single launch. ``out`` (with
    finalize): a contiguous (5, C) float32 buffer on the partials' device that receives the five
    statistics as its rows (then returned as views of it), so they can travel as one tensor."""
    P, C = pmean.shape
    dev = pmean.device
    fin = _check_finalize(finalize, C, dev) if finalize is not None else None
    if out is not None:
        if fin is None:
            raise ValueError("merge_stats: out= holds the finalized statistics; it needs finalize=")
        if (not isinstance(out, torch.Tensor) or tuple(out.shape) != (5, C) or out.dtype != torch.float32
                or out.device != dev or not out.is_contiguous()):
            raise ValueError(f"merge_stats: out must be a contiguous float32 tensor of shape (5, {C}) on {dev}")
        mean, var, *outs = out.unbind(0)
    else:
        # separate tensors: results of one op may not share a storage (torch.library's rule)
        mean, var = (torch.empty(C, dtype=torch.float32, device=dev) for _ in range(2))
        outs = [torch.empty(C, dtype=torch.float32, device=dev) for _ in range(3)] if fin is not None else []
    upd = fin is not None and fin.running_mean is not None
    nxt = (torch.empty_like(fin.running_mean), torch.empty_like(fin.running_var)) if upd else (None, None)
    bc = _merge_block_c(C)
    bp = _merge_block_p(P)
    d = mean
    stats_merge_kernel[(cdiv(C, bc),)](
        pcnt, pmean, pm2, P, C, mean, var,
        *(((fin.gamma if fin.gamma is not None else d), (fin.beta if fin.beta is not None else d), *outs,
           *((fin.running_mean, fin.running_var, *nxt) if upd else (d, d, d, d)),
           float(fin.eps), float(fin.momentum))
          if fin is not None else (d, d, d, d, d, d, d, d, d, 0.0, 0.0)),
        FINALIZE=fin is not None, HAS_GAMMA=fin is not None and fin.gamma is not None,
        HAS_BETA=fin is not None and fin.beta is not None,
        UPDATE=upd, BLOCK_P=bp, BLOCK_C=bc, num_warps=4)
    return (mean, var, *outs, *nxt) if fin is not None else (mean, var)


def _row_tile(C: int, S: int, channels_last: bool, elems: int = 2048) -> tuple[int, int]:
    """[BLOCK_S, BLOCK_C] of about ``elems`` elements; C-vectors as rows in the channels-last kind.
    On a GPU the tile never depends on S (a size-dependent tile is one more compile per input
    size; a small tensor just masks rows).  The interpreter pays per element of a tile, so
    there it shrinks to the number of rows."""
    interp = interp_tiles()
    if interp:                    # the interpreter pays per program: few, wide tiles
        bc = min(next_pow2(C), 64)
        return max(min(elems // bc, next_pow2(S)), 16), bc
    if channels_last:
        # 64 channels whenever C > 16: the decoder's 20/84/104-channel tensors share the tile
        # (and the compile) of the wide ones; their masked lanes cost no memory traffic
        bc = 64 if C > 16 else next_pow2(C)
    else:
        bc = min(next_pow2(C), 4)
    return elems // bc, bc


# Upper bound on per-channel partials of a reduction (P x C-blocks programs): about 8 waves of
# programs on an H100 (132 SMs) while keeping the merge kernel to a few BLOCK_P steps.
_MAX_PARTIALS = 1024
# Partials combined per step of the merge kernels (tree order inside a step, sequential across).
_MERGE_BLOCK_P = 64


def _merge_block_p(P: int) -> int:
    """Partials per merge step: fixed on a GPU (no per-size compile), <= P under the interpreter."""
    return min(next_pow2(P), _MERGE_BLOCK_P) if interp_tiles() else _MERGE_BLOCK_P


def _merge_block_c(C: int) -> int:
    """Channels per merge program: fixed on a GPU (one compile for every C), <= C interpreted."""
    return min(next_pow2(C), 64) if interp_tiles() else 64


def _num_partials(S: int, bs: int, n_cblocks: int) -> tuple[int, int]:
    """(P, rows per program): enough programs to fill a GPU, few enough partials to merge fast."""
    target = max(1, _MAX_PARTIALS // n_cblocks)
    P = min(cdiv(S, bs), target)
    rows = cdiv(cdiv(S, P), bs) * bs
    return cdiv(S, rows), rows


def channel_stats(x: torch.Tensor, finalize: Optional[BNFinalize] = None,
                  out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """Per-channel batch statistics of x over (N, H, W, D).

    x: (N, C, H, W, D), float32/bfloat16/float16, either layout.  Returns (mean, var_biased),
    both fp32 (C,), computed in fp32 with a numerically stable (count, mean, M2) merge;
    deterministic (no atomics).  Requires N*H*W*D > 0.  With ``finalize`` (a :class:`BNFinalize`)
    returns (mean, var, invstd, scale, shift, next_running_mean, next_running_var) from the
    merge launch (:func:`merge_stats`; ``out``: the (5, C) buffer for the five statistics).
    """
    check_tensor5("x", x)
    N, C, H, W, D = x.shape
    S = N * H * W * D
    if S == 0 or C == 0:
        raise ValueError(f"channel_stats needs at least one element per channel, got shape {tuple(x.shape)}")
    x, sxn, sxp, sxc = flat_strides(x)
    bs, bc = _row_tile(C, S, is_channels_last(x))
    ncb = cdiv(C, bc)
    P, rows = _num_partials(S, bs, ncb)
    pcnt, pmean, pm2 = stats_partials(P, C, x.device)
    _stats_partial_kernel[(P, ncb)](x, pcnt, pmean, pm2, S, H * W * D, C, sxn, sxp, sxc, rows,
                                    BLOCK_S=bs, BLOCK_C=bc, I64=needs_i64(x, extra=S + rows),
                                    XV=vec_aligns(x)[0], num_warps=4)
    return merge_stats(pcnt, pmean, pm2, finalize, out)


# ----------------------------------------------------------------------------------------------
# forward apply: z = relu(pool(y*scale + shift) + residual)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("S", "HWDo", "Dp", "D", "syn", "syp", "syc", "srn", "srp", "src",
                               "son", "sop", "soc"))
def _bn_apply_kernel(y_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, r_ptr, o_ptr, S, HWDo, Dp, D, C,
                     syn, syp, syc, srn, srp, src, son, sop, soc,
                     POOL: tl.constexpr, HAS_RES: tl.constexpr, RELU,
                     NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
                     YV: tl.constexpr, RV: tl.constexpr, OV: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if I64:
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        cc = c.to(tl.int64)
    else:
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        cc = c
    n = s // HWDo
    q = s % HWDo                 # output spatial index
    if POOL:
        p = (q // Dp) * D + 2 * (q % Dp)
    else:
        p = q
    mask = (s < S)[:, None] & cm[None, :]
    if NORM:
        # the BN affine from the statistics, per channel (what ops._util.bn_affine computes)
        sc = tl.load(invstd_ptr + c, mask=cm, other=0.0)
        if HAS_SCALE:
            sc = sc * tl.load(scale_ptr + c, mask=cm, other=0.0)
        sh = -tl.load(mean_ptr + c, mask=cm, other=0.0) * sc
        if HAS_SHIFT:
            sh = sh + tl.load(shift_ptr + c, mask=cm, other=0.0)
        sc = sc[None, :]
        sh = sh[None, :]
    else:
        sc = tl.load(scale_ptr + c, mask=cm, other=0.0)[None, :]
        sh = tl.load(shift_ptr + c, mask=cm, other=0.0)[None, :]
    yo = tile_offsets(n * syn + p * syp, cc, syc, YV)
    t = tl.load(y_ptr + yo, mask=mask, other=0.0).to(tl.float32) * sc + sh
    if POOL:
        y2 = tile_offsets(n * syn + p * syp + syp, cc, syc, YV)
        t2 = tl.load(y_ptr + y2, mask=mask, other=0.0).to(tl.float32) * sc + sh
        t = tl.where(pair_take_second(t, t2), t2, t)
    if HAS_RES:
        ro = tile_offsets(n * srn + q * srp, cc, src, RV)
        t = t + tl.load(r_ptr + ro, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        t = tl.where(t < 0.0, 0.0, t)   # keeps NaN, like torch.relu
    oo = tile_offsets(n * son + q * sop, cc, soc, OV)
    tl.store(o_ptr + oo, to_dtype(t, o_ptr.dtype.element_ty), mask=mask)


def bn_act_apply(y: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], *,
                 zpool: str = "none", residual: Optional[torch.Tensor] = None, relu: bool = True,
                 out: Optional[torch.Tensor] = None, out_channel_offset: int = 0,
                 mean: Optional[torch.Tensor] = None, invstd: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z = relu(pool(y*scale[c] + shift[c]) + residual), one pass.

    y: (N, C, H, W, D) float32/bfloat16/float16, either layout.  scale/shift: fp32 (C,).
    With mean/invstd (fp32 (C,), given together), scale and shift are the BN's gamma and beta
    (either may be None: affine=False) and the affine is formed in the kernel, scale =
    gamma*invstd, shift = beta - mean*scale: a BN recomputed from saved statistics costs no
    launch of its own.
    zpool: "none" or "after_affine" (max over z-pairs (2j, 2j+1) of the affine value; output
    depth D // 2).  residual: optional, same shape as the output, y's dtype, either layout.
    relu: apply ReLU last (NaN is kept).  out/out_channel_offset: write into
    out[:, off:off+C] of a preallocated (N, Ctot, H, W, Do) buffer (same dtype; must not overlap
    y or residual) and return that view; otherwise a new tensor in y's memory format.
    """
    check_tensor5("y", y)
    check_zpool(zpool, ("none", "after_affine"))
    N, C, H, W, D = y.shape
    if (mean is None) != (invstd is None):
        raise ValueError("bn_act_apply: mean and invstd must be given together")
    norm = mean is not None
    scale = check_channel_vec("scale", scale, C, y.device, required=not norm)
    shift = check_channel_vec("shift", shift, C, y.device, required=not norm)
    mean = check_channel_vec("mean", mean, C, y.device)
    invstd = check_channel_vec("invstd", invstd, C, y.device)
    pool = zpool == "after_affine"
    Do = D // 2 if pool else D
    oshape = (N, C, H, W, Do)
    o = prepare_output(oshape, y, residual, out, out_channel_offset)
    if o.numel() == 0:
        return o
    y, syn, syp, syc = flat_strides(y)
    _, son, sop, soc = flat_strides(o)
    if residual is not None:
        residual, srn, srp, src = flat_strides(residual)
    else:
        srn = srp = src = 0
    S = N * H * W * Do
    bs, bc = _row_tile(C, S, is_channels_last(y))
    grid = (cdiv(S, bs), cdiv(C, bc))
    yv, rv, ov = vec_aligns(y, residual, o)
    d = mean if norm else scale  # stands in for the pointers a variant never reads
    _bn_apply_kernel[grid](y, scale if scale is not None else d, shift if shift is not None else d,
                           mean if norm else d, invstd if norm else d, residual if residual is not None else y, o,
                           S, H * W * Do, max(Do, 1), D, C,
                           syn, syp, syc, srn, srp, src, son, sop, soc,
                           POOL=pool, HAS_RES=residual is not None, RELU=bool(relu),
                           NORM=norm, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                           BLOCK_S=bs, BLOCK_C=bc, I64=needs_i64(y, o, residual, extra=S + bs),
                           YV=yv, RV=rv, OV=ov, num_warps=4)
    return o


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bn_bwd_tile(g_ptr, y_ptr, o_ptr, beta_ptr, s, c, cc, cm, mean, invstd, gam,
                 S, HWR, R, Dp, D, sgn, sgp, sgc, syn, syp, syc, son, sop, soc,
                 POOL: tl.constexpr, RELU, HAS_OUT: tl.constexpr,
                 GV: tl.constexpr, YV: tl.constexpr, OV: tl.constexpr):
    """Load one tile and route the gradient.

    Rows are (n, hw, jj), jj in [0, R).  POOL: R = ceil(D/2), elements (2jj, 2jj+1) of y feed
    pooled position jj (jj == Dp is an odd tail slice that gets no gradient).  No pool: R = D
    and each row is one element (the "b" element is unused).
    Returns (ga, gb, xa, xb, gm, ya_off, m_a, m_b, go_off, m_g): routed fp32 gradients g_t at
    the a/b elements, their xhat, the masked output gradient gm (= grad of the residual), and
    offsets/masks for the stores.
    """
    n = s // HWR
    r = s % HWR
    hw = r // R
    jj = r % R
    row_ok = s < S
    if POOL:
        p = hw * D + 2 * jj
        q = hw * Dp + jj
        pair_ok = row_ok & (jj < Dp)
    else:
        p = hw * D + jj
        q = p
        pair_ok = row_ok
    cm2 = cm[None, :]
    m_a = row_ok[:, None] & cm2
    m_g = pair_ok[:, None] & cm2
    ya_off = tile_offsets(n * syn + p * syp, cc, syc, YV)
    ya = tl.load(y_ptr + ya_off, mask=m_a, other=0.0).to(tl.float32)
    xa = (ya - mean[None, :]) * invstd[None, :]
    go_off = tile_offsets(n * sgn + q * sgp, cc, sgc, GV)
    g = tl.load(g_ptr + go_off, mask=m_g, other=0.0).to(tl.float32)
    if RELU:
        if HAS_OUT:
            oo = tile_offsets(n * son + q * sop, cc, soc, OV)
            o = tl.load(o_ptr + oo, mask=m_g, other=0.0).to(tl.float32)
            g = tl.where(o > 0.0, g, 0.0)
        else:
            # no pool, no residual: out = relu(t) so out > 0 <=> t > 0
            beta = tl.load(beta_ptr + cc, mask=cm, other=0.0)
            t = gam[None, :] * xa + beta[None, :]
            g = tl.where(t > 0.0, g, 0.0)
    if POOL:
        m_b = m_g
        yb = tl.load(y_ptr + tile_offsets(n * syn + p * syp + syp, cc, syc, YV), mask=m_b, other=0.0).to(tl.float32)
        xb = (yb - mean[None, :]) * invstd[None, :]
        # t = gamma*xhat + beta is affine in y with the sign of gamma (invstd > 0): route on the
        # exact order of t, first element wins ties, NaN takes (torch max-pool rule).
        gpos = (gam > 0.0)[None, :]
        gneg = (gam < 0.0)[None, :]
        second = (gpos & (yb > ya)) | (gneg & (yb < ya)) | (yb != yb)
        ga = tl.where(second, 0.0, g)
        gb = tl.where(second, g, 0.0)
    else:
        m_b = m_g          # unused: gb is 0 and no b element is stored without POOL
        xb = xa
        ga = g
        gb = tl.zeros_like(g)
    return ga, gb, xa, xb, g, ya_off, m_a, m_b, go_off, m_g


@triton.jit(do_not_specialize=("S", "HWR", "R", "Dp", "D", "sgn", "sgp", "sgc", "syn", "syp", "syc",
                               "son", "sop", "soc", "ROWS_PER_PROG"))
def _bn_bwd_reduce_kernel(g_ptr, y_ptr, o_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                          psg_ptr, psgx_ptr, S, HWR, R, Dp, D, C,
                          sgn, sgp, sgc, syn, syp, syc, son, sop, soc, ROWS_PER_PROG,
                          POOL: tl.constexpr, RELU, HAS_OUT: tl.constexpr,
                          HAS_GAMMA: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
                          GV: tl.constexpr, YV: tl.constexpr, OV: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if I64:
        row0 = pid_p.to(tl.int64) * ROWS_PER_PROG
        cc = c.to(tl.int64)
    else:
        row0 = pid_p * ROWS_PER_PROG
        cc = c
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=cm, other=0.0)
    if HAS_GAMMA:
        gam = tl.load(gamma_ptr + c, mask=cm, other=0.0)
    else:
        gam = tl.full([BLOCK_C], 1.0, tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_S):
        s = row0 + start + tl.arange(0, BLOCK_S)
        ga, gb, xa, xb, g, ya_off, m_a, m_b, go_off, m_g = _bn_bwd_tile(
            g_ptr, y_ptr, o_ptr, beta_ptr, s, c, cc, cm, mean, invstd, gam,
            S, HWR, R, Dp, D, sgn, sgp, sgc, syn, syp, syc, son, sop, soc,
            POOL, RELU, HAS_OUT, GV, YV, OV)
        # masked lanes carry g == 0, so they add exactly 0 (xa/xb are finite there)
        acc_g += tl.sum(ga + gb, axis=0)
        acc_gx += tl.sum(tl.where(m_a, ga * xa, 0.0) + tl.where(m_b, gb * xb, 0.0), axis=0)
    po = pid_p * C + c
    tl.store(psg_ptr + po, acc_g, mask=cm)
    tl.store(psgx_ptr + po, acc_gx, mask=cm)


@triton.jit(do_not_specialize=("P", "C"))
def _sum_partials_kernel(pa_ptr, pb_ptr, P, C, a_ptr, b_ptr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        msk = (p < P)[:, None] & cm[None, :]
        off = (p * C)[:, None] + c[None, :]
        acc_a += tl.sum(tl.load(pa_ptr + off, mask=msk, other=0.0), axis=0)
        acc_b += tl.sum(tl.load(pb_ptr + off, mask=msk, other=0.0), axis=0)
    tl.store(a_ptr + c, acc_a, mask=cm)
    tl.store(b_ptr + c, acc_b, mask=cm)


@triton.jit(do_not_specialize=("S", "HWR", "R", "Dp", "D", "sgn", "sgp", "sgc", "syn", "syp", "syc",
                               "son", "sop", "soc", "sdn", "sdp", "sdc", "srn", "srp", "src",
                               "san", "sap", "sac"))
def _bn_bwd_apply_kernel(g_ptr, y_ptr, o_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                         sg_ptr, sgx_ptr, gy_ptr, gr_ptr, ad_ptr, inv_M, S, HWR, R, Dp, D, C,
                         sgn, sgp, sgc, syn, syp, syc, son, sop, soc,
                         sdn, sdp, sdc, srn, srp, src, san, sap, sac,
                         POOL: tl.constexpr, RELU, HAS_OUT: tl.constexpr,
                         HAS_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, RES_GRAD: tl.constexpr,
                         HAS_ADD: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
                         GV: tl.constexpr, YV: tl.constexpr, OV: tl.constexpr, DV: tl.constexpr,
                         RV: tl.constexpr, AV: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if I64:
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        cc = c.to(tl.int64)
    else:
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        cc = c
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=cm, other=0.0)
    if HAS_GAMMA:
        gam = tl.load(gamma_ptr + c, mask=cm, other=0.0)
    else:
        gam = tl.full([BLOCK_C], 1.0, tl.float32)
    ga, gb, xa, xb, g, ya_off, m_a, m_b, go_off, m_g = _bn_bwd_tile(
        g_ptr, y_ptr, o_ptr, beta_ptr, s, c, cc, cm, mean, invstd, gam,
        S, HWR, R, Dp, D, sgn, sgp, sgc, syn, syp, syc, son, sop, soc,
        POOL, RELU, HAS_OUT, GV, YV, OV)
    k = (gam * invstd)[None, :]
    if BATCH_STATS:
        sbm = (tl.load(sg_ptr + c, mask=cm, other=0.0) * inv_M)[None, :]
        sgm = (tl.load(sgx_ptr + c, mask=cm, other=0.0) * inv_M)[None, :]
        da = k * (ga - sbm - xa * sgm)
        db = k * (gb - sbm - xb * sgm)
    else:
        da = k * ga
        db = k * gb
    # grad_y has the layout of y; recompute its offsets from the y offsets' row part
    n = s // HWR
    r = s % HWR
    hw = r // R
    jj = r % R
    if POOL:
        p = hw * D + 2 * jj
        q = hw * Dp + jj
    else:
        p = hw * D + jj
        q = p
    do = tile_offsets(n * sdn + p * sdp, cc, sdc, DV)
    if HAS_ADD:
        # another gradient of y summed in (y also fed the op's residual): no pass of its own
        ao = tile_offsets(n * san + p * sap, cc, sac, AV)
        da = da + tl.load(ad_ptr + ao, mask=m_a, other=0.0).to(tl.float32)
    tl.store(gy_ptr + do, to_dtype(da, gy_ptr.dtype.element_ty), mask=m_a)
    if POOL:
        do2 = tile_offsets(n * sdn + p * sdp + sdp, cc, sdc, DV)
        tl.store(gy_ptr + do2, to_dtype(db, gy_ptr.dtype.element_ty), mask=m_b)
    if RES_GRAD:
        ro = tile_offsets(n * srn + q * srp, cc, src, RV)
        tl.store(gr_ptr + ro, to_dtype(g, gr_ptr.dtype.element_ty), mask=m_g)


def bn_act_backward(grad_out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    gamma: Optional[torch.Tensor], *, out: Optional[torch.Tensor] = None,
                    zpool: str = "none", relu: bool = True, batch_stats: bool = True,
                    residual_grad: bool = False, beta: Optional[torch.Tensor] = None,
                    add_to_grad_y: Optional[torch.Tensor] = None,
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Backward of o = relu(pool(gamma*(y-mean)*invstd + beta) (+ residual)).

    grad_out: (N, C, H, W, Do) gradient of o (Do = D // 2 with zpool="after_affine", else D).
    y: (N, C, H, W, D) the forward input of the BN (the raw conv output), same dtype.
    mean, invstd: fp32 (C,) statistics the forward normalised with.  gamma: fp32 (C,) or None
    (affine=False: ones, and grad_gamma is returned as None).
    out: the forward output o (same shape/dtype as grad_out); gives the ReLU mask ``out > 0``.
    Without it the mask is recomputed as t > 0, which needs ``beta`` (fp32 (C,)) and is only
    valid with no pool and no residual.
    batch_stats=True (training): grad_y = gamma*invstd*(g_t - sum(g_t)/M - xhat*sum(g_t*xhat)/M),
    M = N*H*W*D; False (eval, running stats): grad_y = gamma*invstd*g_t.
    residual_grad=True also returns grad_out*mask (the residual's gradient).
    add_to_grad_y: a tensor of y's shape and dtype (either layout) added to grad_y in the same pass
    (another gradient of y; zpool "none" only).
    Returns (grad_y [y's dtype/layout], grad_gamma fp32 (C,) or None, grad_beta fp32 (C,),
    grad_residual [grad_out's dtype/layout] or None).  Deterministic two-pass (no atomics).
    """
    check_tensor5("y", y)
    check_tensor5("grad_out", grad_out, dtype=y.dtype, device=y.device)
    check_zpool(zpool, ("none", "after_affine"))
    N, C, H, W, D = y.shape
    pool = zpool == "after_affine"
    Do = D // 2 if pool else D
    oshape = (N, C, H, W, Do)
    if tuple(grad_out.shape) != oshape:
        raise ValueError(f"grad_out must have shape {oshape} (y {tuple(y.shape)}, zpool={zpool!r}), "
                         f"got {tuple(grad_out.shape)}")
    mean = check_channel_vec("mean", mean, C, y.device, required=True)
    invstd = check_channel_vec("invstd", invstd, C, y.device, required=True)
    gamma = check_channel_vec("gamma", gamma, C, y.device)
    beta = check_channel_vec("beta", beta, C, y.device)
    if out is not None:
        check_tensor5("out", out, dtype=y.dtype, device=y.device)
        if tuple(out.shape) != oshape:
            raise ValueError(f"out (the forward output) must have shape {oshape}, got {tuple(out.shape)}")
    elif relu:
        if pool or residual_grad:
            raise ValueError("bn_act_backward: pass `out` (the forward output) for the ReLU mask when "
                             "zpool or a residual is used; t > 0 is only equivalent without them")
        if beta is None:
            raise ValueError("bn_act_backward: relu=True without `out` recomputes t > 0 and needs `beta`")
    if add_to_grad_y is not None:
        check_tensor5("add_to_grad_y", add_to_grad_y, dtype=y.dtype, device=y.device)
        if tuple(add_to_grad_y.shape) != tuple(y.shape) or pool:
            raise ValueError(f"add_to_grad_y must have y's shape {tuple(y.shape)} (and zpool 'none'), "
                             f"got {tuple(add_to_grad_y.shape)} with zpool={zpool!r}")
    gy = empty5(y.shape, y)
    gres = empty5(oshape, grad_out) if residual_grad else None
    M = N * H * W * D
    if M == 0:
        sum_g = torch.zeros(C, dtype=torch.float32, device=y.device)
        return gy, (torch.zeros_like(sum_g) if gamma is not None else None), sum_g, gres
    # written in full by _sum_partials_kernel: no zero-fill launches
    sum_g = torch.empty(C, dtype=torch.float32, device=y.device)
    sum_gx = torch.empty(C, dtype=torch.float32, device=y.device)
    y, syn, syp, syc = flat_strides(y)
    grad_out, sgn, sgp, sgc = flat_strides(grad_out)
    if out is not None:
        out, son, sop, soc = flat_strides(out)
    else:
        son = sop = soc = 0
    _, sdn, sdp, sdc = flat_strides(gy)
    if gres is not None:
        _, srn, srp, src = flat_strides(gres)
    else:
        srn = srp = src = 0
    if add_to_grad_y is not None:
        add_to_grad_y, san, sap, sac = flat_strides(add_to_grad_y)
    else:
        san = sap = sac = 0
    R = (D + 1) // 2 if pool else D
    S = N * H * W * R
    # smaller tiles in the contiguous kind: the pooled kernels spilled on sm_90 at 512x4 (reduce,
    # 20 B) and 256x4 (apply, 24 B) (bench/static_sm90.py); the channels-last [32, 64] tile does not
    bs, bc = _row_tile(C, S, is_channels_last(y), 2048 if is_channels_last(y) else 512)
    ncb = cdiv(C, bc)
    i64 = needs_i64(y, grad_out, out, gres, add_to_grad_y, extra=S + bs)
    yv, gv, ov, dv, rv, av = vec_aligns(y, grad_out, out, gy, gres, add_to_grad_y)
    common = dict(POOL=pool, RELU=bool(relu), HAS_OUT=out is not None, HAS_GAMMA=gamma is not None,
                  YV=yv, GV=gv, OV=ov)
    dummy = mean
    P, rows = _num_partials(S, bs, ncb)
    psg = torch.empty((P, C), dtype=torch.float32, device=y.device)
    psgx = torch.empty((P, C), dtype=torch.float32, device=y.device)
    _bn_bwd_reduce_kernel[(P, ncb)](
        grad_out, y, out if out is not None else y, mean, invstd,
        gamma if gamma is not None else dummy, beta if beta is not None else dummy,
        psg, psgx, S, H * W * R, R, max(Do, 1), D, C,
        sgn, sgp, sgc, syn, syp, syc, son, sop, soc, rows,
        BLOCK_S=bs, BLOCK_C=bc, I64=i64, num_warps=4, **common)
    bcs = _merge_block_c(C)
    _sum_partials_kernel[(cdiv(C, bcs),)](psg, psgx, P, C, sum_g, sum_gx,
                                          BLOCK_P=_merge_block_p(P), BLOCK_C=bcs, num_warps=4)
    grid = (cdiv(S, bs), ncb)
    _bn_bwd_apply_kernel[grid](
        grad_out, y, out if out is not None else y, mean, invstd,
        gamma if gamma is not None else dummy, beta if beta is not None else dummy,
        sum_g, sum_gx, gy, gres if gres is not None else gy,
        add_to_grad_y if add_to_grad_y is not None else gy, 1.0 / M, S, H * W * R, R, max(Do, 1), D, C,
        sgn, sgp, sgc, syn, syp, syc, son, sop, soc, sdn, sdp, sdc, srn, srp, src, san, sap, sac,
        BATCH_STATS=bool(batch_stats), RES_GRAD=bool(residual_grad), HAS_ADD=add_to_grad_y is not None,
        DV=dv, RV=rv, AV=av,
        BLOCK_S=bs, BLOCK_C=bc, I64=i64, num_warps=4, **common)
    return gy, (sum_gx if gamma is not None else None), sum_g, gres
