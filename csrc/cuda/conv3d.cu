// conv3d_fused: implicit-GEMM 3D convolution with the contract's prologue and epilogue fusions
// (notes/OPS_CONTRACT.md, kernels/conv.py):
//
//   prologue  v = relu?(x*in_scale[ci] + in_shift[ci]) on every in-bounds tap; padding is applied
//             AFTER this transform (out-of-bounds taps contribute exactly 0)
//   GEMM      rows = output positions, columns = output channels, K = (kh, kw, kd, Cin)
//             bf16/fp16: tensor cores (WMMA 16x16x16, fp32 accumulation); float32: fp32 FMAs
//             (IEEE, never TF32)
//   epilogue  a = acc + bias[co]
//             zpool "before_affine": p = pairmax_z(a), t = p*out_scale + out_shift
//             zpool "after_affine":  t = pairmax_z(a*out_scale + out_shift)
//             then + residual, ReLU, store at any output strides (e.g. a channel slice of a
//             preallocated concatenation buffer); optionally per-channel (mean, biased var) of the
//             value before the affine (after a "before_affine" pool), deterministic.
//
// With a z-pool the GEMM rows are (pooled position, pair element), so both elements of a pair
// always sit in the same tile and the max is taken on the fp32 accumulator; the odd tail slice is
// never computed. Tile 64x64x32, 4 warps; the fp32 accumulator tile goes through shared memory to
// the epilogue, which maps consecutive threads to consecutive output channels (coalesced stores in
// channels_last_3d).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <type_traits>

#include "common.cuh"

namespace ahnet_fast_cuda {
namespace {

constexpr int BM = 64;   // GEMM rows (output positions) per block
constexpr int BN = 64;   // output channels per block
constexpr int BK = 32;   // K step
constexpr int kConvThreads = 128;
constexpr int A_LD = BK + 8;  // shared leading dims padded against bank conflicts (WMMA: multiples of 8 / 4)
constexpr int B_LD = BN + 8;
constexpr int C_LD = BN + 4;

enum ZPool : int { kNone = 0, kBefore = 1, kAfter = 2 };

struct ConvParams {
  int64_t N, Cin, H, W, D;
  int64_t sxn, sxc, sxh, sxw, sxd;  // x strides (any layout)
  int64_t Cout, kh, kw, kd, K;      // weight as a [K][Cout] matrix, K = kh*kw*kd*Cin
  int64_t sth, stw, std_, ph, pw, pd;
  int64_t Ho, Wo, Do, Dp;  // conv output size; Dp = Do/2 with a z-pool, else Do
  int64_t rows;            // GEMM rows: 2*N*Ho*Wo*Dp with a z-pool, else N*Ho*Wo*Do
  int64_t son, soc, soh, sow, sod;  // out strides
  int64_t srn, src, srh, srw, srd;  // residual strides
  const float* bias;
  const float* in_scale;
  const float* in_shift;
  const float* out_scale;
  const float* out_shift;
  double* stats_part;  // [3][gridDim.x][Cout] or nullptr
  int zpool;
  bool in_relu, relu;
};

template <typename T>
struct TensorCoreType {
  using type = float;  // float32 inputs: the FMA path keeps fp32 tiles
};
template <>
struct TensorCoreType<c10::Half> {
  using type = __half;
};
template <>
struct TensorCoreType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ void to_smem(float v, float* dst) { *dst = v; }
__device__ __forceinline__ void to_smem(float v, __half* dst) { *dst = __float2half_rn(v); }
__device__ __forceinline__ void to_smem(float v, __nv_bfloat16* dst) { *dst = __float2bfloat16_rn(v); }

struct RowInfo {
  int64_t x_base;   // n * sxn
  int64_t out_off;  // offset of the (pooled) output element in `out` (channel 0)
  int64_t res_off;  // same in `residual`
  int h0, w0, d0;   // first input coordinate of the receptive field (may be negative)
  bool ok;
};

// Loads the A (im2col + prologue) and B (weight) tiles of K step k0 into shared memory.
template <typename scalar_t, typename smem_t>
__device__ __forceinline__ void load_tiles(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                           const ConvParams& p, const RowInfo* rows, int64_t k0, int64_t n0,
                                           smem_t* As, smem_t* Bs) {
  const int tid = threadIdx.x;
  {
    // each thread owns one K column (a fixed (tap, ci)) and every (kConvThreads/BK)-th row:
    // consecutive threads read consecutive input channels (contiguous in channels_last_3d)
    const int kk = tid % BK;
    const int64_t k = k0 + kk;
    const bool k_ok = k < p.K;
    int64_t ci = 0, th = 0, tw = 0, td = 0;
    float s = 1.f, b = 0.f;
    if (k_ok) {
      ci = k % p.Cin;
      int64_t tap = k / p.Cin;
      td = tap % p.kd;
      tap /= p.kd;
      tw = tap % p.kw;
      th = tap / p.kw;
      if (p.in_scale != nullptr) {
        s = p.in_scale[ci];
        b = p.in_shift[ci];
      }
    }
    const int64_t ch_off = ci * p.sxc;
    for (int r = tid / BK; r < BM; r += kConvThreads / BK) {
      float v = 0.f;
      const RowInfo& ri = rows[r];
      if (k_ok && ri.ok) {
        const int64_t hi = ri.h0 + th, wi = ri.w0 + tw, di = ri.d0 + td;
        if (hi >= 0 && hi < p.H && wi >= 0 && wi < p.W && di >= 0 && di < p.D) {
          v = to_f(x[ri.x_base + ch_off + hi * p.sxh + wi * p.sxw + di * p.sxd]);
          if (p.in_scale != nullptr) {
            v = fmaf(v, s, b);
            if (p.in_relu) v = relu_f(v);
          }
        }
      }
      to_smem(v, &As[r * A_LD + kk]);
    }
  }
  {
    const int nn = tid % BN;
    const int64_t co = n0 + nn;
    for (int kr = tid / BN; kr < BK; kr += kConvThreads / BN) {
      const int64_t k = k0 + kr;
      const float v = (k < p.K && co < p.Cout) ? to_f(w[k * p.Cout + co]) : 0.f;
      to_smem(v, &Bs[kr * B_LD + nn]);
    }
  }
}

// bf16/fp16: 4 warps in a 2x2 grid, each a 32x32 block of 2x2 WMMA fragments.
template <typename scalar_t, typename smem_t>
__device__ __forceinline__ void mainloop_tensor_core(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                                     const ConvParams& p, const RowInfo* rows, int64_t n0, smem_t* As,
                                                     smem_t* Bs, float* Cs) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    load_tiles(x, w, p, rows, k0, n0, As, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, smem_t, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, smem_t, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm + 16 * i) * A_LD + kk, A_LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + kk * B_LD + wn + 16 * j, B_LD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm + 16 * i) * C_LD + wn + 16 * j, acc[i][j], C_LD, wmma::mem_row_major);
}

