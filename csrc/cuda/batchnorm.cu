// BatchNorm pieces around the convs (see notes/OPS_CONTRACT.md, kernels/batchnorm.py):
//
//   channel_stats(x)            -> (mean, biased var), fp32 (C,), over (N, H, W, D)
//   bn_act_apply(y, scale, ...) -> relu?(pool?(y*scale[c] + shift[c]) + residual?)
//   bn_act_backward(...)        -> (grad_y, grad_gamma, grad_beta, grad_residual)
//
// Reductions are deterministic and use no atomics: each block writes per-channel partials
// (count, mean, M2) or (sum g, sum g*xhat) to a float64 workspace, and one thread per channel merges
// them in a fixed order. Inside a thread, statistics are accumulated in float64 on data shifted by
// the thread's first value (no catastrophic cancellation, no division per element); blocks merge
// with Chan's formula.
//
// Two data layouts (see ZView in common.cuh): channels_last_3d, where a row of C channels is
// contiguous and the reductions use 32-channel x 8-row tiles, and contiguous, where every (n, c)
// plane is contiguous and a block reduces one channel.
#include <torch/library.h>

#include "common.cuh"

namespace ahnet_fast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTX = 32;  // channels per block in the channels-last reductions (one warp: coalesced rows)
constexpr int kTY = 8;   // rows per block in the channels-last reductions

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Partitioning of `work` items into `parts` contiguous ranges of `per_part` items, so that
// `other_blocks * parts` blocks fill the GPU a few times over (never more parts than 65535, the
// grid's y limit, nor parts smaller than min_per_part).
struct Parts {
  int64_t parts, per_part;
};
Parts plan_parts(int64_t work, int64_t min_per_part, int64_t other_blocks, int sms) {
  int64_t parts = std::max<int64_t>(1, (static_cast<int64_t>(sms) * 4) / std::max<int64_t>(1, other_blocks));
  parts = std::min<int64_t>(parts, std::max<int64_t>(1, (work + min_per_part - 1) / min_per_part));
  parts = std::min<int64_t>(parts, 65535);
  const int64_t per = std::max<int64_t>(1, (work + parts - 1) / parts);
  return Parts{std::max<int64_t>(1, (work + per - 1) / per), per};
}

// ---------------------------------------------------------------------------------------------
// channel_stats
// ---------------------------------------------------------------------------------------------
// channels_last_3d: x is (M rows, C) row-major. Block (32, 8), grid (ceil(C/32), parts).
template <typename scalar_t>
__global__ void stats_partial_cl_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C, int64_t rows_per_part,
                                        int64_t P, double* __restrict__ part) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTX + threadIdx.x;
  const int64_t p = blockIdx.y;
  const int64_t r1 = imin(M, (p + 1) * rows_per_part);
  ShiftedMoments acc;
  if (c < C) {
    for (int64_t r = p * rows_per_part + threadIdx.y; r < r1; r += kTY) acc.add(to_f(x[r * C + c]));
  }
  __shared__ double s_n[kTY][kTX], s_mean[kTY][kTX], s_m2[kTY][kTX];
  acc.summary(s_n[threadIdx.y][threadIdx.x], s_mean[threadIdx.y][threadIdx.x], s_m2[threadIdx.y][threadIdx.x]);
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int k = 0; k < kTY; ++k) welford_merge(n, mean, m2, s_n[k][threadIdx.x], s_mean[k][threadIdx.x], s_m2[k][threadIdx.x]);
    part[(0 * P + p) * C + c] = n;
    part[(1 * P + p) * C + c] = mean;
    part[(2 * P + p) * C + c] = m2;
  }
}

