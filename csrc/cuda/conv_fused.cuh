// Fused implicit-GEMM 3D convolution: the device side of csrc/cuda/conv_fused.cu.
//
// This header is torch-free on purpose (CUDA runtime, cuda_fp16/cuda_bf16 and WMMA only), so the
// kernels can be compiled and checked on their own, without torch's headers.
//
// GEMM view (notes/OPS_CONTRACT.md, kernels/conv.py):
//   rows    m = ((n*Ho + ho)*Wo + wo)*Dc + d       output voxels, d fastest
//   columns co                                      output channels
//   reduce  (tap, ci), tap = (kh*KW + kw)*KD + kd   taps x input channels
// With a z-pool, Dc = 2*(Do/2): the odd tail slice d = Do-1, which no pooling window reads, is not
// computed, so every pooling pair (d = 2j, 2j+1) is a pair of ADJACENT rows (m, m+1) with m even.
// BM is even and every tile starts at an even row, so a pair never straddles two tiles: the
// epilogue pools output row r of a tile from the tile's rows 2r and 2r+1, read back from shared
// memory as fp32 accumulators (the max is taken on fp32 values, never on rounded ones).
//
// Block: 128 threads (4 warps), a BM x BN output tile (64x64, or 128x32 when Cout <= 32), the
// reduction walked in BK-wide chunks of input channels per tap (BK = 32 for 16-bit types, 16 for
// float32: 64 bytes of a channels-last row either way).
//   A tile [BM][BK]: x[n, ci, ho*sh-ph+kh, wo*sw-pw+kw, d*sd-pd+kd], loaded with the strides of x
//     (so channels_last_3d, contiguous and channel slices of either all work without a copy):
//     16-byte vectors when the channels are contiguous and Cin, the strides and the base pointer
//     allow it, else element by element (threads along channels when x's channel stride is 1,
//     along rows otherwise, so that both layouts coalesce).
//     Prologue: v -> relu(v*in_scale[ci] + in_shift[ci]) in fp32, rounded to the input dtype (as
//     the unfused composition stores it); out-of-bounds taps and channels >= Cin are exactly 0
//     AFTER the transform (zero padding after BN+ReLU).
//   B tile [BK][BN]: weights repacked by the host to (taps, Cin_pad, Cout_pad), zero-filled, so a
//     tile is always in bounds and 16-byte aligned.
//   Two shared-memory stages: the global loads of chunk k+1 are issued into registers before the
//   tensor-core work on chunk k, then transformed and stored to the other stage.
//   bf16/fp16: WMMA 16x16x16 with fp32 accumulation, each warp a 32x32 sub-tile (2x2 fragments).
//   float32:   fp32 FMA on CUDA cores (IEEE, no TF32), each thread an 8x4 sub-tile.
// Epilogue (fp32, from the accumulator tile staged in shared memory):
//   t = (acc + bias) [pool before] * out_scale + out_shift [pool after] (+ residual) (relu),
//   stored with the strides of `out` (a new tensor in x's memory format, or a channel slice of a
//   preallocated buffer). compute_stats: each tile writes per-channel (mean, M2) of the pre-affine
//   value over its valid output rows (exact two-pass in shared memory, fixed-order Chan merge of 4
//   or 2 row groups); the host merges tiles (count known from the tile size) with torch ops. No
//   atomics anywhere: results are bitwise reproducible.
// Indexing: element offsets are int64 throughout; GEMM row indices are int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace ahnet_fast_cuda {
namespace conv {

enum PoolMode : int { kPoolNone = 0, kPoolBeforeAffine = 1, kPoolAfterAffine = 2 };

constexpr int kThreads = 128;  // 4 warps per block, for every configuration

// Everything a launch needs; sizes in elements. Pointers to optional inputs are nullptr when absent.
struct ConvParams {
  const void* x;         // (N, Cin, H, W, D) with strides sx*
  const void* w;         // packed (taps, cin_pad, cout_pad), dense, zero-filled
  const float* bias;     // (Cout,) fp32 or nullptr
  const float* in_scale; // (Cin,) fp32; in_scale and in_shift are both set or both nullptr
  const float* in_shift;
  const float* out_scale;  // (Cout,) fp32 or nullptr
  const float* out_shift;  // (Cout,) fp32 or nullptr
  const void* residual;    // (N, Cout, Ho, Wo, Dout) with strides sr*, or nullptr
  void* out;               // (N, Cout, Ho, Wo, Dout) with strides so*
  float* part_mean;        // (m_tiles, Cout) or nullptr (no statistics)
  float* part_m2;          // (m_tiles, Cout) or nullptr
  int Cin, H, W, D, Cout;
  int Ho, Wo, Dc;          // Dc: computed depth per (n, ho, wo): Do, or 2*(Do/2) with a pool
  int KH, KW, KD;
  int st_h, st_w, st_d, pad_h, pad_w, pad_d;
  int cin_pad, cout_pad;   // packed weight dims: multiples of BK and BN
  int K, k_pad;            // sm_90 wgmma path only (conv_wgmma.cuh): taps*Cin, rounded up to 64
  int n_tiles;             // ceil(Cout / BN)
  int pool;                // PoolMode
  bool in_relu, relu;
  bool a_channel_fast;     // element-wise A loads: threads along channels (x's channel stride is 1)
  bool out_channel_fast;   // epilogue: threads along channels (out's channel stride is 1)
  int64_t M;               // GEMM rows = N*Ho*Wo*Dc
  int64_t sxn, sxc, sxh, sxw, sxd;
  int64_t son, soc, soh, sow, sod;
  int64_t srn, src, srh, srw, srd;
};

// ---------------------------------------------------------------------------------------------
// element types: raw 16-bit patterns (or floats) in registers and shared memory, fp32 math
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using bits = float;
  static constexpr int kVec = 4;   // elements per 16-byte vector
  static constexpr int kBK = 16;   // input channels per reduction chunk
  static __device__ __forceinline__ float to_f(bits v) { return v; }
  static __device__ __forceinline__ bits from_f(float v) { return v; }
};

