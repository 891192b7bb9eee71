// Shared helpers for the ahnet_fast CUDA kernels (csrc/cuda/*.cu).
//
// Only c10/cuda and ATen core headers are used (not ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers): the sources then compile wherever nvcc and a CUDA build of
// torch's headers exist, and CI can prove that on a machine without a GPU.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

namespace ahnet_fast_cuda {

// ---------------------------------------------------------------------------------------------
// host side: checks and messages
// ---------------------------------------------------------------------------------------------
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "None";
  std::ostringstream os;
  os << t.sizes() << " " << c10::toString(t.scalar_type());
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !t.is_contiguous()) {
    os << " channels_last_3d";
  } else if (!t.is_contiguous()) {
    os << " strides=" << t.strides();
  }
  return os.str();
}

// Every launch is followed by this: a failed launch (bad configuration, no kernel image for the
// device's architecture, a sticky error from earlier) becomes a Python RuntimeError naming the op
// and the shapes it was called with. The message arguments are only evaluated on failure.
#define AHF_CHECK_LAUNCH(OPNAME, ...)                                                             \
  do {                                                                                            \
    const cudaError_t ahf_err_ = cudaGetLastError();                                              \
    TORCH_CHECK(ahf_err_ == cudaSuccess, "ahnet_fast_cuda::", OPNAME, ": CUDA kernel launch failed (", \
                cudaGetErrorString(ahf_err_), ") for ", __VA_ARGS__);                              \
  } while (0)

inline void check_input(const char* op, const char* name, const at::Tensor& t, int64_t dim = 5) {
  TORCH_CHECK(t.defined(), "ahnet_fast_cuda::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "ahnet_fast_cuda::", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, "ahnet_fast_cuda::", op, ": ", name, " must have ", dim,
              " dims (N, C, H, W, D), got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "ahnet_fast_cuda::", op, ": ", name,
              " has dtype ", c10::toString(st), "; accepted: float32, bfloat16, float16");
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name, at::IntArrayRef expected_shape) {
  TORCH_CHECK(t.device() == ref.device(), "ahnet_fast_cuda::", op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ahnet_fast_cuda::", op, ": ", name, " has dtype ",
              c10::toString(t.scalar_type()), " but ", ref_name, " has ", c10::toString(ref.scalar_type()));
  TORCH_CHECK(t.sizes() == expected_shape, "ahnet_fast_cuda::", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", expected_shape);
}

// A per-channel fp32 vector (scale, shift, mean, invstd, gamma, beta) of length C on x's device.
inline at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(v.defined(), "ahnet_fast_cuda::", op, ": ", name, " is undefined");
  TORCH_CHECK(v.device() == x.device(), "ahnet_fast_cuda::", op, ": ", name, " is on ", v.device(),
              " but the input is on ", x.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, "ahnet_fast_cuda::", op, ": ", name, " must have shape (", C,
              ",) (one value per channel), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat, "ahnet_fast_cuda::", op, ": ", name,
              " must be float32 (BN math is fp32), got ", c10::toString(v.scalar_type()));
  return v.contiguous();
}

// zpool argument of the schemas: "none" or "after_affine".
inline bool parse_zpool(const char* op, c10::string_view zpool) {
  const std::string z(zpool.data(), zpool.size());
  if (z == "none") return false;
  if (z == "after_affine") return true;
  TORCH_CHECK(false, "ahnet_fast_cuda::", op, ": zpool=\"", z, "\" is not accepted; use \"none\" or \"after_affine\"");
  return false;
}

// The kernels read dense tensors in one of two layouts. A tensor is brought into the layout torch
// suggests for it (a no-op for the usual channels_last_3d or contiguous inputs).
inline bool use_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast3d;
}
inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}
inline at::Tensor dense(const at::Tensor& t, bool channels_last) {
  return t.contiguous(memory_format(channels_last));
}