// Fixed-order tree merge of kThreads (count, mean, M2) triples in shared memory; thread 0 ends
// with the block's summary.
__device__ __forceinline__ void block_merge(double* s_n, double* s_mean, double* s_m2) {
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (static_cast<int>(threadIdx.x) < width) {
      double n = s_n[threadIdx.x], mean = s_mean[threadIdx.x], m2 = s_m2[threadIdx.x];
      welford_merge(n, mean, m2, s_n[threadIdx.x + width], s_mean[threadIdx.x + width], s_m2[threadIdx.x + width]);
      s_n[threadIdx.x] = n;
      s_mean[threadIdx.x] = mean;
      s_m2[threadIdx.x] = m2;
    }
    __syncthreads();
  }
}

// contiguous: channel c is N planes of S = H*W*D contiguous values. Block 256, grid (C, parts) over
// the flattened (n, s) range of the channel.
template <typename scalar_t>
__global__ void stats_partial_nc_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t S,
                                        int64_t per_part, int64_t P, double* __restrict__ part) {
  const int64_t c = blockIdx.x;
  const int64_t p = blockIdx.y;
  const int64_t k1 = imin(N * S, (p + 1) * per_part);
  ShiftedMoments acc;
  int64_t k = p * per_part + threadIdx.x;
  int64_t n = k / S, s = k % S;
  for (; k < k1; k += kThreads) {
    acc.add(to_f(x[(n * C + c) * S + s]));
    s += kThreads;
    if (s >= S) {
      n += s / S;
      s %= S;
    }
  }
  __shared__ double s_n[kThreads], s_mean[kThreads], s_m2[kThreads];
  acc.summary(s_n[threadIdx.x], s_mean[threadIdx.x], s_m2[threadIdx.x]);
  __syncthreads();
  block_merge(s_n, s_mean, s_m2);
  if (threadIdx.x == 0) {
    part[(0 * P + p) * C + c] = s_n[0];
    part[(1 * P + p) * C + c] = s_mean[0];
    part[(2 * P + p) * C + c] = s_m2[0];
  }
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "channel_stats";
  check_input(op, "x", x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), S = x_in.size(2) * x_in.size(3) * x_in.size(4);
  TORCH_CHECK(N * S > 0, "ahnet_fast_cuda::", op, ": statistics over an empty (N, H, W, D) are undefined; x has shape ",
              x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor mean = at::empty({C}, x_in.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x_in.options().dtype(at::kFloat));
  if (C == 0) return {mean, var};
  const bool cl = use_channels_last(x_in);
  const at::Tensor x = dense(x_in, cl);
  const int sms = sm_count(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Parts plan{};
  if (cl) {
    const int64_t cblocks = (C + kTX - 1) / kTX;
    plan = plan_parts(N * S, 4 * kTY, cblocks, sms);
  } else {
    plan = plan_parts(N * S, 4 * kThreads, C, sms);
  }
  at::Tensor part = at::empty({3, plan.parts, C}, x.options().dtype(at::kDouble));
  AHF_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    if (cl) {
      const dim3 grid(static_cast<unsigned int>((C + kTX - 1) / kTX), static_cast<unsigned int>(plan.parts));
      stats_partial_cl_kernel<scalar_t><<<grid, dim3(kTX, kTY), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), N * S, C, plan.per_part, plan.parts, part.mutable_data_ptr<double>());
    } else {
      TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "ahnet_fast_cuda::", op, ": too many channels (", C, ")");
      const dim3 grid(static_cast<unsigned int>(C), static_cast<unsigned int>(plan.parts));
      stats_partial_nc_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), N, C, S, plan.per_part, plan.parts, part.mutable_data_ptr<double>());
    }
  });
  AHF_CHECK_LAUNCH(op, "x=", describe(x_in), " (partials)");
  stats_finalize_kernel<<<static_cast<unsigned int>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      part.const_data_ptr<double>(), plan.parts, C, mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
  AHF_CHECK_LAUNCH(op, "x=", describe(x_in), " (merge)");
  return {mean, var};
}

