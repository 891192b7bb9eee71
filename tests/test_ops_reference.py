"""Reference backend: every op x dtype x layout x shape against the float64 torch composition."""
from __future__ import annotations

import pytest

from _ops_oracle import K111, K111S2, K113, K331, K331S2, STEM, ConvSpec, DTYPES, LAYOUTS, check_conv_op, combos, check_zmaxpool

# C 5->7, 20->20, 80->20; odd H/W; D in {1, 2, 3, 8}; every z-pool mode; residual; ReLU on/off;
# training and eval; the AH-Net kernel shapes and the stem.
CBA_CASES = [
    ConvSpec(2, 5, 7, (5, 3, 8), **K331),
    ConvSpec(1, 5, 7, (3, 5, 1), **K331, residual=True),
    ConvSpec(2, 20, 20, (3, 3, 2), **K113, relu=False),
    ConvSpec(1, 80, 20, (3, 3, 3), **K331, training=False),
    ConvSpec(2, 5, 7, (5, 5, 8), **K331S2, zpool="before_bn"),
    ConvSpec(2, 5, 7, (5, 3, 3), **K111S2, zpool="before_bn", residual=True, training=False),
    ConvSpec(1, 5, 7, (3, 5, 8), **K111, zpool="after_bn", residual=True),
    ConvSpec(2, 5, 7, (3, 3, 2), **K331, zpool="after_bn", relu=False, training=False, bias=True),
    ConvSpec(2, 5, 7, (7, 5, 4), **STEM, zpool="before_bn", bias=True),
    # kernel larger than the input along H and W: torch's oneDNN conv backward is wrong there
    # on some CPUs (tests/test_cpu_conv_workaround.py); the reference backend routes around it
    ConvSpec(2, 16, 16, (2, 2, 2), **K331),
]
BAC_CASES = [
    ConvSpec(2, 5, 7, (5, 3, 8), **K331),
    ConvSpec(1, 80, 20, (3, 5, 2), **K331),
    ConvSpec(2, 20, 20, (3, 3, 3), **K113, training=False),
    ConvSpec(1, 5, 7, (3, 5, 1), **K111, relu=False, bias=True),
    ConvSpec(2, 5, 7, (5, 5, 2), **K331S2, training=False, bias=True),
    ConvSpec(2, 16, 16, (2, 1, 3), **K331),
    # the Pseudo3D layer's sum x + conv1x1x3(relu(bn(x))) in the epilogue
    ConvSpec(2, 20, 20, (3, 3, 3), **K113, residual=True),
]


@pytest.mark.parametrize("spec,dtype,layout", combos(CBA_CASES))
def test_conv_bn_act_reference(spec, dtype, layout):
    check_conv_op("conv_bn_act", spec, DTYPES[dtype], layout, "reference")


@pytest.mark.parametrize("spec,dtype,layout", combos(BAC_CASES))
def test_bn_act_conv_reference(spec, dtype, layout):
    check_conv_op("bn_act_conv", spec, DTYPES[dtype], layout, "reference")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 3, 5, 3, 8), (2, 7, 3, 1, 2), (2, 5, 3, 3, 3)], ids=str)
def test_zmaxpool_reference(shape, dtype, layout):
    check_zmaxpool(shape, DTYPES[dtype], layout, "reference")
