// conv3d_fused: implicit-GEMM 3D convolution with the BN+ReLU prologue and the fused epilogue of
// notes/OPS_CONTRACT.md (the same op as kernels/conv.py). Kernel design: conv_fused.cuh.
//
//   conv3d_fused(x, weight, stride, padding, bias?, in_scale?, in_shift?, in_relu, out_scale?,
//                out_shift?, zpool, residual?, relu, compute_stats) -> (y, mean, var)
//   conv3d_fused_out(..., Tensor(a!) out) -> (mean, var)        writes into `out` (any strides, e.g.
//                                                               a channel slice of a concat buffer)
// mean/var are float32 (Cout,) when compute_stats, else empty (0,) tensors.
//
// Host-side work per call: argument checks, the weight repacked to (taps, Cin_pad, Cout_pad)
// zero-filled (two small ops), one kernel launch, and with compute_stats the merge of the per-tile
// (count, mean, M2) partials in fp32 with torch ops (fixed shapes and order: deterministic).
//
// Two device paths: conv_fused_kernel (conv_fused.cuh: WMMA for bf16/fp16, FMA for fp32; sm_80 and
// newer) and, on Hopper, conv_wgmma_kernel (conv_wgmma.cuh: wgmma + TMA, bf16/fp16, x channels-last
// or Cin == 1), chosen per call by the process-wide policy set_conv_kernel_mode(): "wmma" (the
// default until the wgmma path has passed its GPU tests: ahnet_fast._cuda.WGMMA_VERIFIED_ON_GPU),
// "wgmma" (wherever the call and the device allow; an error on a device without the sm_90a image)
// or "auto" (wgmma wherever allowed, silently WMMA elsewhere).
// x, residual and out are read/written with their own strides: channels_last_3d, contiguous and
// channel slices of either need no copy. `out` must not overlap x or residual.
#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <array>
#include <atomic>
#include <mutex>

#include "common.cuh"
#include "conv_fused.cuh"
#include "conv_policy.h"
#include "conv_wgmma.cuh"

namespace ahnet_fast_cuda {

// ---- the process-wide kernel policy and launch counters (ahnet_fast._cuda reads and sets them)
namespace {
std::atomic<int> g_conv_kernel_mode{kConvKernelWmma};
std::atomic<int64_t> g_conv_launches[2] = {{0}, {0}};  // [0] conv_fused_kernel, [1] conv_wgmma_kernel

// Whether `device` runs the sm_90a image of this library (compute capability 9.0 and the driver
// loaded the image built for compute_90a, where conv_wgmma_kernel has a body): asked once per
// device with a one-thread probe kernel.
bool device_runs_sm90a(int device) {
  static std::mutex mu;
  static std::array<int, 64> known{};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= static_cast<int>(known.size())) return false;
  std::lock_guard<std::mutex> lock(mu);
  if (known[device] == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    bool yes = false;
    if (major == 9 && minor == 0) {
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
      int* flag = nullptr;
      C10_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
      conv::hopper::wgmma_probe_kernel<<<1, 1>>>(flag);
      int host = 0;
      const cudaError_t launched = cudaGetLastError();
      const cudaError_t copied = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost);
      C10_CUDA_CHECK(cudaFree(flag));
      C10_CUDA_CHECK(launched);
      C10_CUDA_CHECK(copied);
      yes = host == 1;
    }
    known[device] = yes ? 1 : 2;
  }
  return known[device] == 1;
}
}  // namespace

int conv_kernel_mode() { return g_conv_kernel_mode.load(); }
int set_conv_kernel_mode(int mode) {
  TORCH_CHECK(mode == kConvKernelWmma || mode == kConvKernelWgmma || mode == kConvKernelAuto,
              "ahnet_fast_cuda: conv kernel mode ", mode, " is not one of wmma/wgmma/auto");
  return g_conv_kernel_mode.exchange(mode);
}
bool wgmma_supported(int device) { return device_runs_sm90a(device); }
int64_t conv_launch_count(int kernel) { return g_conv_launches[kernel == 0 ? 0 : 1].load(); }