// ---------------------------------------------------------------------------------------------
// bn_act_apply
// ---------------------------------------------------------------------------------------------
// One thread per output element of the [outer][Do][inner] view; the output row stride `out_row`
// lets a channels-last output be a channel slice of a wider buffer (out_row = its channel count).
template <typename scalar_t, typename idx_t, bool POOL>
__global__ void bn_apply_kernel(const scalar_t* __restrict__ y, const float* __restrict__ scale,
                                const float* __restrict__ shift, const scalar_t* __restrict__ res,
                                scalar_t* __restrict__ out, idx_t total, idx_t D, idx_t Do, idx_t inner, idx_t HW,
                                idx_t C, int64_t out_row, bool channels_last, bool relu) {
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t e = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const idx_t i = e % inner;
    const idx_t t = e / inner;
    const idx_t j = t % Do;
    const idx_t o = t / Do;
    const idx_t c = channels_last ? i : (o / HW) % C;
    const float s = scale[c], b = shift[c];
    float v;
    if (POOL) {
      const int64_t ya = (static_cast<int64_t>(o) * D + 2 * static_cast<int64_t>(j)) * inner + i;
      const float t0 = fmaf(to_f(y[ya]), s, b);
      const float t1 = fmaf(to_f(y[ya + inner]), s, b);
      v = pick_second(t0, t1) ? t1 : t0;
    } else {
      v = fmaf(to_f(y[e]), s, b);  // Do == D: the element's own offset
    }
    if (res != nullptr) v += to_f(res[e]);
    if (relu) v = relu_f(v);
    out[(static_cast<int64_t>(o) * Do + j) * out_row + i] = from_f<scalar_t>(v);
  }
}

template <typename scalar_t, typename idx_t>
void launch_apply(bool pool, unsigned int blocks, cudaStream_t stream, const scalar_t* y, const float* scale,
                  const float* shift, const scalar_t* res, scalar_t* out, int64_t total, const ZView& v, int64_t Do,
                  int64_t out_row, bool relu) {
  const auto cast = [](int64_t value) { return static_cast<idx_t>(value); };
  if (pool) {
    bn_apply_kernel<scalar_t, idx_t, true><<<blocks, kThreads, 0, stream>>>(
        y, scale, shift, res, out, cast(total), cast(v.D), cast(Do), cast(v.inner), cast(v.HW), cast(v.C), out_row,
        v.channels_last, relu);
  } else {
    bn_apply_kernel<scalar_t, idx_t, false><<<blocks, kThreads, 0, stream>>>(
        y, scale, shift, res, out, cast(total), cast(v.D), cast(Do), cast(v.inner), cast(v.HW), cast(v.C), out_row,
        v.channels_last, relu);
  }
}

