"""Implicit-GEMM 3D convolution with a BN+ReLU prologue and a fused epilogue.

GEMM view: rows = output voxels (n, ho, wo, d) [with a z-pool: pooled voxels (n, ho, wo, j),
each carrying TWO accumulators, for d = 2j and 2j+1, that share every weight tile], columns =
output channels, reduction = taps (kh, kw, kd) x input channels.

Tiling: a program owns a [BLOCK_M rows, BLOCK_N out-channels] tile in fp32 registers and walks
one flat K loop over (tap, BLOCK_K chunk of input channels) -- flat so that the pipeliner can
overlap the loads of step k+1 with the MMA of step k even when Cin fits in one chunk:
  A tile [BLOCK_M, BLOCK_K] = x[n, ci, ho*sh-ph+kh, wo*sw-pw+kw, d*sd-pd+kd]   (channels-last:
      each row is a contiguous run of BLOCK_K channels -> coalesced, vectorised loads)
  B tile [BLOCK_K, BLOCK_N] = w[co, ci, kh, kw, kd], read through the weight's own strides (small,
      L2-resident). A channels_last_3d weight is contiguous in ci, i.e. K-major B: 16-byte loads
      along K, the operand order wgmma wants (and the only one it takes for TF32). The fast
      AH-Net keeps its conv weights channels_last_3d, so neither eval nor training repacks them
      (a repack is a copy launch per conv per optimizer step); any other layout is read as is.
  acc += tl.dot(A, B) with fp32 accumulation (tensor cores for bf16/fp16; fp32 uses TF32 only if
  torch.backends.cuda.matmul.allow_tf32, else IEEE).
  Row offsets enter the address as (rows // V) * V, not as a tl.multiple_of hint: with the hint
  Triton lost the alignment inside the pipelined loop and loaded A with scalar 2-byte loads;
  with the arithmetic the A and B tiles are 16-/8-byte cp.async copies into a multi-stage
  buffer, and the pipeliner keeps one wgmma in flight across iterations (wait_group 1) -- the
  static report (bench/results/static_sm90.md) is where this is checked.
  Channel padding (XPAD): when x's rows are 16-byte aligned but Cin is not a multiple of the
  vector (a decoder tensor of 20 channels in a 24-channel buffer, a dense block's 1044 of 1088),
  the A load covers Cin rounded up to the vector -- memory that exists, checked on the host by
  _common.channel_room -- and the extra channels are zeroed in registers.
Prologue (pre-activation BN): A = relu(A*in_scale[ci] + in_shift[ci]) in fp32, rounded back to the
  input dtype (as the unfused composition would store it), then zeroed where the tap falls in
  the padding -- padding is applied AFTER the transform.
Small heads (Cout <= FMA_MAX_COUT): tl.dot needs N >= 16, so the K loop is fp32 FMAs over an
  exact next_pow2(Cout)-wide tile instead of a 16-wide MMA that would discard 75-94 % of it.
Epilogue (fp32): v = acc + bias; zpool "before_affine": max of the z-pair on v, then the affine;
  "after_affine": affine on both, then the max (max(a*s) != s*max(a) when s < 0); + residual;
  ReLU; store into out (optionally a channel slice of a bigger buffer, for dense-block concat);
  compute_stats: per-tile (count, mean, M2) of the stored v per channel (after the residual,
  when there is one), exact two-pass on registers,
  merged deterministically by batchnorm.stats_merge_kernel (no atomics).
Everything between the conv and the next conv is thus one read of x and one write of the output.
Split-K (a conv with fewer output tiles than SMs and a deep K loop; see split_k_plan): the same
kernel with SPLIT runs one contiguous slice of the K loop per program_id(2) and stores its fp32
accumulators to a workspace; _splitk_epilogue_kernel adds the slices in order and runs the same
_epilogue, so what is stored, pooled and counted in the statistics is unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ._common import (cdiv, channel_room, check_channel_vec, check_tensor5, check_zpool, interp_tiles,
                      needs_i64, next_pow2, pow2_part, prepare_output, stats_partials, tile_offsets,
                      to_dtype, vec_align)
from .batchnorm import merge_stats, tile_stats
from .zpool import pair_take_second

_POOL_CODES = {"none": 0, "before_affine": 1, "after_affine": 2}


@triton.jit
def _load_a(x_ptr, isc_ptr, ish_ptr, xrow, d_in, row_ok, ci, ci_ok, ci_ld, cio, H, W, D, hi, wi,
            sxc, sxh, sxw, sxd, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr, XV: tl.constexpr,
            XPAD: tl.constexpr):
    """A tile [BLOCK_M, BLOCK_K] of one tap at input depth d_in, with the BN+ReLU prologue.
    XPAD: the load covers the channels ``ci_ld`` (Cin rounded up to a full vector, inside the
    buffer's channel padding) so that it is one aligned 16-byte vector per row; what lies past
    Cin is zeroed in registers (it may be anything, NaN included)."""
    ok = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W) & (d_in >= 0) & (d_in < D)
    base = xrow + hi * sxh + wi * sxw + d_in * sxd
    am = ok[:, None] & ci_ok[None, :]
    if XPAD:
        a = tl.load(x_ptr + tile_offsets(base, cio, sxc, XV), mask=ok[:, None] & ci_ld[None, :], other=0.0)
        if not HAS_PRO:
            a = tl.where(am, a, 0.0).to(x_ptr.dtype.element_ty)
    else:
        a = tl.load(x_ptr + tile_offsets(base, cio, sxc, XV), mask=am, other=0.0)
    if HAS_PRO:
        sc = tl.load(isc_ptr + ci, mask=ci_ok, other=0.0)
        sh = tl.load(ish_ptr + ci, mask=ci_ok, other=0.0)
        af = a.to(tl.float32) * sc[None, :] + sh[None, :]
        if IN_RELU:
            af = tl.where(af < 0.0, 0.0, af)
        af = tl.where(am, af, 0.0)            # zero padding after the transform
        a = to_dtype(af, x_ptr.dtype.element_ty)
    return a


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
         FMA: tl.constexpr):
    if FMA:
        # a few output channels (the head's Cout = 1..4): tl.dot needs N >= 16, so an MMA would
        # compute 16 columns to keep 1..4 (75-94 % of it thrown away). fp32 FMAs over the
        # [BLOCK_M, BLOCK_K, BLOCK_N] products instead: exact products of the 16-bit inputs,
        # fp32 sums, every multiply useful (N is next_pow2(Cout))
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif UPCAST:
        # interpreter: bf16 dot multiplies raw bit patterns -> do it in fp32 (exact products)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IS_FP32:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


# Triton specialises every int argument on "== 1" and "% 16 == 0" and compiles one kernel per
# combination.  Spatial sizes and strides change with the input size (and, in the contiguous kind
# or with odd channel counts, so does their divisibility), so they are NOT specialised: the kernel
# compiled for one input size is the kernel for every size.  What the compiler needs from the
# strides (unit channel stride -> contiguous channel vectors; row offsets divisible by 8 -> 16-byte
# loads) is passed instead as the XV/OV/RV constexprs, which depend on the layout and the channel
# count of the buffer only (see _common.vec_align).  Cin/Cout/stride/padding stay specialised.
_CONV_NO_SPEC = ("M", "H", "W", "D", "Ho", "Wo", "Dr", "n_split", "Cin_ld",
                 "sxn", "sxc", "sxh", "sxw", "sxd", "son", "soc", "soh", "sow", "sod",
                 "srn", "src", "srh", "srw", "srd",
                 # weight strides: read only for a weight that is not channels_last_3d (W_CL)
                 "swo", "swi", "swh", "sww", "swd")


@triton.jit
def _store_tile_stats(v, valid, row_ok, pid_m, co, co_ok, Cout, pcnt_ptr, pmean_ptr, pm2_ptr,
                      BLOCK_N: tl.constexpr):
    """This tile's per-channel (count, mean, M2) into row pid_m of the (P, Cout) partials."""
    nrows = tl.sum(row_ok.to(tl.float32), axis=0)
    tmean, tm2 = tile_stats(v, valid, nrows)
    po = pid_m * Cout + co
    tl.store(pcnt_ptr + po, tl.zeros([BLOCK_N], dtype=tl.float32) + nrows, mask=co_ok)
    tl.store(pmean_ptr + po, tmean, mask=co_ok)
    tl.store(pm2_ptr + po, tm2, mask=co_ok)


@triton.jit
def _rows(m, Ho, Wo, Dr):
    """GEMM row -> (n, ho, wo, dr); dr is the output depth, or the pooled depth j (pair 2j, 2j+1)."""
    dr = m % Dr
    t = m // Dr
    wo = t % Wo
    t = t // Wo
    ho = t % Ho
    n = t // Ho
    return n, ho, wo, dr


@triton.jit
def _epilogue(acc0, acc1, n, ho, wo, dr, row_ok, pid_m, co, co_ok, Cout,
              bias_ptr, osc_ptr, osh_ptr, res_ptr, out_ptr, pcnt_ptr, pmean_ptr, pm2_ptr,
              son, soc, soh, sow, sod, srn, src, srh, srw, srd,
              HAS_BIAS: tl.constexpr, HAS_OSC: tl.constexpr, HAS_OSH: tl.constexpr, POOL: tl.constexpr,
              HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, I64: tl.constexpr,
              OV: tl.constexpr, RV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Everything after the K loop (fp32): bias, z-pool, affine, residual, ReLU, the store and the
    statistics partials.  Shared by the conv kernel and the split-K reduction, so a split conv
    computes exactly what the unsplit one does from the same accumulators."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + co, mask=co_ok, other=0.0)[None, :]
        acc0 = acc0 + bias
        acc1 = acc1 + bias
    if HAS_OSC:
        osc = tl.load(osc_ptr + co, mask=co_ok, other=0.0)[None, :]
    if HAS_OSH:
        osh = tl.load(osh_ptr + co, mask=co_ok, other=0.0)[None, :]
    if POOL == 1:
        # max of the raw (biased) accumulator first; the affine comes after
        v = tl.where(pair_take_second(acc0, acc1), acc1, acc0)
    else:
        v = acc0
    valid = row_ok[:, None] & co_ok[None, :]
    if STATS:
        if not HAS_RES:
            _store_tile_stats(v, valid, row_ok, pid_m, co, co_ok, Cout, pcnt_ptr, pmean_ptr, pm2_ptr, BLOCK_N)
    if HAS_OSC:
        v = v * osc
    if HAS_OSH:
        v = v + osh
    if POOL == 2:
        v1 = acc1
        if HAS_OSC:
            v1 = v1 * osc
        if HAS_OSH:
            v1 = v1 + osh
        v = tl.where(pair_take_second(v, v1), v1, v)
    if I64:
        coo = co.to(tl.int64)
    else:
        coo = co
    if HAS_RES:
        ro = tile_offsets(n * srn + ho * srh + wo * srw + dr * srd, coo, src, RV)
        v = v + tl.load(res_ptr + ro, mask=valid, other=0.0).to(tl.float32)
        if STATS:
            # the statistics of what is stored (acc + bias + residual; no affine, no ReLU):
            # the next BN's input when the residual is a skip sum (Pseudo3D's 3x3x1 + 1x1x3)
            _store_tile_stats(v, valid, row_ok, pid_m, co, co_ok, Cout, pcnt_ptr, pmean_ptr, pm2_ptr, BLOCK_N)
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)
    oo = tile_offsets(n * son + ho * soh + wo * sow + dr * sod, coo, soc, OV)
    tl.store(out_ptr + oo, to_dtype(v, out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=_CONV_NO_SPEC)
def _conv_kernel(x_ptr, w_ptr, bias_ptr, isc_ptr, ish_ptr, osc_ptr, osh_ptr, res_ptr, out_ptr,
                 pcnt_ptr, pmean_ptr, pm2_ptr, ws_ptr,
                 M, Cin, Cout, H, W, D, Ho, Wo, Dr, n_split, Cin_ld,
                 sxn, sxc, sxh, sxw, sxd,
                 swo, swi, swh, sww, swd,
                 son, soc, soh, sow, sod,
                 srn, src, srh, srw, srd,
                 STH, STW, STD, PH, PW, PD,
                 KH: tl.constexpr, KW: tl.constexpr, KD: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr,
                 HAS_OSC: tl.constexpr, HAS_OSH: tl.constexpr, POOL: tl.constexpr,
                 HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, W_CL: tl.constexpr,
                 UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 I64: tl.constexpr, XV: tl.constexpr, OV: tl.constexpr, RV: tl.constexpr,
                 CIN_V: tl.constexpr, COUT_V: tl.constexpr, XPAD: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if I64:
        m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    else:
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    if COUT_V > 1:
        # Triton only knows "Cout % 16 == 0"; Cout = 20 still allows 4-wide channel vectors
        co_ok = tl.max_constancy(co_ok, [COUT_V])
    row_ok = m < M
    n, ho, wo, dr = _rows(m, Ho, Wo, Dr)
    xrow = n * sxn
    if POOL != 0:
        d0 = 2 * dr
    else:
        d0 = dr
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if W_CL:
        # channels_last_3d weight (what a GPU model has): offset = co*T*Cin + tap*Cin + ci,
        # the same address arithmetic as a packed (tap, ci, co) layout, K-contiguous
        wcol = co * (KH * KW * KD * Cin)
        if CIN_V > 1:
            # Cin is a multiple of CIN_V, and so is every weight row offset: written as
            # arithmetic (see tile_offsets) so that Triton knows the B rows are CIN_V-aligned and
            # copies them with cp.async (8 bytes for 20 or 1044 input channels), which is what
            # lets the pipeliner keep the wgmma in flight across iterations
            wcol = (wcol // CIN_V) * CIN_V
    else:
        wcol = co * swo
    hbase = ho * STH - PH
    wbase = wo * STW - PW
    dbase = d0 * STD - PD
    # one flat loop over (tap, Cin chunk): a single loop is what the software pipeliner
    # (num_stages) overlaps, even when Cin fits in one chunk (the decoder's 20/80 channels)
    # at least one chunk (Cin >= 1 always): a K loop LLVM can prove non-empty has no zero-trip
    # edge that sets the accumulators with plain moves -- ptxas saw those as "non wgmma
    # instructions defining accumulator registers" (C7515) and serialized every wgmma
    n_chunks = tl.maximum(tl.cdiv(Cin, BLOCK_K), 1)
    n_it = KH * KW * KD * n_chunks
    pid_k = tl.program_id(2)   # 0 unless split
    if SPLIT:
        # split-K: slice pid_k of n_split contiguous, near-equal runs of the K loop (none is
        # empty: the launcher keeps n_split <= n_it). A runtime count: one compile for any split
        it_lo = (pid_k * n_it) // n_split
        # at least one step (true already; said so that the loop is provably non-empty, see n_chunks)
        n_mine = tl.maximum(((pid_k + 1) * n_it) // n_split - it_lo, 1)
    else:
        it_lo = 0
        n_mine = n_it
    for step in range(0, n_mine):
        it = it_lo + step
        tap = it // n_chunks
        k0 = (it - tap * n_chunks) * BLOCK_K
        kd = tap % KD
        kw = (tap // KD) % KW
        kh = tap // (KD * KW)
        ci = k0 + tl.arange(0, BLOCK_K)
        ci_ok = ci < Cin
        if CIN_V > 1:
            ci_ok = tl.max_constancy(ci_ok, [CIN_V])
        if XPAD:
            # Cin_ld = Cin rounded up to XV inside x's channel padding: an XV-constant mask
            ci_ld = tl.max_constancy(ci < Cin_ld, [XV])
        else:
            ci_ld = ci_ok
        if I64:
            cio = ci.to(tl.int64)
        else:
            cio = ci
        hi = hbase + kh
        wi = wbase + kw
        # weight rows (the column offsets are loop-invariant): channels_last_3d rows are
        # contiguous runs of input channels (vectorisable K loads); any other layout is read
        # through its strides (the interpreter's CPU path; a GPU model's weights are cl3d)
        if W_CL:
            if CIN_V > 1:
                brow = ((tap * Cin) // CIN_V) * CIN_V + cio
            else:
                brow = tap * Cin + cio
        else:
            brow = kh * swh + kw * sww + kd * swd + cio * swi
        b = tl.load(w_ptr + brow[:, None] + wcol[None, :], mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        a = _load_a(x_ptr, isc_ptr, ish_ptr, xrow, dbase + kd, row_ok, ci, ci_ok, ci_ld, cio, H, W, D,
                    hi, wi, sxc, sxh, sxw, sxd, HAS_PRO, IN_RELU, XV, XPAD)
        acc0 = _mma(a, b, acc0, UPCAST, IS_FP32, PRECISION, BLOCK_N < 16)
        if POOL != 0:
            # second output depth of the z-pair: same weight tile
            a1 = _load_a(x_ptr, isc_ptr, ish_ptr, xrow, dbase + STD + kd, row_ok, ci, ci_ok, ci_ld, cio,
                         H, W, D, hi, wi, sxc, sxh, sxw, sxd, HAS_PRO, IN_RELU, XV, XPAD)
            acc1 = _mma(a1, b, acc1, UPCAST, IS_FP32, PRECISION, BLOCK_N < 16)

    if SPLIT:
        # this slice's fp32 partial sums; _splitk_epilogue_kernel adds the slices in a fixed
        # order (deterministic, no atomics) and runs the epilogue
        _store_partial(ws_ptr, pid_k, acc0, acc1, m, row_ok, co, co_ok, M, Cout, POOL)
    else:
        _epilogue(acc0, acc1, n, ho, wo, dr, row_ok, pid_m, co, co_ok, Cout,
                  bias_ptr, osc_ptr, osh_ptr, res_ptr, out_ptr, pcnt_ptr, pmean_ptr, pm2_ptr,
                  son, soc, soh, sow, sod, srn, src, srh, srw, srd,
                  HAS_BIAS, HAS_OSC, HAS_OSH, POOL, HAS_RES, RELU, STATS, I64, OV, RV, BLOCK_N)


# The split-K workspace: (n_split, NACC, M, Cout) fp32, NACC = 2 with a z-pool (both depths of the
# pair), else 1; row-major, so a tile row is BLOCK_N contiguous fp32 (coalesced, 16-byte vectors).
@triton.jit
def _store_partial(ws_ptr, pid_k, acc0, acc1, m, row_ok, co, co_ok, M, Cout, POOL: tl.constexpr):
    if POOL != 0:
        rows_k = 2 * M
    else:
        rows_k = M
    off = (pid_k * rows_k + m)[:, None] * Cout + co[None, :]
    valid = row_ok[:, None] & co_ok[None, :]
    tl.store(ws_ptr + off, acc0, mask=valid)
    if POOL != 0:
        tl.store(ws_ptr + off + M * Cout, acc1, mask=valid)


@triton.jit(do_not_specialize=("M", "Ho", "Wo", "Dr", "n_split", "son", "soc", "soh", "sow", "sod",
                               "srn", "src", "srh", "srw", "srd"))
def _splitk_epilogue_kernel(ws_ptr, bias_ptr, osc_ptr, osh_ptr, res_ptr, out_ptr,
                            pcnt_ptr, pmean_ptr, pm2_ptr,
                            M, Cout, Ho, Wo, Dr, n_split,
                            son, soc, soh, sow, sod,
                            srn, src, srh, srw, srd,
                            HAS_BIAS: tl.constexpr, HAS_OSC: tl.constexpr, HAS_OSH: tl.constexpr,
                            POOL: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                            STATS: tl.constexpr, I64: tl.constexpr, OV: tl.constexpr, RV: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum the n_split partial tiles of a split conv in slice order, then the conv's epilogue.
    Same (BLOCK_M, BLOCK_N) tiling as the conv, so the statistics partials have the same rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if I64:
        m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    else:
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    row_ok = m < M
    valid = row_ok[:, None] & co_ok[None, :]
    if POOL != 0:
        rows_k = 2 * M
    else:
        rows_k = M
    off = m[:, None] * Cout + co[None, :]
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, n_split):
        base = ws_ptr + k * rows_k * Cout
        acc0 += tl.load(base + off, mask=valid, other=0.0)
        if POOL != 0:
            acc1 += tl.load(base + M * Cout + off, mask=valid, other=0.0)
    n, ho, wo, dr = _rows(m, Ho, Wo, Dr)
    _epilogue(acc0, acc1, n, ho, wo, dr, row_ok, pid_m, co, co_ok, Cout,
              bias_ptr, osc_ptr, osh_ptr, res_ptr, out_ptr, pcnt_ptr, pmean_ptr, pm2_ptr,
              son, soc, soh, sow, sod, srn, src, srh, srw, srd,
              HAS_BIAS, HAS_OSC, HAS_OSH, POOL, HAS_RES, RELU, STATS, I64, OV, RV, BLOCK_N)


# --------------------------------------------------------------------------- tile table (GPU)
#
# One fixed config per key, no runtime search: an autotuner keyed on the output size compiled
# ~116 kernels and benchmarked 152 configs for one AH-Net forward, and again for every new input
# size.  The tile is decided by what the GEMM looks like, never by the spatial size:
#   BLOCK_N  follows Cout: 16..128 for bf16/fp16 (tl.dot needs >= 16), 16..64 for fp32; a head
#            with Cout <= 4 gets exactly next_pow2(Cout) and FMAs (an MMA would be 16 wide),
#   BLOCK_K  bf16/fp16: 64 from 64 input channels up (one variant for all the dense-block widths
#            84..1084), below that the largest of 64/32/16 that pads Cin by <= 25 % (20 -> 32,
#            one chunk); fp32: 16,
#   BLOCK_M  64, warps 8 (fp32: 32 rows, 4 warps), stages 3 (16-bit NCDHW: 2), for every key.
# Why so uniform: the static report (bench/static_sm90.py, bench/results/static_sm90.md) showed
# that every 128-row tile spills on sm_90 whatever the warps (128x64x64/w4: 2.6 KB, 128x128x64/w8:
# 1.3 KB, 128x32x32/w4: 1 KB; sm_80 likewise): the per-row index and address arithmetic of the
# implicit GEMM, held for every row a thread loads, costs more registers than the accumulators.
# 64 rows over 8 warps is the largest tile without a spill for every AH-Net key in both layouts
# (bf16/fp16 up to 255 registers at 64x128x64 with a z-pool and a residual); fp32 (FMA, or TF32
# MMA) spilled at 64x128, at BLOCK_K 32 and, by 4-8 B, at 64x64x16 with 8 warps; 32x64x16 with 4
# warps needs ~100 registers.  A K loop shorter than 3 steps just leaves
# buffers unused (a second stage count would be a second compile of the same tile).  These are
# the largest spill-free tiles, not measured optima: nothing here has run on a GPU.

# Up to this many output channels (a segmentation head's classes) the conv runs its K loop on
# FMAs over an exact next_pow2(Cout)-wide tile instead of a 16-wide MMA (_mma, _pick_bn).
FMA_MAX_COUT = 4

SM90_SMEM_LIMIT = 232448   # bytes of shared memory one block may use on sm_90 (227 KB)


def _pick_bk(Cin: int, is_fp32: bool, taps: int = 1, has_pro: bool = False) -> int:
    if is_fp32:
        return 16   # fp32 at BLOCK_K 32 spilled (12-36 B on sm_90/sm_80, 64x32 and 64x64 tiles)
    if has_pro and taps > 1 and 64 < Cin < 128 and Cin % 64:
        # the decoder's 3x3x1 80->20 with the BN+ReLU prologue spilled 8 B on sm_80 at BLOCK_K 64
        # (K-contiguous weight tiles); 32 also wastes less of K (3 chunks for 80: 83 % useful).
        # The exact 16 (5 chunks) compiled to 176 main-loop instructions per 64x32x16 wgmma
        # against 228 per two at 32 (sm_90): 5.4 vs 4.2 instructions per 1k useful K x MACs, so 32
        return 32
    if Cin >= 64:
        return 64   # one K tile for every wide layer: the decoder's 84..1084-channel inputs share it
    options = (64, 32, 16)
    for bk in options:
        if cdiv(Cin, bk) * bk * 4 <= Cin * 5:
            return bk
    return min(options, key=lambda bk: (cdiv(Cin, bk) * bk, -bk))


def conv_configs(Cin: int, Cout: int, KH: int, KW: int, KD: int,
                 stride: Union[int, Sequence[int]] = 1, dtype: torch.dtype = torch.bfloat16,
                 channels_last: bool = True, pool: Union[int, str] = 0, has_pro: bool = False,
                 stats: bool = False, has_res: bool = False, split: bool = False) -> list[triton.Config]:
    """The config(s) the GPU path of ``conv3d_fused`` launches for this key: a pure function
    (no GPU, no compile), so a CPU can enumerate everything a model will compile.

    Key: taps (KH, KW, KD), stride, channel counts, dtype, layout (channel stride 1 or not),
    fusion (pool: 0/1/2 or "none"/"before_affine"/"after_affine"; has_pro: BN+ReLU prologue;
    stats: BN statistics epilogue; has_res: residual; split: the K-slice form of split-K).  Never
    the spatial size.  Returns a list
    of one config today (the launcher has no runtime search).  Today only the channel counts
    and the dtype change the choice (see the table notes above); the rest is in the key so that
    a table measured on a GPU can distinguish them without new call sites.
    """
    if isinstance(pool, str):
        pool = _POOL_CODES[pool]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"conv_configs: unsupported dtype {dtype}")
    is_fp32 = dtype == torch.float32
    bn = _pick_bn(Cout, 64 if is_fp32 else 128)
    if is_fp32 and (stats or (has_pro and KH * KW * KD > 1)):
        # fp32 at 32x64 spilled with the statistics epilogue (4-12 B, sm_80/sm_90) and with the
        # prologue over several taps (16 B, sm_80)
        bn = min(bn, 32)
    if is_fp32 and split:
        bn = min(bn, 32)   # the fp32 K slice's partial store spilled 16 B at 32x64 (sm_90)
    bk = _pick_bk(Cin, is_fp32, KH * KW * KD, has_pro)
    if is_fp32:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=3)]
    # NCDHW (channel stride != 1): A is a gather of 2-byte elements that cannot be a cp.async, so
    # a third stage holds registers for nothing: the 1x1x3 20->20 with the prologue spilled 4 B on
    # sm_80 at 3 stages and none at 2 (75 instead of 82 main-loop instructions per MMA)
    stages = 3 if channels_last else 2
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8, num_stages=stages)]


def _pick_bn(Cout: int, cap: int) -> int:
    """BLOCK_N: Cout's power of two, at least 16 (tl.dot's minimum) and at most ``cap``; below
    FMA_MAX_COUT the tile is exactly next_pow2(Cout) and the K loop runs on FMAs (see _mma)."""
    if Cout <= FMA_MAX_COUT:
        return next_pow2(Cout)
    return min(max(next_pow2(Cout), 16), cap)


def _interp_blocks(M: int, Cin: int, Cout: int) -> tuple[int, int, int]:
    """One config for the interpreter: few, wide programs (it pays per program and per op)."""
    bn = _pick_bn(Cout, 64)
    bk = min(max(next_pow2(Cin), 16), 64)
    bm = min(max(next_pow2(M), 16), 128)
    return bm, bn, bk


# --------------------------------------------------------------------------- split-K
#
# A conv whose output has fewer tiles than the GPU has SMs leaves SMs idle for its whole K loop:
# AH-Net's deep layers at 192x192x64 (layer4's 3x3x1 512->512: 8 tiles of 72 K iterations, on a
# 132-SM H200).  Such a conv is split along K into n_split slices, each a CTA that writes its fp32
# partial tile to a workspace; a second launch (_splitk_epilogue_kernel) adds the slices in slice
# order -- deterministic, no atomics, no cross-CTA ordering -- and runs the unchanged epilogue.
# The price is that launch (a few microseconds) plus 2 x n_split x (M x Cout) fp32 of workspace
# traffic; what it saves is (1 - 1/n_split) of the K loop, at roughly 0.2-0.5 us per 64-deep
# step of a 64x128 bf16 tile when one CTA runs alone on an SM.  So only a deep K loop is split
# (taps x Cin >= SPLITK_MIN_K, 32 such steps: where the saving passes a launch), and a slice keeps
# SPLITK_MIN_SLICE_K of it (4 steps of 64: something for the pipeline to overlap).  Counted in K
# elements, not loop iterations, so that fp32 (16-deep steps of a 32-row tile) splits the same
# convs.  First-principles thresholds: no GPU has run them.

SPLITK_MIN_K = 2048           # taps x Cin (padded to BLOCK_K) a conv needs before it is split
SPLITK_MIN_SLICE_K = 256      # K elements a slice keeps at least
SPLITK_MAX_WORKSPACE = 2**31 - 1   # fp32 elements: workspace offsets stay int32
DEFAULT_NUM_SMS = 132         # H100/H200 SXM; what a plan recorded without a GPU assumes
_NUM_SMS: dict = {}
_AUTO_SPLIT = [True]


@contextlib.contextmanager
def automatic_split_k(enabled: bool) -> Iterator[None]:
    """Turn the launcher's own split-K plan on or off for the calls inside (an explicit
    ``split_k=`` still wins): benchmarks time the same op split and unsplit with it."""
    prev, _AUTO_SPLIT[0] = _AUTO_SPLIT[0], bool(enabled)
    try:
        yield
    finally:
        _AUTO_SPLIT[0] = prev


def num_sms(device: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of ``device`` (a CUDA device), else DEFAULT_NUM_SMS."""
    if device is None or device.type != "cuda":
        return DEFAULT_NUM_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def split_k_plan(tiles: int, k_iters: int, block_k: int, sms: int, acc_elems: int = 0) -> int:
    """K slices for a conv of ``tiles`` output tiles and a K loop of ``k_iters`` steps of
    ``block_k`` on ``sms`` SMs: 1 when the tiles already fill a wave or the loop is shallower than
    SPLITK_MIN_K; else enough slices for a full wave (tiles x n_split >= sms) as far as every
    slice keeps SPLITK_MIN_SLICE_K of K, and no more than the workspace limit allows.
    ``acc_elems``: fp32 elements of one slice's partials (M x Cout, x2 with a z-pool)."""
    depth = k_iters * block_k
    if tiles >= sms or depth < SPLITK_MIN_K:
        return 1
    split = min(cdiv(sms, tiles), depth // SPLITK_MIN_SLICE_K, k_iters)
    while split > 1 and split * acc_elems > SPLITK_MAX_WORKSPACE:
        split -= 1
    return max(split, 1)


# --------------------------------------------------------------------------- launcher

def _triple(name: str, v: Union[int, Sequence[int]]) -> tuple[int, int, int]:
    if isinstance(v, int):
        v = (v, v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 3:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {v}")
    return v


def conv3d_fused(x: torch.Tensor, weight: torch.Tensor, *,
                 stride: Union[int, Sequence[int]] = (1, 1, 1),
                 padding: Union[int, Sequence[int]] = (0, 0, 0),
                 bias: Optional[torch.Tensor] = None,
                 in_scale: Optional[torch.Tensor] = None, in_shift: Optional[torch.Tensor] = None,
                 in_relu: bool = True,
                 out_scale: Optional[torch.Tensor] = None, out_shift: Optional[torch.Tensor] = None,
                 zpool: str = "none",
                 residual: Optional[torch.Tensor] = None, relu: bool = False,
                 out: Optional[torch.Tensor] = None, out_channel_offset: int = 0,
                 compute_stats: bool = False,
                 finalize=None, stats_out: Optional[torch.Tensor] = None,
                 split_k: Optional[int] = None,
                 ) -> Union[torch.Tensor, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """Fused 3D convolution (cross-correlation, like F.conv3d; no dilation, no groups).

    x: (N, Cin, H, W, D) float32/bfloat16/float16, channels_last_3d or contiguous (channel slices
    of either are fine).  weight: (Cout, Cin, KH, KW, KD), x's dtype, any strides (channels_last_3d
    is read fastest: K-contiguous).  Output depth before any pool
    Do = (D + 2*pd - KD)//sd + 1 (same for H, W).
    Prologue: if in_scale/in_shift (fp32 (Cin,), both required together) are given, every input
    value v becomes relu(v*in_scale + in_shift) (relu iff in_relu), zero padding applied after.
    Epilogue: t = (acc + bias) * out_scale + out_shift (bias: (Cout,), fp32 or x's dtype;
    out_scale/out_shift fp32 (Cout,); missing pieces are identities); zpool "before_affine" takes
    the max over z-pairs of (acc + bias) then the affine, "after_affine" the affine then the max;
    pooled depth Do // 2.  Then + residual (the final output's shape, x's dtype, either layout),
    then ReLU if relu.
    out/out_channel_offset: write into out[:, off:off+Cout] of a preallocated
    (N, Ctot, Ho, Wo, Dfinal) buffer of x's dtype (either layout; must not overlap x or
    residual) and return that view; otherwise a new tensor in x's memory format.
    compute_stats: also return (mean, var_biased), fp32 (Cout,), over (N, Ho, Wo, Dfinal) of
    acc + bias (after a "before_affine" pool) + residual, i.e. of the stored output, deterministic;
    needs out_scale/out_shift None, zpool in {"none", "before_affine"} and relu False.  finalize (a ``batchnorm.BNFinalize``, with compute_stats):
    the statistics come back as (mean, var, invstd, scale, shift, next_running_mean,
    next_running_var) from the same merge launch (the training BN's whole statistics step);
    the five statistics are rows of one (5, Cout) fp32 tensor (``stats_out`` when given).
    split_k: K slices (see split_k_plan): None = the launcher's plan on a GPU (a conv with fewer
    output tiles than SMs is split so that it fills a wave; never under the interpreter), an int
    >= 1 forces that many (clamped to the K loop's length; tests and benchmarks).
    Returns out, or (out, (mean, var)) with compute_stats.
    """
    check_tensor5("x", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        raise ValueError("weight must be a 5-D tensor (Cout, Cin, KH, KW, KD), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    check_zpool(zpool, tuple(_POOL_CODES))
    N, Cin, H, W, D = x.shape
    Cout, wcin, KH, KW, KD = weight.shape
    if wcin != Cin:
        raise ValueError(f"weight expects {wcin} input channels but x has {Cin} (groups are not supported)")
    sth, stw, std = _triple("stride", stride)
    ph, pw, pd = _triple("padding", padding)
    if min(sth, stw, std) < 1 or min(ph, pw, pd) < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    Ho = (H + 2 * ph - KH) // sth + 1
    Wo = (W + 2 * pw - KW) // stw + 1
    Do = (D + 2 * pd - KD) // std + 1
    if min(Ho, Wo, Do) < 1:
        raise ValueError(f"input spatial size {(H, W, D)} is too small for kernel {(KH, KW, KD)} "
                         f"with padding {(ph, pw, pd)}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together (prologue BN affine)")
    in_scale = check_channel_vec("in_scale", in_scale, Cin, x.device)
    in_shift = check_channel_vec("in_shift", in_shift, Cin, x.device)
    out_scale = check_channel_vec("out_scale", out_scale, Cout, x.device)
    out_shift = check_channel_vec("out_shift", out_shift, Cout, x.device)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (Cout,):
            raise ValueError(f"bias must be a tensor of shape ({Cout},)")
        if bias.dtype not in (torch.float32, x.dtype) or bias.device != x.device:
            raise TypeError(f"bias must be float32 or {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
        bias = bias.to(torch.float32).contiguous()
    if finalize is not None and not compute_stats:
        raise ValueError("finalize needs compute_stats=True (it finalizes the conv's own statistics)")
    if compute_stats and (out_scale is not None or out_shift is not None or zpool == "after_affine" or relu):
        raise ValueError("compute_stats=True needs out_scale/out_shift None, zpool in {'none', 'before_affine'} "
                         "and relu=False: the statistics are of the stored pre-affine value")
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None (the launcher's plan) or an int >= 1, got {split_k!r}")
    pool = _POOL_CODES[zpool]
    if x.is_cuda and not weight.is_contiguous(memory_format=torch.channels_last_3d):
        # on a GPU the kernel reads channels_last_3d weights (K-contiguous tiles); the fused
        # ops hand them over so (a model's weights are laid out that way, see FastAHNet), a
        # direct caller's other layout costs this one copy. The interpreter reads any strides.
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    Dr = Do // 2 if pool else Do
    oshape = (N, Cout, Ho, Wo, Dr)
    o = prepare_output(oshape, x, residual, out, out_channel_offset)
    M = N * Ho * Wo * Dr
    if M == 0 or Cout == 0:
        if compute_stats:
            raise ValueError(f"compute_stats needs a non-empty output, got {oshape}")
        return o

    interp = interp_tiles()
    upcast = interp and x.dtype == torch.bfloat16
    is_fp32 = x.dtype == torch.float32
    precision = "tf32" if (is_fp32 and torch.backends.cuda.matmul.allow_tf32 and not interp) else "ieee"
    i64 = needs_i64(x, o, residual, extra=M + 256)
    dummy = weight
    res_strides = residual.stride() if residual is not None else (0,) * 5
    args = [x, weight, bias if bias is not None else dummy,
            in_scale if in_scale is not None else dummy, in_shift if in_shift is not None else dummy,
            out_scale if out_scale is not None else dummy, out_shift if out_shift is not None else dummy,
            residual if residual is not None else dummy, o]
    flags = dict(KH=KH, KW=KW, KD=KD, HAS_BIAS=bias is not None, HAS_PRO=in_scale is not None,
                 IN_RELU=bool(in_relu), HAS_OSC=out_scale is not None, HAS_OSH=out_shift is not None,
                 POOL=pool, HAS_RES=residual is not None, RELU=bool(relu), STATS=bool(compute_stats),
                 W_CL=weight.is_contiguous(memory_format=torch.channels_last_3d),
                 UPCAST=upcast, IS_FP32=is_fp32, PRECISION=precision, I64=i64,
                 XV=vec_align(x), OV=vec_align(o), RV=vec_align(residual) if residual is not None else 0)
    # channel-count alignment hints: the channel masks of A (only useful when x's channels are
    # contiguous) and of B / the output.  A full 16-byte vector only when Triton itself knows the
    # count is a multiple of 16, else at most 4 elements: one variant per class, not per count
    vmax = 16 // x.element_size()

    def cvec(c: int) -> int:
        return vmax if c % 16 == 0 else min(pow2_part(c), 4, vmax)

    cin_v = cvec(Cin) if flags["XV"] > 0 else 1
    cout_v = cvec(Cout)
    # x in a buffer with channel padding (the fast AH-Net's decoder buffers: 20 channels in 24,
    # a dense block's 1084 in 1088): load Cin rounded up to a full aligned vector and zero the
    # rest in registers, where the channel mask alone would allow only Cin's power-of-two part
    xv = min(flags["XV"], vmax)
    cin_ld = cdiv(Cin, xv) * xv if xv > 1 else Cin
    xpad = cin_ld > Cin and cin_v < xv and channel_room(x, cin_ld - Cin)
    # a vector is as wide as both the buffer alignment and the channel mask allow: one value
    flags.update(CIN_V=cin_v, COUT_V=cout_v, XV=xv if xpad else min(flags["XV"], cin_v), XPAD=xpad,
                 OV=min(flags["OV"], cout_v), RV=min(flags["RV"], cout_v))
    scalars = [M, Cin, Cout, H, W, D, Ho, Wo, Dr, 1,   # [9]: n_split, set below
               cin_ld if xpad else Cin,
               x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4),
               weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3), weight.stride(4),
               o.stride(0), o.stride(1), o.stride(2), o.stride(3), o.stride(4),
               *res_strides, sth, stw, std, ph, pw, pd]
    acc_elems = M * Cout * (2 if pool else 1)
    sms = num_sms(x.device)

    def gpu_config(split_cfg: bool) -> dict:
        (cfg,) = conv_configs(Cin, Cout, KH, KW, KD, (sth, stw, std), x.dtype, flags["XV"] > 0, pool,
                              flags["HAS_PRO"], flags["STATS"], flags["HAS_RES"], split=split_cfg)
        return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def plan(launch: dict) -> tuple[int, int]:
        """(tiles, K-loop steps) of a launch config."""
        return (cdiv(M, launch["BLOCK_M"]) * cdiv(Cout, launch["BLOCK_N"]),
                KH * KW * KD * cdiv(Cin, launch["BLOCK_K"]))

    if interp:
        bm, bn, bk = _interp_blocks(M, Cin, Cout)
        launch = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        launch = gpu_config(False)
    tiles, k_iters = plan(launch)
    if split_k is None:
        auto = not interp and _AUTO_SPLIT[0]
        split = split_k_plan(tiles, k_iters, launch["BLOCK_K"], sms, acc_elems) if auto else 1
    else:
        split = max(1, min(split_k, k_iters))
    if split > 1 and not interp:
        # a K slice may have its own tile (conv_configs(split=True)); plan again with it
        s_launch = gpu_config(True)
        if s_launch != launch:
            s_tiles, s_iters = plan(s_launch)
            s_split = (split_k_plan(s_tiles, s_iters, s_launch["BLOCK_K"], sms, acc_elems) if split_k is None
                       else max(1, min(split_k, s_iters)))
            # a split launch always has the K-slice tile (what conv_configs(split=True) says)
            launch, k_iters, split = (s_launch, s_iters, s_split) if s_split > 1 else (launch, k_iters, 1)
    if split * acc_elems > SPLITK_MAX_WORKSPACE:
        raise ValueError(f"split_k={split_k}: a workspace of {split * acc_elems} fp32 elements is over the "
                         f"int32 offset limit; use a smaller split_k")
    bm, bn = launch["BLOCK_M"], launch["BLOCK_N"]
    P = cdiv(M, bm)
    Nt = cdiv(Cout, bn)
    scalars[9] = split
    parts = stats_partials(P, Cout, x.device) if compute_stats else (dummy, dummy, dummy)
    if split == 1:
        _conv_kernel[(P, Nt)](*args, *parts, dummy, *scalars, **flags, SPLIT=False, **launch)
    else:
        ws = torch.empty(split * acc_elems, device=x.device, dtype=torch.float32)
        # the partial-sum kernel: the K loop only (its epilogue flags are off, so one compile
        # serves every fusion of a key), then the reduction with the conv's epilogue
        k_flags = dict(flags, HAS_BIAS=False, HAS_OSC=False, HAS_OSH=False, HAS_RES=False, RELU=False,
                       STATS=False, OV=0, RV=0)
        k_args = [x, weight, dummy, args[3], args[4], dummy, dummy, dummy, dummy]
        _conv_kernel[(P, Nt, split)](*k_args, dummy, dummy, dummy, ws, *scalars, **k_flags, SPLIT=True, **launch)
        ep_flags = {k: flags[k] for k in ("HAS_BIAS", "HAS_OSC", "HAS_OSH", "POOL", "HAS_RES", "RELU", "STATS",
                                          "I64", "OV", "RV")}
        # 8 warps: a 64x128 fp32 tile at 4 warps spilled 128-176 B on sm_90 (static report)
        ep_launch = dict(BLOCK_M=bm, BLOCK_N=bn) if interp else dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=8)
        _splitk_epilogue_kernel[(P, Nt)](ws, args[2], args[5], args[6], args[7], o, *parts, M, Cout, Ho, Wo, Dr,
                                         split, *o.stride(), *res_strides, **ep_flags, **ep_launch)
    if not compute_stats:
        return o
    return o, merge_stats(*parts, finalize, stats_out)
