"""Ahead-of-time compile of the Triton kernels for sm_90, with no GPU needed.

The interpreter checks numerics but not what only the compiler sees (type unification across
branches, dot shape rules, layouts, shared-memory use).  This test lowers every kernel (the
conv kernel in its bf16 tensor-core form with the fused prologue/epilogue) all the way to a
cubin with triton's own ptxas, in a subprocess without TRITON_INTERPRET (under the interpreter
``triton.jit`` yields interpreted functions that cannot be compiled).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ahnet_fast.kernels import batchnorm, conv, zpool

    target = GPUTarget("cuda", 90, 32)

    def build(fn, ptr_types, consts, num_warps=4, num_stages=3):
        sig, cexp = {}, {}
        for name in fn.arg_names:
            if name in consts:
                sig[name], cexp[name] = "constexpr", consts[name]
            else:
                sig[name] = ptr_types.get(name, "i32")
        k = triton.compile(ASTSource(fn, sig, cexp), target=target,
                           options={"num_warps": num_warps, "num_stages": num_stages})
        assert k.asm.get("cubin"), fn.__name__
        print("compiled", fn.__name__, consts)

    def ptrs(names, dt):
        return {n: f"*{dt}" for n in names}

    tile = dict(BLOCK_S=64, BLOCK_C=32)
    build(zpool._zpool_fwd_kernel, ptrs(["x_ptr", "y_ptr"], "bf16"), dict(tile, I64=True, XV=8, YV=8))
    build(zpool._zpool_bwd_kernel, ptrs(["x_ptr", "gy_ptr", "gx_ptr"], "bf16"),
          dict(tile, I64=False, XV=0, GV=0, XGV=0))
    f32 = ["pcnt_ptr", "pmean_ptr", "pm2_ptr", "scale_ptr", "shift_ptr", "mean_ptr", "invstd_ptr",
           "gamma_ptr", "beta_ptr", "psg_ptr", "psgx_ptr", "sg_ptr", "sgx_ptr", "var_ptr",
           "pa_ptr", "pb_ptr", "a_ptr", "b_ptr", "rmean_ptr", "rvar_ptr", "nmean_ptr", "nvar_ptr"]
    types = {**ptrs(["x_ptr", "y_ptr", "r_ptr", "o_ptr", "g_ptr", "gy_ptr", "gr_ptr", "ad_ptr"], "bf16"),
             **ptrs(f32, "fp32"), "inv_M": "fp32", "eps": "fp32", "momentum": "fp32"}
    build(batchnorm._stats_partial_kernel, types, dict(tile, I64=False, XV=16))
    # the merge with the BN finalize and the running-statistics update in the same launch
    build(batchnorm.stats_merge_kernel, types, dict(FINALIZE=True, HAS_GAMMA=True, HAS_BETA=True, UPDATE=True,
                                                    BLOCK_P=64, BLOCK_C=64))
    build(batchnorm._sum_partials_kernel, types, dict(BLOCK_P=64, BLOCK_C=64))
    build(batchnorm._bn_apply_kernel, types,
          dict(tile, POOL=True, HAS_RES=True, RELU=True, NORM=True, HAS_SCALE=True, HAS_SHIFT=False, I64=False,
               YV=16, RV=4, OV=8))
    flags = dict(POOL=True, RELU=True, HAS_OUT=True, HAS_GAMMA=True, GV=8, YV=16, OV=0)
    build(batchnorm._bn_bwd_reduce_kernel, types, dict(tile, **flags, I64=False))
    build(batchnorm._bn_bwd_apply_kernel, types,
          dict(tile, **flags, BATCH_STATS=True, RES_GRAD=True, HAS_ADD=True, I64=True, DV=16, RV=2, AV=16))
    ctypes = {**ptrs(["x_ptr", "w_ptr", "res_ptr", "out_ptr"], "bf16"),
              **ptrs(["bias_ptr", "isc_ptr", "ish_ptr", "osc_ptr", "osh_ptr",
                      "pcnt_ptr", "pmean_ptr", "pm2_ptr", "ws_ptr"], "fp32")}
    for pool, stats, split in ((1, True, False), (2, False, False), (2, False, True)):
        build(conv._conv_kernel, ctypes,
              dict(KH=3, KW=3, KD=1, HAS_BIAS=True, HAS_PRO=True, IN_RELU=True, HAS_OSC=not stats,
                   HAS_OSH=not stats, POOL=pool, HAS_RES=True, RELU=not stats, STATS=stats, W_CL=stats,
                   UPCAST=False,
                   IS_FP32=False, PRECISION="ieee", I64=stats, XV=8, OV=0 if stats else 8, RV=8,
                   CIN_V=8, COUT_V=4 if stats else 8, SPLIT=split,
                   BLOCK_M=64, BLOCK_N=16, BLOCK_K=16),
              num_warps=2, num_stages=2)
    # the split-K reduction with the full epilogue (z-pool after the affine, residual, ReLU, stats)
    build(conv._splitk_epilogue_kernel, ctypes,
          dict(HAS_BIAS=True, HAS_OSC=True, HAS_OSH=True, POOL=2, HAS_RES=True, RELU=True, STATS=False,
               I64=False, OV=8, RV=8, BLOCK_M=64, BLOCK_N=32))
    build(conv._splitk_epilogue_kernel, ctypes,
          dict(HAS_BIAS=True, HAS_OSC=False, HAS_OSH=False, POOL=1, HAS_RES=False, RELU=False, STATS=True,
               I64=True, OV=4, RV=0, BLOCK_M=64, BLOCK_N=128))


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.timeout(600)
@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 13


if __name__ == "__main__":
    _compile_all()