// float32: each thread accumulates an 8x4 block with IEEE fp32 FMAs.
template <typename scalar_t>
__device__ __forceinline__ void mainloop_fma(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                             const ConvParams& p, const RowInfo* rows, int64_t n0, float* As,
                                             float* Bs, float* Cs) {
  const int tr = (threadIdx.x / 16) * 8, tc = (threadIdx.x % 16) * 4;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    load_tiles(x, w, p, rows, k0, n0, As, Bs);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = As[(tr + i) * A_LD + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * B_LD + tc + j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Cs[(tr + i) * C_LD + tc + j] = acc[i][j];
}

// The value before the affine at tile row r (for a z-pool: the pair starting at r), column col.
__device__ __forceinline__ float pre_affine(const ConvParams& p, const float* Cs, int r, int col, float bias) {
  const float a0 = Cs[r * C_LD + col] + bias;
  if (p.zpool != kBefore) return a0;
  const float a1 = Cs[(r + 1) * C_LD + col] + bias;
  return pick_second(a0, a1) ? a1 : a0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads)
    conv3d_fused_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                        const scalar_t* __restrict__ res, scalar_t* __restrict__ out, const ConvParams p) {
  using smem_t = typename TensorCoreType<scalar_t>::type;
  __shared__ __align__(32) smem_t As[BM * A_LD];
  __shared__ __align__(32) smem_t Bs[BK * B_LD];
  __shared__ __align__(32) float Cs[BM * C_LD];
  __shared__ RowInfo rows[BM];

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const bool pool = p.zpool != kNone;

  // GEMM row -> output position (n, ho, wo, d) and the (pooled) output element it feeds
  for (int r = threadIdx.x; r < BM; r += kConvThreads) {
    RowInfo ri{};
    const int64_t g = m0 + r;
    ri.ok = g < p.rows;
    if (ri.ok) {
      int64_t t, d, dout;
      if (pool) {
        const int64_t q = g >> 1;
        dout = q % p.Dp;
        t = q / p.Dp;
        d = 2 * dout + (g & 1);
      } else {
        d = g % p.Do;
        dout = d;
        t = g / p.Do;
      }
      const int64_t wo = t % p.Wo;
      t /= p.Wo;
      const int64_t ho = t % p.Ho;
      const int64_t n = t / p.Ho;
      ri.x_base = n * p.sxn;
      ri.h0 = static_cast<int>(ho * p.sth - p.ph);
      ri.w0 = static_cast<int>(wo * p.stw - p.pw);
      ri.d0 = static_cast<int>(d * p.std_ - p.pd);
      ri.out_off = n * p.son + ho * p.soh + wo * p.sow + dout * p.sod;
      ri.res_off = n * p.srn + ho * p.srh + wo * p.srw + dout * p.srd;
    }
    rows[r] = ri;
  }
  __syncthreads();

  if constexpr (std::is_same<smem_t, float>::value) {
    mainloop_fma(x, w, p, rows, n0, As, Bs, Cs);
  } else {
    mainloop_tensor_core(x, w, p, rows, n0, As, Bs, Cs);
  }
  __syncthreads();

  // epilogue: one (pooled) output element per (q, col), consecutive threads -> consecutive channels
  const int out_rows = pool ? BM / 2 : BM;
  for (int e = threadIdx.x; e < out_rows * BN; e += kConvThreads) {
    const int col = e % BN;
    const int r = pool ? 2 * (e / BN) : e / BN;
    const int64_t co = n0 + col;
    if (co >= p.Cout || !rows[r].ok) continue;
    const float bias = p.bias != nullptr ? p.bias[co] : 0.f;
    const float s = p.out_scale != nullptr ? p.out_scale[co] : 1.f;
    const float b = p.out_shift != nullptr ? p.out_shift[co] : 0.f;
    float t;
    if (p.zpool == kAfter) {
      const float t0 = fmaf(Cs[r * C_LD + col] + bias, s, b);
      const float t1 = fmaf(Cs[(r + 1) * C_LD + col] + bias, s, b);
      t = pick_second(t0, t1) ? t1 : t0;
    } else {
      t = fmaf(pre_affine(p, Cs, r, col, bias), s, b);
    }
    if (res != nullptr) t += to_f(res[rows[r].res_off + co * p.src]);
    if (p.relu) t = relu_f(t);
    out[rows[r].out_off + co * p.soc] = from_f<scalar_t>(t);
  }

  // per-channel partial statistics of the pre-affine value over this tile's rows (fixed order)
  if (p.stats_part != nullptr && threadIdx.x < BN) {
    const int col = threadIdx.x;
    const int64_t co = n0 + col;
    if (co < p.Cout) {
      const float bias = p.bias != nullptr ? p.bias[co] : 0.f;
      ShiftedMoments acc;
      for (int r = 0; r < BM; r += pool ? 2 : 1) {
        if (rows[r].ok) acc.add(pre_affine(p, Cs, r, col, bias));
      }
      double cnt, mean, m2;
      acc.summary(cnt, mean, m2);
      const int64_t P = gridDim.x, pi = blockIdx.x;
      p.stats_part[pi * p.Cout + co] = cnt;
      p.stats_part[(P + pi) * p.Cout + co] = mean;
      p.stats_part[(2 * P + pi) * p.Cout + co] = m2;
    }
  }
}