// Writes into `dst`, which is dense in the layout `cl`, or a channels-last channel slice whose rows
// are `out_row` apart.
void bn_act_apply_into(const char* op, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       bool pool, const at::Tensor& res, bool relu, bool cl, const at::Tensor& dst, int64_t out_row) {
  const ZView v = zview(y, cl);
  const int64_t Do = pool ? v.D / 2 : v.D;
  const int64_t total = v.outer * Do * v.inner;
  if (total == 0) return;
  const unsigned int blocks = grid_for(total, kThreads, y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AHF_DISPATCH_FLOATING(y.scalar_type(), "bn_act_apply", [&] {
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = static_cast<scalar_t*>(dst.data_ptr());
    if (fits_uint32(y.numel())) {
      launch_apply<scalar_t, uint32_t>(pool, blocks, stream, y.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(),
                                       shift.const_data_ptr<float>(), rp, out_ptr, total, v, Do, out_row, relu);
    } else {
      launch_apply<scalar_t, int64_t>(pool, blocks, stream, y.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(),
                                      shift.const_data_ptr<float>(), rp, out_ptr, total, v, Do, out_row, relu);
    }
  });
  AHF_CHECK_LAUNCH(op, "y=", describe(y), ", zpool=", pool ? "after_affine" : "none", ", residual=", describe(res),
                   ", out=", describe(dst));
}

struct ApplyInputs {
  at::Tensor y, scale, shift, res;
  bool pool, cl;
  std::vector<int64_t> out_shape;
};

ApplyInputs prepare_apply(const char* op, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                          c10::string_view zpool, const std::optional<at::Tensor>& residual) {
  check_input(op, "y", y_in);
  ApplyInputs a;
  a.pool = parse_zpool(op, zpool);
  if (a.pool) {
    TORCH_CHECK(y_in.size(4) >= 2, "ahnet_fast_cuda::", op, ": zpool=\"after_affine\" needs depth D >= 2, got y ",
                y_in.sizes());
  }
  a.cl = use_channels_last(y_in);
  a.y = dense(y_in, a.cl);
  a.scale = channel_vector(op, "scale", scale, y_in);
  a.shift = channel_vector(op, "shift", shift, y_in);
  a.out_shape = {y_in.size(0), y_in.size(1), y_in.size(2), y_in.size(3), a.pool ? y_in.size(4) / 2 : y_in.size(4)};
  if (residual.has_value() && residual->defined()) {
    check_same(op, "residual", *residual, y_in, "y", a.out_shape);
    a.res = dense(*residual, a.cl);
  }
  return a;
}

at::Tensor bn_act_apply_cuda(const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                             c10::string_view zpool, const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "bn_act_apply";
  const c10::cuda::CUDAGuard guard(y_in.device());
  const ApplyInputs a = prepare_apply(op, y_in, scale, shift, zpool, residual);
  at::Tensor out = at::empty(a.out_shape, a.y.options().memory_format(memory_format(a.cl)));
  bn_act_apply_into(op, a.y, a.scale, a.shift, a.pool, a.res, relu, a.cl, out, a.cl ? a.y.size(1) : 1);
  return out;
}

// The row stride of `out` if it is a channels-last tensor whose rows (one per (n, h, w, d)) are
// evenly spaced with channels contiguous, e.g. out[:, a:b] of a channels_last_3d buffer; else -1.
int64_t channels_last_row_stride(const at::Tensor& out) {
  if (out.stride(1) != 1 && out.size(1) > 1) return -1;
  const int64_t R = out.stride(4);
  if (R < out.size(1)) return -1;
  const int64_t expect_w = out.size(4) * R, expect_h = out.size(3) * expect_w, expect_n = out.size(2) * expect_h;
  const bool ok = (out.size(3) == 1 || out.stride(3) == expect_w) && (out.size(2) == 1 || out.stride(2) == expect_h) &&
                  (out.size(0) == 1 || out.stride(0) == expect_n);
  return ok ? R : -1;
}

void bn_act_apply_out_cuda(const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                           c10::string_view zpool, const std::optional<at::Tensor>& residual, bool relu,
                           const at::Tensor& out) {
  constexpr const char* op = "bn_act_apply_out";
  const c10::cuda::CUDAGuard guard(y_in.device());
  const ApplyInputs a = prepare_apply(op, y_in, scale, shift, zpool, residual);
  TORCH_CHECK(out.defined(), "ahnet_fast_cuda::", op, ": out is undefined");
  check_same(op, "out", out, y_in, "y", a.out_shape);
  if (out.numel() == 0) return;
  if (a.cl) {
    const int64_t R = channels_last_row_stride(out);
    if (R > 0) {
      bn_act_apply_into(op, a.y, a.scale, a.shift, a.pool, a.res, relu, true, out, R);
      return;
    }
  } else if (out.is_contiguous()) {
    bn_act_apply_into(op, a.y, a.scale, a.shift, a.pool, a.res, relu, false, out, 1);
    return;
  }
  // out is in another layout than y (or oddly strided): compute densely, then one copy
  at::Tensor tmp = at::empty(a.out_shape, a.y.options().memory_format(memory_format(a.cl)));
  bn_act_apply_into(op, a.y, a.scale, a.shift, a.pool, a.res, relu, a.cl, tmp, a.cl ? a.y.size(1) : 1);
  out.copy_(tmp);
}

// ---------------------------------------------------------------------------------------------
// bn_act_backward
// ---------------------------------------------------------------------------------------------
// Forward being differentiated, per channel c (scale = gamma*invstd, shift = beta - mean*scale):
//   t = y*scale + shift;  p = pool(t);  s = p (+ residual);  o = relu(s)
template <typename scalar_t>
struct BwdArgs {
  const scalar_t* __restrict__ go;   // grad of o, pooled shape
  const scalar_t* __restrict__ y;    // BN input
  const scalar_t* __restrict__ out;  // forward output o (pooled shape) or nullptr
  const float* __restrict__ mean;
  const float* __restrict__ invstd;
  const float* __restrict__ gamma;  // nullptr: ones
  const float* __restrict__ beta;   // nullptr: zeros (only used for the ReLU mask without `out`, and ties)
  int64_t D, Do, inner, HW, C;
  bool pool, relu, channels_last;
};

struct ChannelAffine {
  float mean, invstd, scale, shift;
};

template <typename scalar_t>
__device__ __forceinline__ ChannelAffine channel_affine(const BwdArgs<scalar_t>& a, int64_t c) {
  ChannelAffine ch;
  ch.mean = a.mean[c];
  ch.invstd = a.invstd[c];
  // rounded exactly like torch's fp32 `scale = gamma * invstd; shift = beta - mean * scale` (no FMA
  // contraction), so the recomputed pair maxima agree with the forward's even at near-ties
  ch.scale = a.gamma != nullptr ? __fmul_rn(a.gamma[c], ch.invstd) : ch.invstd;
  const float ms = __fmul_rn(ch.mean, ch.scale);
  ch.shift = a.beta != nullptr ? __fsub_rn(a.beta[c], ms) : -ms;
  return ch;
}

// g_t (the gradient reaching t) at the y element (o, d, i). `sel` is the offset of the pooled
// output element this y element feeds (-1 if it feeds none: the losing element of a pair or an
// odd tail slice); g_t is 0 then.
template <typename scalar_t>
__device__ __forceinline__ float grad_t(const BwdArgs<scalar_t>& a, int64_t o, int64_t d, int64_t i, float yv,
                                        const ChannelAffine& ch, int64_t& sel) {
  sel = -1;
  const float ts = fmaf(yv, ch.scale, ch.shift);
  int64_t off;
  if (!a.pool) {
    off = (o * a.D + d) * a.inner + i;
  } else {
    const int64_t j = d >> 1;
    if (j >= a.Do) return 0.f;
    const bool odd = (d & 1) != 0;
    const float yp = to_f(a.y[(o * a.D + (odd ? d - 1 : d + 1)) * a.inner + i]);
    const float tp = fmaf(yp, ch.scale, ch.shift);
    const bool second = odd ? pick_second(tp, ts) : pick_second(ts, tp);
    if (second != odd) return 0.f;
    off = (o * a.Do + j) * a.inner + i;
  }
  sel = off;
  float g = to_f(a.go[off]);
  if (a.relu) {
    // mask from the forward output when given; else from t itself (valid with no pool/residual,
    // and for the pooled winner t is the pooled value)
    const bool pass = a.out != nullptr ? relu_pass(to_f(a.out[off])) : relu_pass(ts);
    if (!pass) g = 0.f;
  }
  return g;
}

// Pass 1, channels_last_3d: per-channel partial sums of g_t and g_t*xhat over rows of y.
template <typename scalar_t>
__global__ void bn_bwd_reduce_cl_kernel(BwdArgs<scalar_t> a, int64_t M, int64_t rows_per_part, int64_t P,
                                        double* __restrict__ part) {
  const int64_t C = a.C;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTX + threadIdx.x;
  const int64_t p = blockIdx.y;
  double sg = 0.0, sgx = 0.0;
  if (c < C) {
    const ChannelAffine ch = channel_affine(a, c);
    const int64_t r1 = imin(M, (p + 1) * rows_per_part);
    int64_t r = p * rows_per_part + threadIdx.y;
    int64_t o = r / a.D, d = r % a.D;
    for (; r < r1; r += kTY) {
      const float yv = to_f(a.y[r * C + c]);
      int64_t sel;
      const float g = grad_t(a, o, d, c, yv, ch, sel);
      sg += g;
      sgx += static_cast<double>(g) * ((yv - ch.mean) * ch.invstd);
      d += kTY;
      if (d >= a.D) {
        o += d / a.D;
        d %= a.D;
      }
    }
  }
  __shared__ double s_g[kTY][kTX], s_gx[kTY][kTX];
  s_g[threadIdx.y][threadIdx.x] = sg;
  s_gx[threadIdx.y][threadIdx.x] = sgx;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double tg = 0.0, tgx = 0.0;
    for (int k = 0; k < kTY; ++k) {
      tg += s_g[k][threadIdx.x];
      tgx += s_gx[k][threadIdx.x];
    }
    part[p * C + c] = tg;
    part[(P + p) * C + c] = tgx;
  }
}

