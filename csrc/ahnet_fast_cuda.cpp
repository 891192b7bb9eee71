// ahnet_fast CUDA extension: the ONE translation unit that defines the operator schemas.
//
// Every op lives in the torch.library namespace `ahnet_fast_cuda` (the public, autograd-aware ops
// are registered by ahnet_fast.ops in the namespace `ahnet_fast`; these are the raw kernels it may
// dispatch to). Kernels are registered per backend with TORCH_LIBRARY_IMPL(ahnet_fast_cuda, CUDA, m)
// in csrc/cuda/*.cu, one file per op family, as torchvision's csrc/ops does.
//
// Conventions shared by all ops (see notes/OPS_CONTRACT.md for the math):
//  * tensors are logical (N, C, H, W, D), D = slice axis; channels_last_3d or contiguous; outputs
//    follow the input's memory format; float32 / bfloat16 / float16; all arithmetic in fp32;
//  * per-channel vectors (scale, shift, mean, invstd, gamma, beta) are float32 (C,);
//  * `zpool` is a string: "none", "after_affine" or, for the conv, "before_affine" (max over z-pairs
//    d=2j, 2j+1, floor(D/2) outputs, first element wins ties, NaN wins);
//  * `*_out` variants write into a caller-provided tensor (e.g. a channel slice of a preallocated
//    concatenation buffer) and return nothing.
#include <Python.h>
#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR/PATCH

#include <cstring>
#include <exception>

#include "cuda/conv_policy.h"

TORCH_LIBRARY(ahnet_fast_cuda, m) {
  // (N,C,H,W,D) -> (N,C,H,W,D//2): max over z-pairs, no index tensor.
  m.def("zmaxpool_forward(Tensor x) -> Tensor");
  // grad_x (shape and memory format of x); the pair argmax is recomputed from x.
  m.def("zmaxpool_backward(Tensor x, Tensor grad_y) -> Tensor");
  // (mean, biased variance), float32 (C,), over (N,H,W,D); deterministic, no atomics.
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor)");
  // relu?(pool?(y*scale[c] + shift[c]) + residual?)
  m.def("bn_act_apply(Tensor y, Tensor scale, Tensor shift, str zpool, Tensor? residual, bool relu) -> Tensor");
  m.def("bn_act_apply_out(Tensor y, Tensor scale, Tensor shift, str zpool, Tensor? residual, bool relu, "
        "Tensor(a!) out) -> ()");
  // -> (grad_y, grad_gamma or undefined, grad_beta, grad_residual or undefined)
  m.def("bn_act_backward(Tensor grad_out, Tensor y, Tensor mean, Tensor invstd, Tensor? gamma, Tensor? beta, "
        "Tensor? out, str zpool, bool relu, bool batch_stats, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused implicit-GEMM conv (csrc/cuda/conv_fused.cu): zpool "none" | "before_affine" | "after_affine";
  // -> (y, mean, var); mean/var fp32 (Cout,) when compute_stats, else empty. The _out variant writes
  // into `out` (e.g. a channel slice of a concat buffer) and returns (mean, var).
  m.def("conv3d_fused(Tensor x, Tensor weight, int[] stride, int[] padding, Tensor? bias, Tensor? in_scale, "
        "Tensor? in_shift, bool in_relu, Tensor? out_scale, Tensor? out_shift, str zpool, Tensor? residual, "
        "bool relu, bool compute_stats) -> (Tensor, Tensor, Tensor)");
  m.def("conv3d_fused_out(Tensor x, Tensor weight, int[] stride, int[] padding, Tensor? bias, Tensor? in_scale, "
        "Tensor? in_shift, bool in_relu, Tensor? out_scale, Tensor? out_shift, str zpool, Tensor? residual, "
        "bool relu, bool compute_stats, Tensor(a!) out) -> (Tensor, Tensor)");
}

// `import ahnet_fast._C` loads this library (running the registrations above and in csrc/cuda/*.cu)
// and exposes the versions it was compiled against, which ahnet_fast._cuda compares with the
// running torch a second time (the first check reads _build_info.json before anything is loaded).
#define AHF_STR2(x) #x
#define AHF_STR(x) AHF_STR2(x)

// ---- the conv kernel policy (csrc/cuda/conv_policy.h) as plain module functions: they take no
// tensors, so they are not dispatcher ops. ahnet_fast._cuda wraps them (set_conv_kernel, ...).
namespace {
const char* const kModeNames[] = {"wmma", "wgmma", "auto"};

template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_RuntimeError, exc.what());
    return nullptr;
  }
}

PyObject* py_conv_kernel(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(kModeNames[ahnet_fast_cuda::conv_kernel_mode()]); });
}

PyObject* py_set_conv_kernel(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (int mode = 0; mode < 3; ++mode) {
    if (std::strcmp(name, kModeNames[mode]) == 0) {
      return guarded([mode] { return PyUnicode_FromString(kModeNames[ahnet_fast_cuda::set_conv_kernel_mode(mode)]); });
    }
  }
  PyErr_Format(PyExc_ValueError, "conv kernel %R is not accepted; use \"wmma\", \"wgmma\" or \"auto\"", PyTuple_GetItem(args, 0));
  return nullptr;
}

PyObject* py_wgmma_supported(PyObject*, PyObject* args) {
  int device = 0;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
  return guarded([device] { return PyBool_FromLong(ahnet_fast_cuda::wgmma_supported(device) ? 1 : 0); });
}

PyObject* py_conv_launch_counts(PyObject*, PyObject*) {
  return guarded([] {
    return Py_BuildValue("{s:L,s:L}", "wmma", static_cast<long long>(ahnet_fast_cuda::conv_launch_count(0)), "wgmma",
                         static_cast<long long>(ahnet_fast_cuda::conv_launch_count(1)));
  });
}

PyMethodDef kMethods[] = {
    {"conv_kernel", py_conv_kernel, METH_NOARGS, "conv3d_fused's kernel policy: 'wmma', 'wgmma' or 'auto'"},
    {"set_conv_kernel", py_set_conv_kernel, METH_VARARGS, "set the policy ('wmma', 'wgmma', 'auto'); returns the previous one"},
    {"wgmma_supported", py_wgmma_supported, METH_VARARGS, "whether CUDA device i can run the sm_90a wgmma conv"},
    {"conv_launch_counts", py_conv_launch_counts, METH_NOARGS, "{'wmma': n, 'wgmma': m}: conv launches per kernel so far"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

static PyModuleDef ahnet_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "ahnet_fast CUDA kernels; the ops are torch.ops.ahnet_fast_cuda.*", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&ahnet_fast_c_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "torch_version",
                             AHF_STR(TORCH_VERSION_MAJOR) "." AHF_STR(TORCH_VERSION_MINOR) "." AHF_STR(TORCH_VERSION_PATCH));
#ifdef CUDART_VERSION
  PyModule_AddIntConstant(mod, "cuda_runtime_version", CUDART_VERSION);  // e.g. 13000
#endif
  return mod;
}
