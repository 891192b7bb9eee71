// z max-pool (kernel and stride (1,1,2)) without an index tensor: forward and backward.
//
// forward:  y[n,c,h,w,j] = x[n,c,h,w,2j] or x[...,2j+1], whichever torch's max_pool3d picks
//           (the first wins ties, NaN wins); D_out = D // 2 (floor, like nn.MaxPool3d((1,1,2))).
// backward: grad_x gets grad_y at the pair element the forward picked (recomputed from x, so no
//           indices are stored: 6 bytes per bf16 output moved instead of 14), 0 at the other one and
//           at an odd tail slice d = D-1.
#include <torch/library.h>

#include "common.cuh"

namespace ahnet_fast_cuda {
namespace {

constexpr int kThreads = 256;

// One thread per output element of the [outer][D/2][inner] view (see ZView).
template <typename scalar_t, typename idx_t>
__global__ void zmaxpool_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, idx_t total,
                                        idx_t D, idx_t Do, idx_t inner) {
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t e = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const idx_t i = e % inner;
    const idx_t t = e / inner;
    const idx_t j = t % Do;
    const idx_t o = t / Do;
    const int64_t xa = (static_cast<int64_t>(o) * D + 2 * static_cast<int64_t>(j)) * inner + i;
    const scalar_t a = x[xa];
    const scalar_t b = x[xa + inner];
    // compare in fp32 (exact for bf16/fp16), store the chosen original value bit-exactly
    y[e] = pick_second(to_f(a), to_f(b)) ? b : a;
  }
}

// One thread per z-pair (and per odd tail slice) of x: writes both elements of grad_x.
template <typename scalar_t, typename idx_t>
__global__ void zmaxpool_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                         scalar_t* __restrict__ gx, idx_t total, idx_t D, idx_t Do, idx_t Dh,
                                         idx_t inner) {
  const idx_t stride = static_cast<idx_t>(gridDim.x) * blockDim.x;
  const scalar_t zero = from_f<scalar_t>(0.f);
  for (idx_t e = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const idx_t i = e % inner;
    const idx_t t = e / inner;
    const idx_t j = t % Dh;
    const idx_t o = t / Dh;
    const int64_t xa = (static_cast<int64_t>(o) * D + 2 * static_cast<int64_t>(j)) * inner + i;
    if (j < Do) {
      const scalar_t g = gy[(static_cast<int64_t>(o) * Do + j) * inner + i];
      const bool second = pick_second(to_f(x[xa]), to_f(x[xa + inner]));
      gx[xa] = second ? zero : g;
      gx[xa + inner] = second ? g : zero;
    } else {
      gx[xa] = zero;  // odd tail slice: not part of any pooling window
    }
  }
}

void check_depth(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.size(4) >= 2, "ahnet_fast_cuda::", op, ": the z-pool needs depth D >= 2 (output depth D//2), got ",
              "input shape ", x.sizes());
}

at::Tensor zmaxpool_forward_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "zmaxpool_forward";
  check_input(op, "x", x_in);
  check_depth(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = use_channels_last(x_in);
  const at::Tensor x = dense(x_in, cl);
  const ZView v = zview(x, cl);
  const int64_t Do = v.D / 2;
  at::Tensor y = at::empty({x.size(0), x.size(1), x.size(2), x.size(3), Do}, x.options().memory_format(memory_format(cl)));
  const int64_t total = y.numel();
  if (total == 0) return y;
  const unsigned int blocks = grid_for(total, kThreads, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AHF_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    if (fits_uint32(x.numel())) {
      zmaxpool_forward_kernel<scalar_t, uint32_t><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), static_cast<uint32_t>(total),
          static_cast<uint32_t>(v.D), static_cast<uint32_t>(Do), static_cast<uint32_t>(v.inner));
    } else {
      zmaxpool_forward_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), total, v.D, Do, v.inner);
    }
  });
  AHF_CHECK_LAUNCH(op, "x=", describe(x_in));
  return y;
}

at::Tensor zmaxpool_backward_cuda(const at::Tensor& x_in, const at::Tensor& grad_y_in) {
  constexpr const char* op = "zmaxpool_backward";
  check_input(op, "x", x_in);
  check_depth(op, x_in);
  check_input(op, "grad_y", grad_y_in);
  const int64_t Do = x_in.size(4) / 2;
  check_same(op, "grad_y", grad_y_in, x_in, "x", {x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), Do});
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = use_channels_last(x_in);
  const at::Tensor x = dense(x_in, cl);
  const at::Tensor gy = dense(grad_y_in, cl);
  const ZView v = zview(x, cl);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(memory_format(cl)));
  const int64_t Dh = (v.D + 1) / 2;
  const int64_t total = v.outer * Dh * v.inner;
  if (total == 0) return gx;
  const unsigned int blocks = grid_for(total, kThreads, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AHF_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    if (fits_uint32(x.numel())) {
      zmaxpool_backward_kernel<scalar_t, uint32_t><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
          static_cast<uint32_t>(total), static_cast<uint32_t>(v.D), static_cast<uint32_t>(Do),
          static_cast<uint32_t>(Dh), static_cast<uint32_t>(v.inner));
    } else {
      zmaxpool_backward_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), total, v.D,
          Do, Dh, v.inner);
    }
  });
  AHF_CHECK_LAUNCH(op, "x=", describe(x_in), ", grad_y=", describe(grad_y_in));
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast_cuda, CUDA, m) {
  m.impl("zmaxpool_forward", &zmaxpool_forward_cuda);
  m.impl("zmaxpool_backward", &zmaxpool_backward_cuda);
}

}  // namespace ahnet_fast_cuda