// Pass 1, contiguous: block = one channel, a range of its flattened (n, hw, d) elements.
template <typename scalar_t>
__global__ void bn_bwd_reduce_nc_kernel(BwdArgs<scalar_t> a, int64_t N, int64_t per_part, int64_t P,
                                        double* __restrict__ part) {
  const int64_t C = a.C, D = a.D, HW = a.HW;
  const int64_t c = blockIdx.x;
  const int64_t p = blockIdx.y;
  const ChannelAffine ch = channel_affine(a, c);
  const int64_t S = HW * D;
  const int64_t k1 = imin(N * S, (p + 1) * per_part);
  int64_t k = p * per_part + threadIdx.x;
  int64_t n = k / S, hw = (k % S) / D, d = k % D;
  double sg = 0.0, sgx = 0.0;
  for (; k < k1; k += kThreads) {
    const int64_t o = (n * C + c) * HW + hw;
    const float yv = to_f(a.y[o * D + d]);
    int64_t sel;
    const float g = grad_t(a, o, d, 0, yv, ch, sel);
    sg += g;
    sgx += static_cast<double>(g) * ((yv - ch.mean) * ch.invstd);
    d += kThreads;
    if (d >= D) {
      hw += d / D;
      d %= D;
      if (hw >= HW) {
        n += hw / HW;
        hw %= HW;
      }
    }
  }
  __shared__ double s_g[kThreads], s_gx[kThreads];
  s_g[threadIdx.x] = sg;
  s_gx[threadIdx.x] = sgx;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (static_cast<int>(threadIdx.x) < width) {
      s_g[threadIdx.x] += s_g[threadIdx.x + width];
      s_gx[threadIdx.x] += s_gx[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part[p * C + c] = s_g[0];
    part[(P + p) * C + c] = s_gx[0];
  }
}

// Merge of the partial sums; coef = (sum g / M, sum g*xhat / M) for pass 2.
__global__ void bn_bwd_finalize_kernel(const double* __restrict__ part, int64_t P, int64_t C, double inv_m,
                                       float* __restrict__ grad_beta, float* __restrict__ grad_gamma,
                                       float* __restrict__ coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0.0, sgx = 0.0;
  for (int64_t p = 0; p < P; ++p) {
    sg += part[p * C + c];
    sgx += part[(P + p) * C + c];
  }
  grad_beta[c] = static_cast<float>(sg);
  grad_gamma[c] = static_cast<float>(sgx);
  coef[c] = static_cast<float>(sg * inv_m);
  coef[C + c] = static_cast<float>(sgx * inv_m);
}

// Pass 2: one thread per y element. grad_y = scale*(g - mean(g) - xhat*mean(g*xhat)) with batch
// statistics, scale*g without; grad_residual[sel] = g (masked grad_out) from the element that
// feeds each pooled output.
template <typename scalar_t, typename idx_t>
__global__ void bn_bwd_apply_kernel(BwdArgs<scalar_t> a, const float* __restrict__ coef, scalar_t* __restrict__ grad_y,
                                    scalar_t* __restrict__ grad_res, idx_t total, bool batch_stats) {
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  const idx_t inner = static_cast<idx_t>(a.inner), D = static_cast<idx_t>(a.D);
  for (idx_t e = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const idx_t i = e % inner;
    const idx_t t = e / inner;
    const idx_t d = t % D;
    const idx_t o = t / D;
    const int64_t c = a.channels_last ? static_cast<int64_t>(i) : (static_cast<int64_t>(o) / a.HW) % a.C;
    const ChannelAffine ch = channel_affine(a, c);
    const float yv = to_f(a.y[e]);
    int64_t sel;
    const float g = grad_t(a, o, d, i, yv, ch, sel);
    float gy;
    if (batch_stats) {
      const float xhat = (yv - ch.mean) * ch.invstd;
      gy = ch.scale * (g - coef[c] - xhat * coef[a.C + c]);
    } else {
      gy = ch.scale * g;
    }
    grad_y[e] = from_f<scalar_t>(gy);
    if (grad_res != nullptr && sel >= 0) grad_res[sel] = from_f<scalar_t>(g);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const std::optional<at::Tensor>& gamma_in, const std::optional<at::Tensor>& beta_in,
    const std::optional<at::Tensor>& out_in, c10::string_view zpool, bool relu, bool batch_stats, bool residual_grad) {
  constexpr const char* op = "bn_act_backward";
  check_input(op, "y", y_in);
  check_input(op, "grad_out", grad_out_in);
  const bool pool = parse_zpool(op, zpool);
  const int64_t N = y_in.size(0), C = y_in.size(1), H = y_in.size(2), W = y_in.size(3), D = y_in.size(4);
  if (pool) {
    TORCH_CHECK(D >= 2, "ahnet_fast_cuda::", op, ": zpool=\"after_affine\" needs depth D >= 2, got y ", y_in.sizes());
  }
  const int64_t Do = pool ? D / 2 : D;
  const std::vector<int64_t> oshape{N, C, H, W, Do};
  check_same(op, "grad_out", grad_out_in, y_in, "y", oshape);
  const bool has_out = out_in.has_value() && out_in->defined();
  if (has_out) check_same(op, "out", *out_in, y_in, "y", oshape);
  const bool has_gamma = gamma_in.has_value() && gamma_in->defined();
  const bool has_beta = beta_in.has_value() && beta_in->defined();
  if (relu && !has_out) {
    TORCH_CHECK(!pool && !residual_grad, "ahnet_fast_cuda::", op, ": pass `out` (the forward output) for the ReLU mask "
                "when zpool or a residual is used; t > 0 is only equivalent without them");
    TORCH_CHECK(has_beta, "ahnet_fast_cuda::", op, ": relu=True without `out` recomputes t > 0 and needs `beta`");
  }
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor mean = channel_vector(op, "mean", mean_in, y_in);
  const at::Tensor invstd = channel_vector(op, "invstd", invstd_in, y_in);
  const at::Tensor gamma = has_gamma ? channel_vector(op, "gamma", *gamma_in, y_in) : at::Tensor();
  const at::Tensor beta = has_beta ? channel_vector(op, "beta", *beta_in, y_in) : at::Tensor();
  const bool cl = use_channels_last(y_in);
  const at::Tensor y = dense(y_in, cl);
  const at::Tensor go = dense(grad_out_in, cl);
  const at::Tensor out = has_out ? dense(*out_in, cl) : at::Tensor();
  const auto fmt = memory_format(cl);
  at::Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(fmt));
  at::Tensor grad_res = residual_grad ? at::empty(oshape, go.options().memory_format(fmt)) : at::Tensor();
  at::Tensor grad_beta = at::empty({C}, y.options().dtype(at::kFloat));
  at::Tensor grad_gamma = at::empty({C}, y.options().dtype(at::kFloat));
  const int64_t M = N * H * W * D;
  if (M == 0 || C == 0) {
    grad_beta.zero_();
    grad_gamma.zero_();
    if (grad_res.defined()) grad_res.zero_();
    return {grad_y, has_gamma ? grad_gamma : at::Tensor(), grad_beta, grad_res};
  }
  const ZView v = zview(y, cl);
  const int sms = sm_count(y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Parts plan{};
  if (cl) {
    plan = plan_parts(M, 4 * kTY, (C + kTX - 1) / kTX, sms);
  } else {
    TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "ahnet_fast_cuda::", op, ": too many channels (", C, ")");
    plan = plan_parts(M, 4 * kThreads, C, sms);
  }
  at::Tensor part = at::empty({2, plan.parts, C}, y.options().dtype(at::kDouble));
  at::Tensor coef = at::empty({2, C}, y.options().dtype(at::kFloat));
  AHF_DISPATCH_FLOATING(y.scalar_type(), op, [&] {
    BwdArgs<scalar_t> args{go.const_data_ptr<scalar_t>(),
                           y.const_data_ptr<scalar_t>(),
                           has_out ? out.const_data_ptr<scalar_t>() : nullptr,
                           mean.const_data_ptr<float>(),
                           invstd.const_data_ptr<float>(),
                           has_gamma ? gamma.const_data_ptr<float>() : nullptr,
                           has_beta ? beta.const_data_ptr<float>() : nullptr,
                           v.D, Do, v.inner, v.HW, v.C, pool, relu, cl};
    if (cl) {
      const dim3 grid(static_cast<unsigned int>((C + kTX - 1) / kTX), static_cast<unsigned int>(plan.parts));
      bn_bwd_reduce_cl_kernel<scalar_t><<<grid, dim3(kTX, kTY), 0, stream>>>(args, M, plan.per_part, plan.parts,
                                                                             part.mutable_data_ptr<double>());
    } else {
      const dim3 grid(static_cast<unsigned int>(C), static_cast<unsigned int>(plan.parts));
      bn_bwd_reduce_nc_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args, N, plan.per_part, plan.parts,
                                                                       part.mutable_data_ptr<double>());
    }
    AHF_CHECK_LAUNCH(op, "grad_out=", describe(grad_out_in), ", y=", describe(y_in), " (reduce)");
    bn_bwd_finalize_kernel<<<static_cast<unsigned int>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        part.const_data_ptr<double>(), plan.parts, C, 1.0 / static_cast<double>(M), grad_beta.mutable_data_ptr<float>(),
        grad_gamma.mutable_data_ptr<float>(), coef.mutable_data_ptr<float>());
    AHF_CHECK_LAUNCH(op, "grad_out=", describe(grad_out_in), ", y=", describe(y_in), " (merge)");
    const int64_t total = y.numel();
    const unsigned int blocks = grid_for(total, kThreads, y);
    scalar_t* gr = grad_res.defined() ? grad_res.mutable_data_ptr<scalar_t>() : nullptr;
    if (fits_uint32(total)) {
      bn_bwd_apply_kernel<scalar_t, uint32_t><<<blocks, kThreads, 0, stream>>>(
          args, coef.const_data_ptr<float>(), grad_y.mutable_data_ptr<scalar_t>(), gr, static_cast<uint32_t>(total),
          batch_stats);
    } else {
      bn_bwd_apply_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
          args, coef.const_data_ptr<float>(), grad_y.mutable_data_ptr<scalar_t>(), gr, total, batch_stats);
    }
    AHF_CHECK_LAUNCH(op, "grad_out=", describe(grad_out_in), ", y=", describe(y_in), " (apply)");
  });
  return {grad_y, has_gamma ? grad_gamma : at::Tensor(), grad_beta, grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast_cuda, CUDA, m) {
  m.impl("channel_stats", &channel_stats_cuda);
  m.impl("bn_act_apply", &bn_act_apply_cuda);
  m.impl("bn_act_apply_out", &bn_act_apply_out_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
}

}  // namespace ahnet_fast_cuda