namespace {

using conv::ConvParams;

int parse_conv_zpool(const char* op, c10::string_view zpool) {
  const std::string z(zpool.data(), zpool.size());
  if (z == "none") return conv::kPoolNone;
  if (z == "before_affine") return conv::kPoolBeforeAffine;
  if (z == "after_affine") return conv::kPoolAfterAffine;
  TORCH_CHECK(false, "ahnet_fast_cuda::", op, ": zpool=\"", z,
              "\" is not accepted; use \"none\", \"before_affine\" or \"after_affine\"");
  return conv::kPoolNone;
}

// An optional fp32 per-channel vector of length `len` on x's device (contiguous), or undefined.
at::Tensor optional_vector(const char* op, const char* name, const std::optional<at::Tensor>& v, int64_t len,
                           const at::Tensor& x, bool allow_x_dtype = false) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  const at::Tensor& t = *v;
  TORCH_CHECK(t.device() == x.device(), "ahnet_fast_cuda::", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "ahnet_fast_cuda::", op, ": ", name, " must have shape (", len,
              ",) (one value per channel), got ", t.sizes());
  const bool ok = t.scalar_type() == at::kFloat || (allow_x_dtype && t.scalar_type() == x.scalar_type());
  TORCH_CHECK(ok, "ahnet_fast_cuda::", op, ": ", name, " must be float32", allow_x_dtype ? " or x's dtype" : "",
              ", got ", c10::toString(t.scalar_type()));
  return t.to(at::kFloat).contiguous();
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct ConvCall {
  // validated inputs
  at::Tensor x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual;
  int pool = conv::kPoolNone;
  bool in_relu = true, relu = false, stats = false;
  int64_t N = 0, Cin = 0, H = 0, W = 0, D = 0, Cout = 0, KH = 0, KW = 0, KD = 0;
  int64_t st[3] = {1, 1, 1}, pad[3] = {0, 0, 0};
  int64_t Ho = 0, Wo = 0, Do = 0, Dout = 0;
  std::vector<int64_t> out_shape;
};

std::string call_description(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                             at::IntArrayRef padding, c10::string_view zpool) {
  std::ostringstream os;
  os << "x=" << describe(x) << ", weight=" << describe(weight) << ", stride=" << stride << ", padding=" << padding
     << ", zpool=" << std::string(zpool.data(), zpool.size());
  return os.str();
}

ConvCall prepare(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                 at::IntArrayRef padding, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift, bool in_relu,
                 const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_shift,
                 c10::string_view zpool, const std::optional<at::Tensor>& residual, bool relu, bool compute_stats) {
  ConvCall c;
  check_input(op, "x", x);
  TORCH_CHECK(weight.defined() && weight.dim() == 5, "ahnet_fast_cuda::", op,
              ": weight must be a 5-D tensor (Cout, Cin, KH, KW, KD), got ", describe(weight));
  TORCH_CHECK(weight.device() == x.device(), "ahnet_fast_cuda::", op, ": weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "ahnet_fast_cuda::", op, ": weight dtype ",
              c10::toString(weight.scalar_type()), " must match x dtype ", c10::toString(x.scalar_type()));
  c.N = x.size(0), c.Cin = x.size(1), c.H = x.size(2), c.W = x.size(3), c.D = x.size(4);
  c.Cout = weight.size(0), c.KH = weight.size(2), c.KW = weight.size(3), c.KD = weight.size(4);
  TORCH_CHECK(weight.size(1) == c.Cin, "ahnet_fast_cuda::", op, ": weight expects ", weight.size(1),
              " input channels but x has ", c.Cin, " (groups are not supported)");
  TORCH_CHECK(c.Cin >= 1 && c.KH >= 1 && c.KW >= 1 && c.KD >= 1, "ahnet_fast_cuda::", op,
              ": need at least one input channel and a non-empty kernel, got x ", x.sizes(), ", weight ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3, "ahnet_fast_cuda::", op,
              ": stride and padding must have 3 entries, got stride=", stride, ", padding=", padding);
  for (int i = 0; i < 3; ++i) {
    c.st[i] = stride[i];
    c.pad[i] = padding[i];
    TORCH_CHECK(c.st[i] >= 1 && c.pad[i] >= 0, "ahnet_fast_cuda::", op,
                ": stride must be >= 1 and padding >= 0, got stride=", stride, ", padding=", padding);
  }
  c.Ho = (c.H + 2 * c.pad[0] - c.KH) / c.st[0] + 1;
  c.Wo = (c.W + 2 * c.pad[1] - c.KW) / c.st[1] + 1;
  c.Do = (c.D + 2 * c.pad[2] - c.KD) / c.st[2] + 1;
  TORCH_CHECK(c.H + 2 * c.pad[0] >= c.KH && c.W + 2 * c.pad[1] >= c.KW && c.D + 2 * c.pad[2] >= c.KD,
              "ahnet_fast_cuda::", op, ": input spatial size ", at::IntArrayRef({c.H, c.W, c.D}),
              " is too small for kernel ", at::IntArrayRef({c.KH, c.KW, c.KD}), " with padding ", padding);
  // the kernel keeps spatial coordinates and channel counts in 32-bit registers
  const int64_t i32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(c.N < i32 && c.H + 2 * c.pad[0] < i32 && c.W + 2 * c.pad[1] < i32 && c.D + 2 * c.pad[2] < i32 &&
                  c.Cout < i32 / 2 && c.Cin < i32 / 2 && c.KH * c.KW * c.KD * round_up(c.Cin, 32) < i32,
              "ahnet_fast_cuda::", op, ": sizes too large for this kernel: x ", x.sizes(), ", weight ", weight.sizes());

  c.pool = parse_conv_zpool(op, zpool);
  c.Dout = c.pool != conv::kPoolNone ? c.Do / 2 : c.Do;
  c.out_shape = {c.N, c.Cout, c.Ho, c.Wo, c.Dout};
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value() &&
                  (!in_scale.has_value() || in_scale->defined() == in_shift->defined()),
              "ahnet_fast_cuda::", op, ": in_scale and in_shift must be given together (prologue BN affine)");
  c.in_scale = optional_vector(op, "in_scale", in_scale, c.Cin, x);
  c.in_shift = optional_vector(op, "in_shift", in_shift, c.Cin, x);
  c.out_scale = optional_vector(op, "out_scale", out_scale, c.Cout, x);
  c.out_shift = optional_vector(op, "out_shift", out_shift, c.Cout, x);
  c.bias = optional_vector(op, "bias", bias, c.Cout, x, /*allow_x_dtype=*/true);
  TORCH_CHECK(!compute_stats || (!c.out_scale.defined() && !c.out_shift.defined() && c.pool != conv::kPoolAfterAffine),
              "ahnet_fast_cuda::", op, ": compute_stats=True needs out_scale/out_shift None and zpool in "
              "(\"none\", \"before_affine\"): the statistics are of the pre-affine value");
  if (residual.has_value() && residual->defined()) {
    check_input(op, "residual", *residual);
    check_same(op, "residual", *residual, x, "x", c.out_shape);
    c.residual = *residual;
  }
  c.x = x;
  c.weight = weight;
  c.in_relu = in_relu;
  c.relu = relu;
  c.stats = compute_stats;
  return c;
}