template <>
struct Elem<__half> {
  using bits = unsigned short;
  static constexpr int kVec = 8;
  static constexpr int kBK = 32;
  static __device__ __forceinline__ float to_f(bits v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ bits from_f(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Elem<__nv_bfloat16> {
  using bits = unsigned short;
  static constexpr int kVec = 8;
  static constexpr int kBK = 32;
  static __device__ __forceinline__ float to_f(bits v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static __device__ __forceinline__ bits from_f(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// A 16-byte vector seen as raw elements.
template <typename Bits>
union Vec16 {
  uint4 u;
  Bits e[16 / sizeof(Bits)];
};

// torch's max_pool pair rule (same as pick_second in common.cuh): the second element wins only if
// it is greater or NaN, so the first wins ties and a NaN wins.
__device__ __forceinline__ bool pool_pick_second(float a, float b) { return (b > a) || isnan(b); }
// torch.relu keeps NaN.
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// ---------------------------------------------------------------------------------------------
// shared memory of one block
// ---------------------------------------------------------------------------------------------
template <typename T, int BM, int BN>
struct ConvSmem {
  using bits = typename Elem<T>::bits;
  static constexpr int BK = Elem<T>::kBK;
  // one 16-byte vector of padding per row: keeps every row 16/32-byte aligned (WMMA needs 32-byte
  // aligned fragment pointers and ldm a multiple of 8 halves / 4 floats) and shifts the banks
  static constexpr int LDA = BK + 16 / static_cast<int>(sizeof(bits));
  static constexpr int LDB = BN + 16 / static_cast<int>(sizeof(bits));
  static constexpr int LDC = BN + 4;
  struct Stages {
    bits a[2][BM * LDA];
    bits b[2][BK * LDB];
  };
  union {
    Stages ab;            // main loop
    float c[BM * LDC];    // epilogue: the fp32 accumulator tile
  };
  int4 rows[BM];          // per tile row: (n, ho, wo, d); n = -1 past the last row
  float red[3][kThreads]; // statistics: (count, mean, M2) of each row group
};

// ---------------------------------------------------------------------------------------------
// accumulators: WMMA (bf16/fp16) or fp32 FMA (float32)
// ---------------------------------------------------------------------------------------------
template <typename T, int BM, int BN>
struct MmaAcc {
  using Smem = ConvSmem<T, BM, BN>;
  static constexpr int WARPS_N = BN / 32;
  static constexpr int WARPS_M = (kThreads / 32) / WARPS_N;
  static_assert(WARPS_M * 32 == BM && WARPS_N * 32 == BN, "each warp owns a 32x32 sub-tile");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const typename Smem::bits* a, const typename Smem::bits* b) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const T* ap = reinterpret_cast<const T*>(a);
    const T* bp = reinterpret_cast<const T*>(b);
#pragma unroll
    for (int kk = 0; kk < Smem::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], ap + (wm * 32 + i * 16) * Smem::LDA + kk, Smem::LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bp + kk * Smem::LDB + wn * 32 + j * 16, Smem::LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* c) {
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(c + (wm * 32 + i * 16) * Smem::LDC + wn * 32 + j * 16, acc[i][j], Smem::LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <int BM, int BN>
struct FmaAcc {
  using Smem = ConvSmem<float, BM, BN>;
  static constexpr int TN = 4, TX = BN / TN;           // threads along N, each TN columns (strided by TX)
  static constexpr int TY = kThreads / TX, TM = BM / TY;  // threads along M, each TM rows (strided by TY)
  static_assert(TX * TY == kThreads && TM * TY == BM, "thread grid must cover the tile");
  float acc[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void step(const float* a, const float* b) {
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
    for (int k = 0; k < Smem::BK; ++k) {
      float av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = a[(ty + i * TY) * Smem::LDA + k];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = b[k * Smem::LDB + tx + j * TX];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* c) {
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[(ty + i * TY) * Smem::LDC + tx + j * TX] = acc[i][j];
  }
};

template <typename T, int BM, int BN>
using Accumulator = std::conditional_t<std::is_same_v<T, float>, FmaAcc<BM, BN>, MmaAcc<T, BM, BN>>;

// ---------------------------------------------------------------------------------------------
// A tile loader (input voxels x channels of one tap), with the BN+ReLU prologue
// ---------------------------------------------------------------------------------------------
// Where the tile's rows read for one tap: input coordinates of row r are
// (hi, wi, di) = (ho*st_h - pad_h + kh, wo*st_w - pad_w + kw, d*st_d - pad_d + kd).
struct TapPos {
  int kh, kw, kd, c0;
  int64_t wrow;  // first packed-weight row of this chunk: tap*cin_pad + c0
};

__device__ __forceinline__ TapPos tap_pos(const ConvParams& p, int it, int chunks, int BK) {
  const int tap = it / chunks;
  TapPos t;
  t.c0 = (it - tap * chunks) * BK;
  t.kd = tap % p.KD;
  t.kw = (tap / p.KD) % p.KW;
  t.kh = tap / (p.KD * p.KW);
  t.wrow = static_cast<int64_t>(tap) * p.cin_pad + t.c0;
  return t;
}

// Element offset of (row, channel c) for this tap, or -1 if the tap falls in the padding / past
// the last row.
__device__ __forceinline__ int64_t a_offset(const ConvParams& p, const int4 row, const TapPos& t, int c) {
  if (row.x < 0) return -1;
  const int hi = row.y * p.st_h - p.pad_h + t.kh;
  const int wi = row.z * p.st_w - p.pad_w + t.kw;
  const int di = row.w * p.st_d - p.pad_d + t.kd;
  if (hi < 0 || hi >= p.H || wi < 0 || wi >= p.W || di < 0 || di >= p.D) return -1;
  return static_cast<int64_t>(row.x) * p.sxn + static_cast<int64_t>(hi) * p.sxh + static_cast<int64_t>(wi) * p.sxw +
         static_cast<int64_t>(di) * p.sxd + static_cast<int64_t>(c) * p.sxc;
}

template <typename T, int BM, bool VEC>
struct ALoader;

// 16-byte vectors: x's channel stride is 1 and Cin, the other strides and the base are multiples
// of a vector, so a vector is entirely inside or entirely outside [0, Cin).
template <typename T, int BM>
struct ALoader<T, BM, true> {
  using E = Elem<T>;
  using bits = typename E::bits;
  static constexpr int BK = E::kBK, VPR = BK / E::kVec;  // vectors per row
  static constexpr int NV = BM * VPR / kThreads;
  static_assert(NV * kThreads == BM * VPR, "A vectors must divide evenly among the threads");
  Vec16<bits> v[NV];
  unsigned ok = 0;

  __device__ __forceinline__ void load(const ConvParams& p, const int4* rows, const TapPos& t) {
    ok = 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int r = id / VPR, c = t.c0 + (id % VPR) * E::kVec;
      const int64_t off = c < p.Cin ? a_offset(p, rows[r], t, c) : -1;
      if (off >= 0) {
        v[i].u = __ldg(reinterpret_cast<const uint4*>(static_cast<const bits*>(p.x) + off));
        ok |= 1u << i;
      } else {
        v[i].u = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
  template <int LDA>
  __device__ __forceinline__ void store(const ConvParams& p, const TapPos& t, bits* a) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int r = id / VPR, cc = (id % VPR) * E::kVec;
      Vec16<bits> o = v[i];
      if (p.in_scale != nullptr && (ok >> i & 1u)) {
        const int c = t.c0 + cc;
#pragma unroll
        for (int e = 0; e < E::kVec; ++e) {
          float f = fmaf(E::to_f(o.e[e]), __ldg(p.in_scale + c + e), __ldg(p.in_shift + c + e));
          if (p.in_relu) f = relu_keep_nan(f);
          o.e[e] = E::from_f(f);
        }
      }  // not ok: already exact zeros (padding after the transform)
      *reinterpret_cast<uint4*>(a + r * LDA + cc) = o.u;
    }
  }
};

// Element by element: any strides, any Cin.
template <typename T, int BM>
struct ALoader<T, BM, false> {
  using E = Elem<T>;
  using bits = typename E::bits;
  static constexpr int BK = E::kBK;
  static constexpr int NE = BM * BK / kThreads;
  static_assert(NE * kThreads == BM * BK && NE <= 32, "A elements must divide evenly, <= 32 per thread");
  bits v[NE];
  unsigned ok = 0;

  __device__ __forceinline__ void coords(const ConvParams& p, int i, int& r, int& cc) const {
    const int id = threadIdx.x + i * kThreads;
    if (p.a_channel_fast) {
      r = id / BK;
      cc = id % BK;
    } else {
      r = id % BM;
      cc = id / BM;
    }
  }
  __device__ __forceinline__ void load(const ConvParams& p, const int4* rows, const TapPos& t) {
    ok = 0;
#pragma unroll
    for (int i = 0; i < NE; ++i) {
      int r, cc;
      coords(p, i, r, cc);
      const int c = t.c0 + cc;
      const int64_t off = c < p.Cin ? a_offset(p, rows[r], t, c) : -1;
      if (off >= 0) {
        v[i] = __ldg(static_cast<const bits*>(p.x) + off);
        ok |= 1u << i;
      } else {
        v[i] = E::from_f(0.f);
      }
    }
  }
  template <int LDA>
  __device__ __forceinline__ void store(const ConvParams& p, const TapPos& t, bits* a) {
#pragma unroll
    for (int i = 0; i < NE; ++i) {
      int r, cc;
      coords(p, i, r, cc);
      bits o = v[i];
      if (p.in_scale != nullptr && (ok >> i & 1u)) {
        const int c = t.c0 + cc;
        float f = fmaf(E::to_f(o), __ldg(p.in_scale + c), __ldg(p.in_shift + c));
        if (p.in_relu) f = relu_keep_nan(f);
        o = E::from_f(f);
      }
      a[r * LDA + cc] = o;
    }
  }
};

// B tile: BK packed-weight rows x BN columns, always in bounds (zero-filled packing), 16-byte vectors.
template <typename T, int BN>
struct BLoader {
  using E = Elem<T>;
  using bits = typename E::bits;
  static constexpr int BK = E::kBK, VPR = BN / E::kVec;
  static constexpr int NV = BK * VPR / kThreads;
  static_assert(NV >= 1 && NV * kThreads == BK * VPR, "B vectors must divide evenly among the threads");
  uint4 v[NV];

  __device__ __forceinline__ void load(const ConvParams& p, const TapPos& t, int n0) {
    const bits* w = static_cast<const bits*>(p.w);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int k = id / VPR, n = (id % VPR) * E::kVec;
      v[i] = __ldg(reinterpret_cast<const uint4*>(w + (t.wrow + k) * p.cout_pad + n0 + n));
    }
  }
  template <int LDB>
  __device__ __forceinline__ void store(bits* b) const {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int k = id / VPR, n = (id % VPR) * E::kVec;
      *reinterpret_cast<uint4*>(b + k * LDB + n) = v[i];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// the kernel
// ---------------------------------------------------------------------------------------------
// Value of output row r, channel c of the tile BEFORE the affine (after a before-affine pool).
template <int LDC>
__device__ __forceinline__ float pre_affine(const float* c, int pool, int r, int col, float bias) {
  if (pool == kPoolBeforeAffine) {
    const float a = c[(2 * r) * LDC + col] + bias, b = c[(2 * r + 1) * LDC + col] + bias;
    return pool_pick_second(a, b) ? b : a;
  }
  return c[r * LDC + col] + bias;
}

// Row -> (n, ho, wo, d) for the BM rows of the tile starting at GEMM row m0 (n = -1 past the last
// row). The divisions run once per tile row, before the main loop.
template <int BM>
__device__ __forceinline__ void tile_rows(const ConvParams& p, int64_t m0, int4* rows) {
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    int4 info = make_int4(-1, 0, 0, 0);
    if (m < p.M) {
      int64_t q = m / p.Dc;
      info.w = static_cast<int>(m - q * p.Dc);
      const int64_t q2 = q / p.Wo;
      info.z = static_cast<int>(q - q2 * p.Wo);
      q = q2 / p.Ho;
      info.y = static_cast<int>(q2 - q * p.Ho);
      info.x = static_cast<int>(q);
    }
    rows[r] = info;
  }
}

// The fused epilogue of one BM x BN output tile (M tile mt starting at row m0 = mt*BM, first output
// channel n0), shared by the WMMA kernel below and the sm_90 wgmma kernel (conv_wgmma.cuh): c holds
// the fp32 accumulators (row stride LDC) in shared memory, rows the tile's row coordinates, red
// kThreads x 3 floats of scratch for the statistics. Called by all kThreads threads (it has a
// barrier). m0 is passed rather than recomputed from mt: recomputing it made ptxas allocate the
// fp32 64x64 element-wise kernel at 128 registers with an 8-byte spill.
template <typename T, int BM, int BN, int LDC>
__device__ __forceinline__ void conv_epilogue(const ConvParams& p, const float* c, const int4* rows,
                                              float (*red)[kThreads], int64_t mt, int64_t m0, int n0) {
  using E = Elem<T>;
  using bits = typename E::bits;
  const bool pooled = p.pool != kPoolNone;
  const int R = pooled ? BM / 2 : BM;                 // output rows of this tile
  const int64_t m_out = pooled ? p.M / 2 : p.M;       // output rows in total (M is even with a pool)
  const int64_t r0 = pooled ? m0 / 2 : m0;
  const int64_t left = m_out - r0;
  const int rows_valid = left < R ? static_cast<int>(left) : R;

  if (p.part_mean != nullptr) {
    // Per-channel (mean, M2) of the pre-affine value over this tile's valid output rows: G row
    // groups per channel, each exact two-pass, merged in a fixed order (Chan et al.).
    constexpr int G = kThreads / BN;
    const int col = threadIdx.x % BN, g = threadIdx.x / BN;
    const float bias = (p.bias != nullptr && n0 + col < p.Cout) ? __ldg(p.bias + n0 + col) : 0.f;
    float cnt = 0.f, sum = 0.f;
    for (int r = g; r < rows_valid; r += G) {
      sum += pre_affine<LDC>(c, p.pool, r, col, bias);
      cnt += 1.f;
    }
    const float mean = cnt > 0.f ? sum / cnt : 0.f;
    float m2 = 0.f;
    for (int r = g; r < rows_valid; r += G) {
      const float dv = pre_affine<LDC>(c, p.pool, r, col, bias) - mean;
      m2 = fmaf(dv, dv, m2);
    }
    red[0][threadIdx.x] = cnt;
    red[1][threadIdx.x] = mean;
    red[2][threadIdx.x] = m2;
    __syncthreads();
    if (g == 0 && n0 + col < p.Cout) {
      float n = cnt, mu = mean, q = m2;
      for (int h = 1; h < G; ++h) {
        const int s = h * BN + col;
        const float nb = red[0][s];
        if (nb == 0.f) continue;
        const float nn = n + nb, delta = red[1][s] - mu;
        mu += delta * (nb / nn);
        q += red[2][s] + delta * delta * (n * nb / nn);
        n = nn;
      }
      const int64_t o = mt * p.Cout + n0 + col;
      p.part_mean[o] = mu;
      p.part_m2[o] = q;
    }
  }

  // bias, pool, affine, residual, ReLU, store
  const bits* res = static_cast<const bits*>(p.residual);
  bits* out = static_cast<bits*>(p.out);
  for (int e = threadIdx.x; e < R * BN; e += kThreads) {
    int r, col;
    if (p.out_channel_fast) {
      r = e / BN;
      col = e % BN;
    } else {
      r = e % R;
      col = e / R;
    }
    const int co = n0 + col;
    if (r >= rows_valid || co >= p.Cout) continue;
    const float bias = p.bias != nullptr ? __ldg(p.bias + co) : 0.f;
    const float sc = p.out_scale != nullptr ? __ldg(p.out_scale + co) : 1.f;
    const float sh = p.out_shift != nullptr ? __ldg(p.out_shift + co) : 0.f;
    float v;
    if (p.pool == kPoolAfterAffine) {
      // affine on both, then the max: max(s*a, s*b) != s*max(a, b) when s < 0
      const float a = fmaf(c[(2 * r) * LDC + col] + bias, sc, sh);
      const float b = fmaf(c[(2 * r + 1) * LDC + col] + bias, sc, sh);
      v = pool_pick_second(a, b) ? b : a;
    } else {
      v = fmaf(pre_affine<LDC>(c, p.pool, r, col, bias), sc, sh);
    }
    const int4 row = rows[pooled ? 2 * r : r];
    const int64_t dout = pooled ? row.w / 2 : row.w;
    if (res != nullptr) {
      v += E::to_f(res[static_cast<int64_t>(row.x) * p.srn + static_cast<int64_t>(co) * p.src +
                       static_cast<int64_t>(row.y) * p.srh + static_cast<int64_t>(row.z) * p.srw + dout * p.srd]);
    }
    if (p.relu) v = relu_keep_nan(v);
    out[static_cast<int64_t>(row.x) * p.son + static_cast<int64_t>(co) * p.soc + static_cast<int64_t>(row.y) * p.soh +
        static_cast<int64_t>(row.z) * p.sow + dout * p.sod] = E::from_f(v);
  }
}

template <typename T, int BM, int BN, bool VEC_A>
__global__ void __launch_bounds__(kThreads) conv_fused_kernel(const ConvParams p) {
  using E = Elem<T>;
  using bits = typename E::bits;
  using Smem = ConvSmem<T, BM, BN>;
  constexpr int BK = E::kBK;
  static_assert(BM % 2 == 0, "pool pairs must not straddle tiles");
  __shared__ __align__(128) Smem sm;

  const int64_t tile = blockIdx.x;
  const int64_t mt = tile / p.n_tiles;
  const int n0 = static_cast<int>(tile - mt * p.n_tiles) * BN;
  const int64_t m0 = mt * BM;

  tile_rows<BM>(p, m0, sm.rows);
  __syncthreads();

  // ---- main loop: taps x input-channel chunks, two shared-memory stages
  const int chunks = p.cin_pad / BK;
  const int iters = p.KH * p.KW * p.KD * chunks;  // >= 1 (Cin >= 1, every kernel dim >= 1)
  ALoader<T, BM, VEC_A> la;
  BLoader<T, BN> lb;
  Accumulator<T, BM, BN> acc;
  acc.zero();

  TapPos t = tap_pos(p, 0, chunks, BK);
  la.load(p, sm.rows, t);
  lb.load(p, t, n0);
  la.template store<Smem::LDA>(p, t, sm.ab.a[0]);
  lb.template store<Smem::LDB>(sm.ab.b[0]);
  __syncthreads();
  for (int it = 0; it < iters; ++it) {
    const int cur = it & 1;
    const bool more = it + 1 < iters;
    if (more) {  // issue the next chunk's global loads before this chunk's math
      t = tap_pos(p, it + 1, chunks, BK);
      la.load(p, sm.rows, t);
      lb.load(p, t, n0);
    }
    acc.step(sm.ab.a[cur], sm.ab.b[cur]);
    if (more) {  // the other stage was last read in iteration it-1, before its closing barrier
      la.template store<Smem::LDA>(p, t, sm.ab.a[cur ^ 1]);
      lb.template store<Smem::LDB>(sm.ab.b[cur ^ 1]);
    }
    __syncthreads();
  }

  // ---- epilogue: accumulators -> shared memory (aliases the stages: all reads ended at the barrier)
  acc.store(sm.c);
  __syncthreads();

  conv_epilogue<T, BM, BN, Smem::LDC>(p, sm.c, sm.rows, sm.red, mt, m0, n0);
}

// ---------------------------------------------------------------------------------------------
// host side (torch-free): tile choice (the launches are in conv_fused.cu)
// ---------------------------------------------------------------------------------------------
struct TileShape {
  int BM, BN, BK;
};

// 128x32 when Cout <= 32 (the decoder's 20-channel convs), else 64x64.
template <typename T>
inline TileShape tile_shape(int Cout) {
  return Cout <= 32 ? TileShape{128, 32, Elem<T>::kBK} : TileShape{64, 64, Elem<T>::kBK};
}

// Whether x can be read in 16-byte vectors (see ALoader<..., true>).
template <typename T>
inline bool vector_loads_ok(const ConvParams& p) {
  constexpr int V = Elem<T>::kVec;
  return p.sxc == 1 && p.Cin % V == 0 && p.sxn % V == 0 && p.sxh % V == 0 && p.sxw % V == 0 && p.sxd % V == 0 &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

}  // namespace conv
}  // namespace ahnet_fast_cuda
