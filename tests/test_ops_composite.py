"""Composite CPU path (ahnet_fast.ops.composite, what ``auto`` runs for CPU tensors) against the
float64 oracle: outputs, every gradient, running statistics, both layouts, float32/16/bf16."""
from __future__ import annotations

import pytest
import torch

from _ops_oracle import DTYPES, LAYOUTS, check_conv_op, check_zmaxpool, combos
from test_ops_reference import BAC_CASES, CBA_CASES

from ahnet_fast.ops import _backend, composite, conv_bn_act, use_backend


@pytest.mark.parametrize("spec,dtype,layout", combos(CBA_CASES))
def test_conv_bn_act_composite(spec, dtype, layout):
    check_conv_op("conv_bn_act", spec, DTYPES[dtype], layout, "auto")


@pytest.mark.parametrize("spec,dtype,layout", combos(BAC_CASES))
def test_bn_act_conv_composite(spec, dtype, layout):
    check_conv_op("bn_act_conv", spec, DTYPES[dtype], layout, "auto")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 3, 5, 3, 8), (2, 7, 3, 1, 2), (2, 5, 3, 3, 3)], ids=str)
def test_zmaxpool_composite(shape, dtype, layout):
    check_zmaxpool(shape, DTYPES[dtype], layout, "auto")
