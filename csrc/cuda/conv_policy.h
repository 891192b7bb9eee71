// Which device path conv3d_fused takes (csrc/cuda/conv_fused.cu), and how often each ran.
// Plain C++ (no CUDA, no torch headers): csrc/ahnet_fast_cuda.cpp exposes these to Python as
// ahnet_fast._C.{conv_kernel, set_conv_kernel, wgmma_supported, conv_launch_counts}; the policy
// itself (the default, the environment variable) lives in ahnet_fast/_cuda.py.
#pragma once

#include <cstdint>

namespace ahnet_fast_cuda {

enum ConvKernelMode : int {
  kConvKernelWmma = 0,   // conv_fused_kernel everywhere (WMMA / FMA; sm_80 and newer)
  kConvKernelWgmma = 1,  // conv_wgmma_kernel for every call it accepts; an error on a device that cannot run it
  kConvKernelAuto = 2,   // conv_wgmma_kernel where the device and the call allow, conv_fused_kernel elsewhere
};

int conv_kernel_mode();
int set_conv_kernel_mode(int mode);      // returns the previous mode
bool wgmma_supported(int device);        // compute capability 9.0 running this library's sm_90a image
int64_t conv_launch_count(int kernel);   // 0: conv_fused_kernel, 1: conv_wgmma_kernel (process lifetime)

}  // namespace ahnet_fast_cuda