// The kernels see a dense (N, C, H, W, D) tensor as [outer][D][inner]:
//   channels_last_3d: offset = ((n*H + h)*W + w)*D + d)*C + c  -> outer = N*H*W, inner = C, c = i
//   contiguous:       offset = (((n*C + c)*H + h)*W + w)*D + d -> outer = N*C*H*W, inner = 1,
//                                                                 c = (o / (H*W)) % C
struct ZView {
  int64_t outer, D, inner, HW, C;
  bool channels_last;
};
inline ZView zview(const at::Tensor& x, bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), D = x.size(4);
  if (channels_last) return ZView{N * H * W, D, C, H * W, C, true};
  return ZView{N * C * H * W, D, 1, H * W, C, false};
}

inline int sm_count(const at::Tensor& x) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, x.get_device()) != cudaSuccess || value <= 0) {
    (void)cudaGetLastError();  // clear: a failed attribute query must not poison the next launch check
    return 1;
  }
  return value;
}

// Blocks for a grid-stride loop over `work` items: enough for a few waves, never more than needed.
inline unsigned int grid_for(int64_t work, int threads, const at::Tensor& x, int waves = 8) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count(x)) * waves;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

// 32-bit index arithmetic when every index fits (with room for the grid stride), else 64-bit.
inline bool fits_uint32(int64_t numel) { return numel <= std::numeric_limits<int32_t>::max(); }

#define AHF_DISPATCH_FLOATING(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

// ---------------------------------------------------------------------------------------------
// device side
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return static_cast<T>(v);
}

// torch's max_pool semantics for a pair (a = x[2j], b = x[2j+1]): b wins only if it is greater or
// NaN, so the first element wins ties and a NaN wins (the second if both are NaN).
__device__ __forceinline__ bool pick_second(float a, float b) { return (b > a) || isnan(b); }

// torch.relu keeps NaN (clamp_min propagates it): v < 0 is false for NaN.
__device__ __forceinline__ float relu_f(float v) { return v < 0.f ? 0.f : v; }

// torch's ReLU backward passes the gradient where NOT (output <= 0), so a NaN output passes it.
__device__ __forceinline__ bool relu_pass(float v) { return !(v <= 0.f); }

// Chan et al.'s merge of (count, mean, M2) partials: numerically stable, order fixed by the caller.
__device__ __forceinline__ void welford_merge(double& n, double& mean, double& m2, double nb, double mean_b,
                                              double m2_b) {
  if (nb == 0.0) return;
  if (n == 0.0) {
    n = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const double nn = n + nb;
  const double delta = mean_b - mean;
  mean += delta * (nb / nn);
  m2 += m2_b + delta * delta * (n * nb / nn);
  n = nn;
}


// Shifted float64 accumulator of one thread: exact enough for any count, one FMA pair per value.
struct ShiftedMoments {
  int64_t n = 0;
  double shift = 0.0, s1 = 0.0, s2 = 0.0;
  __device__ __forceinline__ void add(float v) {
    if (n == 0) shift = v;
    const double d = static_cast<double>(v) - shift;
    ++n;
    s1 += d;
    s2 += d * d;
  }
  // (count, mean, M2)
  __device__ __forceinline__ void summary(double& cnt, double& mean, double& m2) const {
    cnt = static_cast<double>(n);
    if (n == 0) {
      mean = 0.0;
      m2 = 0.0;
      return;
    }
    mean = shift + s1 / cnt;
    m2 = s2 - s1 * s1 / cnt;
    if (m2 < 0.0) m2 = 0.0;  // rounding of a (near) zero variance
  }
};

// Fixed-order merge of per-block (count, mean, M2) partials laid out [3][P][C]; one thread per
// channel. In an anonymous namespace: each translation unit gets its own copy of the kernel.
namespace {
__global__ void stats_finalize_kernel(const double* __restrict__ part, int64_t P, int64_t C, float* __restrict__ mean_out,
                                      float* __restrict__ var_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t p = 0; p < P; ++p) welford_merge(n, mean, m2, part[p * C + c], part[(P + p) * C + c], part[(2 * P + p) * C + c]);
  mean_out[c] = static_cast<float>(mean);
  var_out[c] = static_cast<float>(m2 / n);  // n > 0: checked on the host
}

}  // namespace

}  // namespace ahnet_fast_cuda