// One block per (M tile, N tile); the tile shape must be the one the caller sized the grid and the
// statistics partials with (conv::tile_shape<T>).
template <typename T>
void launch(const ConvParams& p, unsigned int blocks, cudaStream_t stream) {
  const conv::TileShape ts = conv::tile_shape<T>(p.Cout);
  const bool vec = conv::vector_loads_ok<T>(p);
  if (ts.BN == 32) {
    if (vec) {
      conv::conv_fused_kernel<T, 128, 32, true><<<blocks, conv::kThreads, 0, stream>>>(p);
    } else {
      conv::conv_fused_kernel<T, 128, 32, false><<<blocks, conv::kThreads, 0, stream>>>(p);
    }
  } else {
    if (vec) {
      conv::conv_fused_kernel<T, 64, 64, true><<<blocks, conv::kThreads, 0, stream>>>(p);
    } else {
      conv::conv_fused_kernel<T, 64, 64, false><<<blocks, conv::kThreads, 0, stream>>>(p);
    }
  }
}

// ---- sm_90 wgmma path (conv_wgmma.cuh)
using conv::hopper::WgSmem;

// Whether this call runs conv_wgmma_kernel under the current policy (an error when the policy is
// "wgmma" and the device cannot run it).
template <typename T>
bool use_wgmma(const char* op, const ConvCall& c) {
  const int mode = g_conv_kernel_mode.load();
  if (mode == kConvKernelWmma || std::is_same_v<T, float>) return false;
  const int device = c.x.get_device();
  if (!device_runs_sm90a(device)) {
    TORCH_CHECK(mode != kConvKernelWgmma, "ahnet_fast_cuda::", op, ": the conv kernel is set to \"wgmma\" but GPU ",
                device, " cannot run it (it needs compute capability 9.0 and a build for TORCH_CUDA_ARCH_LIST "
                "9.0a); use set_conv_kernel(\"wmma\") or \"auto\"");
    return false;
  }
  // the element-wise gather walks channels fastest: x channels-last, or one channel (any layout)
  const bool layout_ok = c.x.stride(1) == 1 || c.Cin == 1;
  const int64_t K = c.KH * c.KW * c.KD * c.Cin;
  const bool fits = K <= (int64_t{1} << 30) && c.KH < 256 && c.KW < 256 && c.KD < 256 &&
                    WgSmem<128>::bytes(static_cast<int>(c.Cin), true) <= 232448;
  return layout_ok && fits;
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                             &found);
    TORCH_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && ptr != nullptr,
                "ahnet_fast_cuda: the CUDA driver has no cuTensorMapEncodeTiled (", cudaGetErrorString(err),
                "); the sm_90 wgmma conv needs a CUDA 12+ driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