at::Tensor float_vector(const char* op, const char* name, const std::optional<at::Tensor>& v, int64_t C,
                        const at::Tensor& x) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK(v->device() == x.device(), "ahnet_fast_cuda::", op, ": ", name, " is on ", v->device(),
              " but x is on ", x.device());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == C, "ahnet_fast_cuda::", op, ": ", name, " must have shape (", C,
              ",), got ", v->sizes());
  TORCH_CHECK(at::isFloatingType(v->scalar_type()), "ahnet_fast_cuda::", op, ": ", name, " must be floating point, got ",
              c10::toString(v->scalar_type()));
  return v->to(at::kFloat).contiguous();
}

struct ConvSetup {
  ConvParams p;
  std::vector<int64_t> out_shape;
  at::Tensor wmat, bias, in_scale, in_shift, out_scale, out_shift;
};

ConvSetup prepare_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
                       bool in_relu, const std::optional<at::Tensor>& out_scale,
                       const std::optional<at::Tensor>& out_shift, c10::string_view zpool_sv, bool relu,
                       bool compute_stats) {
  check_input(op, "x", x);
  check_input(op, "weight", weight);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), "ahnet_fast_cuda::", op,
              ": weight (", describe(weight), ") must have x's dtype and device (", describe(x), ")");
  TORCH_CHECK(weight.size(1) == x.size(1), "ahnet_fast_cuda::", op, ": weight has ", weight.size(1),
              " input channels, x has ", x.size(1), " (groups are not supported)");
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3, "ahnet_fast_cuda::", op, ": stride and padding need 3 values");
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(stride[i] >= 1 && padding[i] >= 0, "ahnet_fast_cuda::", op, ": stride ", stride, " must be >= 1 and padding ",
                padding, " >= 0");
  }
  const std::string z(zpool_sv.data(), zpool_sv.size());
  int zpool = kNone;
  if (z == "none") {
    zpool = kNone;
  } else if (z == "before_affine") {
    zpool = kBefore;
  } else if (z == "after_affine") {
    zpool = kAfter;
  } else {
    TORCH_CHECK(false, "ahnet_fast_cuda::", op, ": zpool=\"", z, "\" is not accepted; use \"none\", \"before_affine\" or \"after_affine\"");
  }
  const bool has_in_scale = in_scale.has_value() && in_scale->defined();
  const bool has_in_shift = in_shift.has_value() && in_shift->defined();
  TORCH_CHECK(has_in_scale == has_in_shift, "ahnet_fast_cuda::", op, ": in_scale and in_shift go together (the "
              "pre-activation BN+ReLU prologue); got only one of them");
  const bool has_out_affine = (out_scale.has_value() && out_scale->defined()) || (out_shift.has_value() && out_shift->defined());
  TORCH_CHECK(!compute_stats || (!has_out_affine && zpool != kAfter), "ahnet_fast_cuda::", op,
              ": compute_stats=True needs out_scale/out_shift None and zpool in (\"none\", \"before_affine\")");

  ConvSetup s{};
  ConvParams& p = s.p;
  p.N = x.size(0);
  p.Cin = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.D = x.size(4);
  p.sxn = x.stride(0);
  p.sxc = x.stride(1);
  p.sxh = x.stride(2);
  p.sxw = x.stride(3);
  p.sxd = x.stride(4);
  p.Cout = weight.size(0);
  p.kh = weight.size(2);
  p.kw = weight.size(3);
  p.kd = weight.size(4);
  p.K = p.kh * p.kw * p.kd * p.Cin;
  p.sth = stride[0];
  p.stw = stride[1];
  p.std_ = stride[2];
  p.ph = padding[0];
  p.pw = padding[1];
  p.pd = padding[2];
  p.Ho = (p.H + 2 * p.ph - p.kh) / p.sth + 1;
  p.Wo = (p.W + 2 * p.pw - p.kw) / p.stw + 1;
  p.Do = (p.D + 2 * p.pd - p.kd) / p.std_ + 1;
  TORCH_CHECK(p.H + 2 * p.ph >= p.kh && p.W + 2 * p.pw >= p.kw && p.D + 2 * p.pd >= p.kd, "ahnet_fast_cuda::", op,
              ": kernel ", weight.sizes().slice(2), " is larger than the padded input ", x.sizes().slice(2));
  TORCH_CHECK(zpool == kNone || p.Do >= 2, "ahnet_fast_cuda::", op, ": a z-pool needs output depth >= 2, got ", p.Do);
  // the receptive-field origin is kept in 32 bits
  TORCH_CHECK(p.H + p.ph < (int64_t{1} << 30) && p.W + p.pw < (int64_t{1} << 30) && p.D + p.pd < (int64_t{1} << 30),
              "ahnet_fast_cuda::", op, ": spatial size too large");
  p.Dp = zpool != kNone ? p.Do / 2 : p.Do;
  p.rows = zpool != kNone ? 2 * p.N * p.Ho * p.Wo * p.Dp : p.N * p.Ho * p.Wo * p.Do;
  p.zpool = zpool;
  p.in_relu = in_relu;
  p.relu = relu;
  s.out_shape = {p.N, p.Cout, p.Ho, p.Wo, p.Dp};
  // weight as a [K][Cout] matrix with K ordered (kh, kw, kd, Cin), the order the A tile is gathered in
  s.wmat = weight.permute({2, 3, 4, 1, 0}).contiguous().view({p.K, p.Cout});
  s.bias = float_vector(op, "bias", bias, p.Cout, x);
  s.in_scale = float_vector(op, "in_scale", in_scale, p.Cin, x);
  s.in_shift = float_vector(op, "in_shift", in_shift, p.Cin, x);
  s.out_scale = float_vector(op, "out_scale", out_scale, p.Cout, x);
  s.out_shift = float_vector(op, "out_shift", out_shift, p.Cout, x);
  p.bias = s.bias.defined() ? s.bias.const_data_ptr<float>() : nullptr;
  p.in_scale = s.in_scale.defined() ? s.in_scale.const_data_ptr<float>() : nullptr;
  p.in_shift = s.in_shift.defined() ? s.in_shift.const_data_ptr<float>() : nullptr;
  p.out_scale = s.out_scale.defined() ? s.out_scale.const_data_ptr<float>() : nullptr;
  p.out_shift = s.out_shift.defined() ? s.out_shift.const_data_ptr<float>() : nullptr;
  return s;
}

