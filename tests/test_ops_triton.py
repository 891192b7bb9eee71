"""Triton backend against the float64 composition: under the interpreter on the CPU (tiny
shapes; TRITON_INTERPRET=1 is set by conftest when no GPU is visible) and compiled on a GPU."""
from __future__ import annotations

import pytest
import torch

from _ops_oracle import K111, K111S2, K113, K331, K331S2, STEM, ConvSpec, DTYPES, check_conv_op, check_zmaxpool, combos
from ahnet_fast.ops import triton_backend

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.interpreter

# a few thousand output voxels at most: the interpreter runs one numpy step per tile and tap
CBA_CASES = [
    ConvSpec(2, 5, 7, (3, 5, 8), **K331),
    ConvSpec(1, 5, 7, (5, 3, 1), **K331, residual=True, training=False),
    ConvSpec(1, 20, 20, (3, 3, 3), **K113, relu=False),
    ConvSpec(2, 5, 7, (5, 3, 4), **K331S2, zpool="before_bn", bias=True),
    ConvSpec(1, 5, 7, (3, 3, 8), **K111, zpool="after_bn", residual=True),
    ConvSpec(2, 5, 7, (3, 3, 3), **K111S2, zpool="before_bn", residual=True, training=False),
    ConvSpec(1, 80, 20, (3, 3, 2), **K331, zpool="after_bn", training=False, bias=True),
    ConvSpec(1, 3, 5, (7, 5, 4), **STEM, zpool="before_bn"),
]
BAC_CASES = [
    ConvSpec(2, 5, 7, (3, 5, 8), **K331),
    ConvSpec(1, 80, 20, (3, 3, 2), **K331),
    ConvSpec(1, 20, 20, (3, 3, 3), **K113, training=False, bias=True),
    ConvSpec(2, 5, 7, (5, 3, 1), **K111, relu=False),
    ConvSpec(1, 5, 7, (5, 5, 2), **K331S2, training=False),
    ConvSpec(1, 20, 20, (3, 3, 3), **K113, residual=True),  # the Pseudo3D sum in the epilogue
]


def _interp_ok():
    if not HAS_CUDA and not triton_backend.interpreting():
        pytest.fail("no GPU and the Triton interpreter is off: conftest should have set TRITON_INTERPRET=1")


@pytest.mark.parametrize("spec,dtype,layout", combos(CBA_CASES, float32_both_layouts=False))
def test_conv_bn_act_triton(spec, dtype, layout):
    _interp_ok()
    check_conv_op("conv_bn_act", spec, DTYPES[dtype], layout, "triton", device=DEVICE)


@pytest.mark.parametrize("spec,dtype,layout", combos(BAC_CASES, float32_both_layouts=False))
def test_bn_act_conv_triton(spec, dtype, layout):
    _interp_ok()
    check_conv_op("bn_act_conv", spec, DTYPES[dtype], layout, "triton", device=DEVICE)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 3, 5, 3, 8), (2, 7, 3, 1, 3)], ids=str)
def test_zmaxpool_triton(shape, dtype, layout):
    _interp_ok()
    check_zmaxpool(shape, DTYPES[dtype], layout, "triton", device=DEVICE)


# ---- compiled on a GPU: the same checks at AH-Net-like sizes, bf16 included
GPU_CBA = [
    ConvSpec(2, 64, 64, (48, 48, 16), **K331),
    ConvSpec(2, 64, 64, (48, 48, 16), **K331S2, zpool="after_bn", residual=True),
    ConvSpec(2, 64, 64, (24, 24, 16), **K111S2, zpool="before_bn"),
    ConvSpec(1, 3, 64, (96, 96, 32), **STEM, zpool="before_bn"),
    ConvSpec(2, 64, 64, (24, 24, 16), **K331, training=False, residual=True),
]
GPU_BAC = [
    ConvSpec(2, 80, 20, (96, 96, 32), **K331),
    ConvSpec(2, 20, 20, (96, 96, 32), **K113),
    ConvSpec(2, 20, 20, (48, 48, 16), **K113, training=False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("spec,dtype,layout", combos(GPU_CBA))
def test_conv_bn_act_triton_gpu(spec, dtype, layout):
    check_conv_op("conv_bn_act", spec, DTYPES[dtype], layout, "triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("spec,dtype,layout", combos(GPU_BAC))
def test_bn_act_conv_triton_gpu(spec, dtype, layout):
    check_conv_op("bn_act_conv", spec, DTYPES[dtype], layout, "triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zmaxpool_triton_gpu(dtype):
    check_zmaxpool((2, 64, 96, 96, 64), DTYPES[dtype], "channels_last_3d", "triton", device="cuda")