template <typename T, int BN>
void launch_wgmma_bn(const ConvParams& p, const at::Tensor& wp, unsigned int blocks, cudaStream_t stream) {
  // the packed weights (Cout_pad, k_pad), K contiguous, as a 2-D tensor map: box 64 x BN, 128-byte swizzle
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.k_pad), static_cast<cuuint64_t>(p.cout_pad)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.k_pad) * sizeof(T)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(conv::hopper::kBK), static_cast<cuuint32_t>(BN)};
  const cuuint32_t estrides[2] = {1, 1};
  const CUresult enc = tensor_map_encoder()(
      &map, std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
      const_cast<void*>(wp.const_data_ptr()), dims, strides, box, estrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(enc == CUDA_SUCCESS, "ahnet_fast_cuda::conv3d_fused: cuTensorMapEncodeTiled failed (CUresult ",
              static_cast<int>(enc), ") for packed weights ", p.cout_pad, " x ", p.k_pad);
  const size_t smem = WgSmem<BN>::bytes(p.Cin, p.in_scale != nullptr);
  const bool vec = conv::vector_loads_ok<T>(p);  // the same 16-byte rule as the WMMA kernel's gather
  auto kernel = vec ? conv::hopper::conv_wgmma_kernel<T, BN, true> : conv::hopper::conv_wgmma_kernel<T, BN, false>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<blocks, conv::kThreads, smem, stream>>>(p, map);
}