// Runs the kernel writing into `out` (any strides); returns (mean, var) if compute_stats.
std::tuple<at::Tensor, at::Tensor> run_conv(const char* op, ConvSetup& s, const at::Tensor& x,
                                            const std::optional<at::Tensor>& residual, bool compute_stats,
                                            const at::Tensor& out) {
  ConvParams& p = s.p;
  p.son = out.stride(0);
  p.soc = out.stride(1);
  p.soh = out.stride(2);
  p.sow = out.stride(3);
  p.sod = out.stride(4);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    check_same(op, "residual", *residual, x, "x", s.out_shape);
    res = *residual;
    p.srn = res.stride(0);
    p.src = res.stride(1);
    p.srh = res.stride(2);
    p.srw = res.stride(3);
    p.srd = res.stride(4);
  }
  at::Tensor mean, var;
  const int64_t gx = (p.rows + BM - 1) / BM;
  const int64_t gy = (p.Cout + BN - 1) / BN;
  if (compute_stats) {
    TORCH_CHECK(p.rows > 0, "ahnet_fast_cuda::", op, ": statistics over an empty output are undefined");
    mean = at::empty({p.Cout}, x.options().dtype(at::kFloat));
    var = at::empty({p.Cout}, x.options().dtype(at::kFloat));
  }
  if (p.rows == 0 || p.Cout == 0) return {mean, var};
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max() && gy <= 65535, "ahnet_fast_cuda::", op,
              ": problem too large for one launch (", p.rows, " rows, ", p.Cout, " channels)");
  at::Tensor part;
  if (compute_stats) {
    part = at::empty({3, gx, p.Cout}, x.options().dtype(at::kDouble));
    p.stats_part = part.mutable_data_ptr<double>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
  AHF_DISPATCH_FLOATING(x.scalar_type(), "conv3d_fused", [&] {
    conv3d_fused_kernel<scalar_t><<<grid, kConvThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), s.wmat.const_data_ptr<scalar_t>(),
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t*>(out.data_ptr()), p);
  });
  AHF_CHECK_LAUNCH(op, "x=", describe(x), ", weight=", describe(s.wmat), " (K x Cout), out=", describe(out));
  if (compute_stats) {
    stats_finalize_kernel<<<static_cast<unsigned int>((p.Cout + 255) / 256), 256, 0, stream>>>(
        part.const_data_ptr<double>(), gx, p.Cout, mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
    AHF_CHECK_LAUNCH(op, "x=", describe(x), " (statistics merge)");
  }
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3d_fused_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_shift, c10::string_view zpool, const std::optional<at::Tensor>& residual,
    bool relu, bool compute_stats) {
  constexpr const char* op = "conv3d_fused";
  const c10::cuda::CUDAGuard guard(x.device());
  ConvSetup s = prepare_conv(op, x, weight, stride, padding, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                             zpool, relu, compute_stats);
  at::Tensor out = at::empty(s.out_shape, x.options().memory_format(x.suggest_memory_format()));
  auto stats = run_conv(op, s, x, residual, compute_stats, out);
  return {out, std::get<0>(stats), std::get<1>(stats)};
}

std::tuple<at::Tensor, at::Tensor> conv3d_fused_out_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_shift, c10::string_view zpool, const std::optional<at::Tensor>& residual,
    bool relu, bool compute_stats, const at::Tensor& out) {
  constexpr const char* op = "conv3d_fused_out";
  const c10::cuda::CUDAGuard guard(x.device());
  ConvSetup s = prepare_conv(op, x, weight, stride, padding, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                             zpool, relu, compute_stats);
  TORCH_CHECK(out.defined(), "ahnet_fast_cuda::", op, ": out is undefined");
  check_same(op, "out", out, x, "x", s.out_shape);
  return run_conv(op, s, x, residual, compute_stats, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast_cuda, CUDA, m) {
  m.impl("conv3d_fused", &conv3d_fused_cuda);
  m.impl("conv3d_fused_out", &conv3d_fused_out_cuda);
}

}  // namespace ahnet_fast_cuda