template <typename T>
void launch_wgmma(const ConvParams& p, const at::Tensor& wp, int BN, unsigned int blocks, cudaStream_t stream) {
  switch (BN) {
    case 8: return launch_wgmma_bn<T, 8>(p, wp, blocks, stream);
    case 24: return launch_wgmma_bn<T, 24>(p, wp, blocks, stream);
    case 64: return launch_wgmma_bn<T, 64>(p, wp, blocks, stream);
    case 80: return launch_wgmma_bn<T, 80>(p, wp, blocks, stream);
    default: return launch_wgmma_bn<T, 128>(p, wp, blocks, stream);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> run_typed(const char* op, const ConvCall& c, const at::Tensor& out,
                                             const std::string& what) {
  const bool wg = use_wgmma<T>(op, c);
  const conv::TileShape ts = wg ? conv::TileShape{conv::hopper::kBM, conv::hopper::wgmma_tile_n(static_cast<int>(c.Cout)),
                                                  conv::hopper::kBK}
                                : conv::tile_shape<T>(static_cast<int>(c.Cout));
  const int64_t taps = c.KH * c.KW * c.KD;
  const int64_t cin_pad = round_up(c.Cin, ts.BK), cout_pad = round_up(c.Cout, ts.BN);
  const int64_t K = taps * c.Cin, k_pad = round_up(K, conv::hopper::kBK);
  at::Tensor wp;
  if (wg) {
    // (Cout, Cin, KH, KW, KD) -> (Cout_pad, K_pad) with k = tap*Cin + ci, zero-filled: the TMA boxes
    // are always in bounds, and the padded rows/columns contribute exact zeros
    wp = at::zeros({cout_pad, k_pad}, c.weight.options().memory_format(at::MemoryFormat::Contiguous));
    wp.narrow(0, 0, c.Cout).narrow(1, 0, K).copy_(c.weight.permute({0, 2, 3, 4, 1}).reshape({c.Cout, K}));
  } else {
    // (Cout, Cin, KH, KW, KD) -> (taps, Cin_pad, Cout_pad), zero-filled: every B tile is in bounds
    // and 16-byte aligned, and the padded channels contribute exact zeros
    wp = at::zeros({taps, cin_pad, cout_pad}, c.weight.options().memory_format(at::MemoryFormat::Contiguous));
    wp.narrow(1, 0, c.Cin).narrow(2, 0, c.Cout).copy_(c.weight.permute({2, 3, 4, 1, 0}).reshape({taps, c.Cin, c.Cout}));
  }

  const bool pooled = c.pool != conv::kPoolNone;
  const int64_t Dc = pooled ? 2 * (c.Do / 2) : c.Do;
  const int64_t M = c.N * c.Ho * c.Wo * Dc;
  const int64_t m_tiles = (M + ts.BM - 1) / ts.BM;
  const int64_t n_tiles = (c.Cout + ts.BN - 1) / ts.BN;
  TORCH_CHECK(m_tiles * n_tiles <= std::numeric_limits<int32_t>::max(), "ahnet_fast_cuda::", op,
              ": too many output tiles (", m_tiles, " x ", n_tiles, ") for ", what);

  at::Tensor part_mean, part_m2;
  if (c.stats) {
    part_mean = at::empty({m_tiles, c.Cout}, c.x.options().dtype(at::kFloat));
    part_m2 = at::empty({m_tiles, c.Cout}, c.x.options().dtype(at::kFloat));
  }

  ConvParams p{};
  p.x = c.x.const_data_ptr();
  p.w = wp.const_data_ptr();
  p.bias = c.bias.defined() ? c.bias.const_data_ptr<float>() : nullptr;
  p.in_scale = c.in_scale.defined() ? c.in_scale.const_data_ptr<float>() : nullptr;
  p.in_shift = c.in_shift.defined() ? c.in_shift.const_data_ptr<float>() : nullptr;
  p.out_scale = c.out_scale.defined() ? c.out_scale.const_data_ptr<float>() : nullptr;
  p.out_shift = c.out_shift.defined() ? c.out_shift.const_data_ptr<float>() : nullptr;
  p.residual = c.residual.defined() ? c.residual.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.part_mean = c.stats ? part_mean.mutable_data_ptr<float>() : nullptr;
  p.part_m2 = c.stats ? part_m2.mutable_data_ptr<float>() : nullptr;
  p.Cin = static_cast<int>(c.Cin);
  p.H = static_cast<int>(c.H);
  p.W = static_cast<int>(c.W);
  p.D = static_cast<int>(c.D);
  p.Cout = static_cast<int>(c.Cout);
  p.Ho = static_cast<int>(c.Ho);
  p.Wo = static_cast<int>(c.Wo);
  p.Dc = static_cast<int>(Dc);
  p.KH = static_cast<int>(c.KH);
  p.KW = static_cast<int>(c.KW);
  p.KD = static_cast<int>(c.KD);
  p.st_h = static_cast<int>(c.st[0]);
  p.st_w = static_cast<int>(c.st[1]);
  p.st_d = static_cast<int>(c.st[2]);
  p.pad_h = static_cast<int>(c.pad[0]);
  p.pad_w = static_cast<int>(c.pad[1]);
  p.pad_d = static_cast<int>(c.pad[2]);
  p.cin_pad = static_cast<int>(cin_pad);
  p.cout_pad = static_cast<int>(cout_pad);
  p.K = static_cast<int>(K);
  p.k_pad = static_cast<int>(k_pad);
  p.n_tiles = static_cast<int>(n_tiles);
  p.pool = c.pool;
  p.in_relu = c.in_relu;
  p.relu = c.relu;
  p.a_channel_fast = c.x.stride(1) == 1;
  p.out_channel_fast = out.stride(1) == 1;
  p.M = M;
  p.sxn = c.x.stride(0), p.sxc = c.x.stride(1), p.sxh = c.x.stride(2), p.sxw = c.x.stride(3), p.sxd = c.x.stride(4);
  p.son = out.stride(0), p.soc = out.stride(1), p.soh = out.stride(2), p.sow = out.stride(3), p.sod = out.stride(4);
  if (c.residual.defined()) {
    const at::Tensor& r = c.residual;
    p.srn = r.stride(0), p.src = r.stride(1), p.srh = r.stride(2), p.srw = r.stride(3), p.srd = r.stride(4);
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (!std::is_same_v<T, float>) {  // no fp32 wgmma kernel (use_wgmma is false for fp32)
    if (wg) launch_wgmma<T>(p, wp, ts.BN, static_cast<unsigned int>(m_tiles * n_tiles), stream);
  }
  if (!wg) launch<T>(p, static_cast<unsigned int>(m_tiles * n_tiles), stream);
  AHF_CHECK_LAUNCH(op, what);
  g_conv_launches[wg ? 1 : 0].fetch_add(1, std::memory_order_relaxed);

  if (!c.stats) {
    const at::Tensor none = at::empty({0}, c.x.options().dtype(at::kFloat));
    return {none, none};
  }
  // Merge the tiles' (count, mean, M2) in fp32 with torch ops: tile i holds
  // min(R, m_out - i*R) output rows (R output rows per tile), the same for every channel.
  //   mean = sum_i n_i mean_i / n,  M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2
  // (Chan et al.'s merge written for all partials at once; deviations are taken from the final
  // mean, so nothing cancels). torch's reductions over fixed shapes are deterministic.
  const int64_t R = pooled ? ts.BM / 2 : ts.BM;
  const int64_t m_out = pooled ? M / 2 : M;
  // (counts built in float64, where m_out - i*R is exact, then rounded: every count is <= 128)
  const at::Tensor cnt = at::arange(m_tiles, c.x.options().dtype(at::kDouble))
                             .mul(-static_cast<double>(R))
                             .add(static_cast<double>(m_out))
                             .clamp_max(static_cast<double>(R))
                             .to(at::kFloat)
                             .unsqueeze(1);
  const double total = static_cast<double>(m_out);
  const at::Tensor mean = part_mean.mul(cnt).sum(0).div(total);
  const at::Tensor dev = part_mean.sub(mean.unsqueeze(0));
  const at::Tensor var = part_m2.sum(0).add(dev.mul(dev).mul(cnt).sum(0)).div(total);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> run(const char* op, const ConvCall& c, const at::Tensor& out,
                                       const std::string& what) {
  switch (c.x.scalar_type()) {
    case at::kFloat:
      return run_typed<float>(op, c, out, what);
    case at::kHalf:
      return run_typed<__half>(op, c, out, what);
    case at::kBFloat16:
      return run_typed<__nv_bfloat16>(op, c, out, what);
    default:
      break;
  }
  TORCH_CHECK(false, "ahnet_fast_cuda::", op, ": unsupported dtype ", c10::toString(c.x.scalar_type()),
              "; accepted: float32, bfloat16, float16");
  return {};
}

bool empty_output(const char* op, const ConvCall& c) {
  const bool empty = c.N * c.Cout * c.Ho * c.Wo * c.Dout == 0;
  TORCH_CHECK(!(empty && c.stats), "ahnet_fast_cuda::", op, ": compute_stats needs a non-empty output, got shape ",
              at::IntArrayRef(c.out_shape));
  return empty;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3d_fused_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_shift, c10::string_view zpool, const std::optional<at::Tensor>& residual,
    bool relu, bool compute_stats) {
  constexpr const char* op = "conv3d_fused";
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvCall c = prepare(op, x, weight, stride, padding, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                             zpool, residual, relu, compute_stats);
  // the output follows x's memory format
  at::Tensor y = at::empty(c.out_shape, x.options().memory_format(memory_format(use_channels_last(x))));
  if (empty_output(op, c)) {
    const at::Tensor none = at::empty({0}, x.options().dtype(at::kFloat));
    return {y, none, none};
  }
  auto [mean, var] = run(op, c, y, call_description(x, weight, stride, padding, zpool));
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor> conv3d_fused_out_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_shift, c10::string_view zpool, const std::optional<at::Tensor>& residual,
    bool relu, bool compute_stats, const at::Tensor& out) {
  constexpr const char* op = "conv3d_fused_out";
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvCall c = prepare(op, x, weight, stride, padding, bias, in_scale, in_shift, in_relu, out_scale, out_shift,
                             zpool, residual, relu, compute_stats);
  TORCH_CHECK(out.defined(), "ahnet_fast_cuda::", op, ": out is undefined");
  check_same(op, "out", out, x, "x", c.out_shape);
  if (empty_output(op, c)) {
    const at::Tensor none = at::empty({0}, x.options().dtype(at::kFloat));
    return {none, none};
  }
  return run(op, c, out, call_description(x, weight, stride, padding, zpool) + ", out=" + describe(out));
}

}  // namespace

TORCH_LIBRARY_IMPL(ahnet_fast_cuda, CUDA, m) {
  m.impl("conv3d_fused", &conv3d_fused_cuda);
  m.impl("conv3d_fused_out", &conv3d_fused_out_cuda);
}

}  // namespace ahnet_fast_cuda
