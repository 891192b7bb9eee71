"""conv3d_fused against float64 torch compositions (F.conv3d, BN affine math, F.max_pool3d).

Tolerances (DESIGN.md): float32 relative error <= 1e-5 against float64 (TF32 off); bf16/fp16 error
<= 2x that of the same-dtype torch composition.  Under the interpreter bf16 dot operands are
upcast to fp32 (kernels/_common.INTERPRET); the real bf16 tensor-core path runs in the gpu tests.
Shapes are tiny on purpose: the interpreter costs ~10 ms per program and per op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.kernels.conv import SPLITK_MIN_K, SPLITK_MIN_SLICE_K, conv3d_fused, split_k_plan

from _kernel_cases import (CL, DEV, DTYPES, K111, K111_S2, K113, K331, K331_S2, check_conv, compose_conv,
                           layout_ok, rand, rel, vec)


# ------------------------------------------------------------------------------------------ plain conv

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom,shape,cout", [
    (K331, (1, 5, 5, 7, 3), 7),
    (K331_S2, (2, 5, 5, 3, 2), 7),
    (K113, (1, 20, 3, 3, 8), 20),
    (K111_S2, (2, 5, 5, 5, 1), 7),
])
def test_conv_plain(dtype, channels_last, geom, shape, cout):
    (k, stride, padding) = geom
    x = rand(shape, dtype, channels_last)
    w = rand((cout, shape[1], *k), dtype, False, scale=0.3)
    y = conv3d_fused(x, w, stride=stride, padding=padding)
    check_conv(y, x, w, stride=stride, padding=padding)
    assert layout_ok(y, channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_decoder_80_to_20(dtype):
    """The decoder's 3x3x1 80 -> 20 (several K chunks, Cout not a multiple of 16), tiny spatial."""
    x = rand((1, 80, 3, 3, 2), dtype, True)
    w = rand((20, 80, 3, 3, 1), dtype, False, scale=0.1)
    b = vec(20)
    y = conv3d_fused(x, w, padding=(1, 1, 0), bias=b)
    check_conv(y, x, w, padding=(1, 1, 0), bias=b)


def test_conv_many_tiles_and_generic_kernel():
    """Several M and N tiles (Cout 80 > 64), a (2,3,2) kernel with stride (1,2,2): general path."""
    x = rand((2, 6, 7, 9, 5), torch.float32, True)
    w = rand((80, 6, 2, 3, 2), torch.float32, False, scale=0.3)
    y = conv3d_fused(x, w, stride=(1, 2, 2), padding=(1, 0, 1))
    check_conv(y, x, w, stride=(1, 2, 2), padding=(1, 0, 1))


# ------------------------------------------------------------------------------------------ prologue

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom", [K331, K113])
def test_conv_prologue_bn_relu(dtype, channels_last, geom):
    """Pre-activation BN+ReLU on load; a large positive shift makes padding-before-transform
    (relu(0*s + shift) != 0) visibly wrong, so this proves padding is applied after it."""
    (k, stride, padding) = geom
    x = rand((2, 5, 3, 5, 3), dtype, channels_last, shift=0.2)
    w = rand((7, 5, *k), dtype, False, scale=0.3)
    isc = vec(5)
    ish = vec(5, shift=1.0)
    y = conv3d_fused(x, w, stride=stride, padding=padding, in_scale=isc, in_shift=ish)
    check_conv(y, x, w, stride=stride, padding=padding, in_scale=isc, in_shift=ish)
    assert layout_ok(y, channels_last)


def test_conv_prologue_without_relu():
    x = rand((1, 5, 3, 3, 2), torch.float32, True)
    w = rand((7, 5, 3, 3, 1), torch.float32, False, scale=0.3)
    isc, ish = vec(5), vec(5, shift=1.0)
    y = conv3d_fused(x, w, padding=(1, 1, 0), in_scale=isc, in_shift=ish, in_relu=False)
    check_conv(y, x, w, padding=(1, 1, 0), in_scale=isc, in_shift=ish, in_relu=False)


# ------------------------------------------------------------------------------------------ epilogue

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool", ["before_affine", "after_affine"])
def test_conv_epilogue_pool_affine_residual_relu(dtype, channels_last, zpool):
    """Folded-BN epilogue with a z-pool; channel 0 has a negative scale, where max-then-affine and
    affine-then-max differ (a kernel that folds the scale before the max fails this)."""
    x = rand((2, 5, 3, 5, 4), dtype, channels_last)
    w = rand((7, 5, 3, 3, 1), dtype, False, scale=0.3)
    b, osc, osh = vec(7), vec(7), vec(7)
    osc[0] = -2.0
    osc[1] = 0.5
    res = rand((2, 7, 3, 5, 2), dtype, not channels_last)
    kw = dict(padding=(1, 1, 0), bias=b, out_scale=osc, out_shift=osh, zpool=zpool, residual=res, relu=True)
    y = conv3d_fused(x, w, **kw)
    check_conv(y, x, w, **kw)
    assert layout_ok(y, channels_last)
    # the other pool placement is really different on channel 0 (negative scale)
    other = "after_affine" if zpool == "before_affine" else "before_affine"
    kw_other = dict(kw, zpool=other, relu=False, residual=None)
    kw_this = dict(kw, relu=False, residual=None)
    a = compose_conv(x, w, torch.float64, **kw_this)[:, 0]
    b2 = compose_conv(x, w, torch.float64, **kw_other)[:, 0]
    assert (a - b2).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_pool_odd_depth_and_stride(dtype):
    """1x1x1 stride (2,2,1) shortcut conv -> z-pool -> BN with an odd output depth (floor)."""
    x = rand((1, 6, 5, 3, 3), dtype, True)
    w = rand((7, 6, 1, 1, 1), dtype, False, scale=0.3)
    osc, osh = vec(7), vec(7)
    kw = dict(stride=(2, 2, 1), zpool="before_affine", out_scale=osc, out_shift=osh)
    y = conv3d_fused(x, w, **kw)
    assert y.shape == (1, 7, 3, 2, 1)
    check_conv(y, x, w, **kw)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_out_channel_slice(channels_last):
    """Dense-block concat: write into channels [3, 10) of a NaN-poisoned buffer; the input is
    itself a channel slice of the same buffer (the real use), the rest stays untouched."""
    fmt = CL if channels_last else torch.contiguous_format
    buf = torch.full((2, 12, 3, 5, 2), float("nan"), device=DEV).contiguous(memory_format=fmt)
    src = rand((2, 3, 3, 5, 2), torch.float32, channels_last)
    buf[:, :3] = src
    x = buf[:, :3]
    w = rand((7, 3, 3, 3, 1), torch.float32, False, scale=0.3)
    isc, ish = vec(3), vec(3)
    view = conv3d_fused(x, w, padding=(1, 1, 0), in_scale=isc, in_shift=ish,
                        out=buf, out_channel_offset=3)
    assert view.data_ptr() == buf[:, 3:10].data_ptr()
    check_conv(buf[:, 3:10], src, w, padding=(1, 1, 0), in_scale=isc, in_shift=ish)
    assert torch.equal(buf[:, :3], src)
    assert torch.isnan(buf[:, 10:]).all()


# ------------------------------------------------------------------------------------------ stats

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool", ["none", "before_affine"])
def test_conv_stats(dtype, channels_last, zpool):
    """Training BN statistics from the epilogue: of acc+bias (after a before-affine pool),
    merged over several M tiles; also with a residual/ReLU in the same epilogue."""
    x = rand((2, 5, 9, 7, 4), dtype, channels_last, shift=3.0)   # offset mean, stable merge
    w = rand((7, 5, 3, 3, 1), dtype, False, scale=0.3)
    b = vec(7, shift=5.0)
    kw = dict(padding=(1, 1, 0), bias=b, zpool=zpool)
    y, (mean, var) = conv3d_fused(x, w, compute_stats=True, **kw)
    ref = check_conv(y, x, w, **kw)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (7,)
    vr, mr = torch.var_mean(ref, dim=(0, 2, 3, 4), unbiased=False)
    if dtype == torch.float32:
        assert rel(mean, mr) <= 1e-5 and rel(var, vr) <= 1e-5
    else:
        # same-dtype composition: statistics of the bf16 conv output
        vt, mt = torch.var_mean(compose_conv(x, w, dtype, **kw).float(), dim=(0, 2, 3, 4), unbiased=False)
        assert rel(mean, mr) <= 2 * rel(mt, mr) + 1e-6
        assert rel(var, vr) <= 2 * rel(vt, vr) + 1e-6


# ------------------------------------------------------------------------------------------ split-K

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool", ["none", "after_affine"])
def test_conv_split_k_full_epilogue(dtype, channels_last, zpool):
    """A conv split along K (prologue over 9 taps, uneven slices) through the separate reduction:
    bias, pool, affine with a negative scale, residual and ReLU still against float64."""
    x = rand((2, 9, 3, 5, 4), dtype, channels_last)
    w = rand((7, 9, 3, 3, 1), dtype, False, scale=0.3)
    b, osc, osh, isc, ish = vec(7), vec(7), vec(7), vec(9), vec(9)
    osc[0] = -2.0
    res = rand((2, 7, 3, 5, 2 if zpool != "none" else 4), dtype, not channels_last)
    kw = dict(padding=(1, 1, 0), bias=b, in_scale=isc, in_shift=ish, out_scale=osc, out_shift=osh,
              zpool=zpool, residual=res, relu=True)
    y = conv3d_fused(x, w, split_k=4, **kw)   # 9 K iterations -> slices of 2, 2, 2, 3
    check_conv(y, x, w, **kw)
    assert layout_ok(y, channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool", ["none", "before_affine"])
def test_conv_split_k_stats_and_determinism(channels_last, zpool):
    """Statistics from the reduction's epilogue equal the unsplit conv's to fp32 rounding; the
    split result is bitwise the same run after run (slices are added in a fixed order)."""
    x = rand((2, 5, 9, 7, 4), torch.float32, channels_last, shift=3.0)
    w = rand((6, 5, 1, 1, 3), torch.float32, False, scale=0.3)
    kw = dict(padding=(0, 0, 1), bias=vec(6, shift=5.0), zpool=zpool, compute_stats=True)
    y1, (m1, v1) = conv3d_fused(x, w, **kw)
    y2, (m2, v2) = conv3d_fused(x, w, split_k=3, **kw)
    y3, (m3, v3) = conv3d_fused(x, w, split_k=3, **kw)
    kw.pop("compute_stats")
    check_conv(y2, x, w, **kw)
    assert rel(m2, m1) <= 1e-6 and rel(v2, v1) <= 1e-5
    assert torch.equal(y2, y3) and torch.equal(m2, m3) and torch.equal(v2, v3)


def test_conv_split_k_into_channel_slice_and_clamped():
    """Split conv writing a dense-block concat slice (the rest of the buffer untouched); a
    split_k beyond the K loop's length is clamped (1x1x1 with one K chunk: no split at all)."""
    buf = torch.full((1, 10, 4, 3, 2), float("nan"), device=DEV).contiguous(memory_format=CL)
    x = rand((1, 3, 4, 3, 2), torch.float32, True)
    w = rand((5, 3, 3, 3, 1), torch.float32, False, scale=0.3)
    conv3d_fused(x, w, padding=(1, 1, 0), out=buf, out_channel_offset=2, split_k=9)
    check_conv(buf[:, 2:7], x, w, padding=(1, 1, 0))
    assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, 7:]).all()
    w1 = rand((5, 3, 1, 1, 1), torch.float32, False, scale=0.3)
    check_conv(conv3d_fused(x, w1, split_k=8), x, w1)


def test_split_k_plan():
    """Split only when the tiles leave SMs idle and K is deep, enough for a full wave as far as
    every slice keeps SPLITK_MIN_SLICE_K of K, never past the workspace limit; the same convs in
    fp32 (16-deep K steps) as in bf16 (64-deep)."""
    assert split_k_plan(132, 72, 64, 132) == 1                   # a full wave already
    assert split_k_plan(8, 72, 64, 132) == 17                     # layer4 3x3x1 512->512: 136 CTAs
    assert split_k_plan(8, 288, 16, 132) == 17                    # the same conv in fp32
    assert split_k_plan(2, 40, 64, 132) == 40 * 64 // SPLITK_MIN_SLICE_K   # K too shallow for a wave
    assert split_k_plan(8, SPLITK_MIN_K // 64 - 1, 64, 132) == 1  # too shallow to pay for a launch
    assert split_k_plan(8, SPLITK_MIN_K // 16 - 1, 16, 132) == 1
    assert split_k_plan(8, 72, 64, 132, acc_elems=2**28) == 7     # workspace within int32 offsets
    with pytest.raises(ValueError, match="split_k"):
        conv3d_fused(torch.randn(1, 2, 3, 3, 2, device=DEV), torch.randn(2, 2, 1, 1, 1, device=DEV), split_k=0)


# ------------------------------------------------------------------------------------------ errors

def test_conv_rejects_bad_input():
    x = torch.randn(1, 4, 3, 3, 2, device=DEV)
    w = torch.randn(5, 4, 3, 3, 1, device=DEV)
    with pytest.raises(ValueError, match="5-D"):
        conv3d_fused(x[0], w)
    with pytest.raises(TypeError, match="must match x dtype"):
        conv3d_fused(x, w.half())
    with pytest.raises(ValueError, match="input channels"):
        conv3d_fused(x, torch.randn(5, 3, 3, 3, 1, device=DEV))
    with pytest.raises(ValueError, match="together"):
        conv3d_fused(x, w, in_scale=torch.ones(4, device=DEV))
    with pytest.raises(TypeError, match="float32"):
        conv3d_fused(x, w, out_scale=torch.ones(5, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="compute_stats"):
        conv3d_fused(x, w, padding=(1, 1, 0), out_scale=torch.ones(5, device=DEV), compute_stats=True)
    with pytest.raises(ValueError, match="compute_stats"):
        conv3d_fused(x, w, padding=(1, 1, 0), zpool="after_affine", compute_stats=True)
    with pytest.raises(ValueError, match="zpool"):
        conv3d_fused(x, w, zpool="max")
    with pytest.raises(ValueError, match="too small"):
        conv3d_fused(x, torch.randn(5, 4, 5, 5, 1, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        conv3d_fused(x, w, padding=(1, 1, 0), residual=torch.randn(1, 5, 3, 3, 1, device=DEV))
    with pytest.raises(ValueError, match="does not fit"):
        conv3d_fused(x, w, padding=(1, 1, 0), out=torch.empty(1, 6, 3, 3, 2, device=DEV),
                     out_channel_offset=2)


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom,shape,cout", [
    (K331, (2, 80, 96, 96, 32), 20),       # decoder 3x3x1 80 -> 20
    (K113, (2, 20, 96, 96, 32), 20),       # decoder 1x1x3 20 -> 20
    (K331, (2, 64, 48, 48, 16), 64),       # encoder 3x3x1 64 -> 64
    (K331_S2, (1, 128, 64, 64, 16), 256),  # downsampling encoder conv
    (K111, (1, 256, 48, 48, 16), 64),
])
def test_conv_gpu_shapes(dtype, channels_last, geom, shape, cout):
    """Compiled, autotuned kernels (bf16/fp16 tensor cores) at AH-Net shapes."""
    (k, stride, padding) = geom
    x = rand(shape, dtype, channels_last)
    w = rand((cout, shape[1], *k), dtype, False, scale=(shape[1] * k[0] * k[1] * k[2]) ** -0.5)
    y = conv3d_fused(x, w, stride=stride, padding=padding)
    check_conv(y, x, w, stride=stride, padding=padding)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv_gpu_fused_training_and_inference(dtype):
    """Every fusion at a real size: prologue, pool before/after with negative scales, residual,
    ReLU, channel-slice output and the stats epilogue."""
    x = rand((2, 64, 48, 48, 16), dtype, True, shift=0.5)
    w = rand((64, 64, 3, 3, 1), dtype, False, scale=(64 * 9) ** -0.5)
    isc, ish = vec(64), vec(64)
    b, osc, osh = vec(64), vec(64), vec(64)
    res = rand((2, 64, 48, 48, 8), dtype, True)
    for zpool in ("before_affine", "after_affine"):
        kw = dict(padding=(1, 1, 0), bias=b, in_scale=isc, in_shift=ish, out_scale=osc,
                  out_shift=osh, zpool=zpool, residual=res, relu=True)
        check_conv(conv3d_fused(x, w, **kw), x, w, **kw)
    buf = torch.full((2, 100, 48, 48, 8), float("nan"), device=DEV, dtype=dtype).contiguous(memory_format=CL)
    kw = dict(padding=(1, 1, 0), bias=b, zpool="before_affine")
    _, (mean, var) = conv3d_fused(x, w, out=buf, out_channel_offset=30, compute_stats=True, **kw)
    ref = check_conv(buf[:, 30:94], x, w, **kw)
    assert torch.isnan(buf[:, :30]).all() and torch.isnan(buf[:, 94:]).all()
    vr, mr = torch.var_mean(ref, dim=(0, 2, 3, 4), unbiased=False)
    assert rel(mean, mr) <= 1e-3 and rel(var, vr) <= 1e-3


@pytest.mark.gpu
def test_conv_gpu_int64_offsets():
    """An input past 2^31 elements takes the int64 index path (needs ~9 GB)."""
    # drawn on the device in (N, H, W, D, C) order and viewed as channels_last_3d (N, C, H, W, D)
    x = torch.randn((1, 512, 512, 130, 64), device=DEV, dtype=torch.bfloat16).permute(0, 4, 1, 2, 3)
    w = rand((16, 64, 1, 1, 1), torch.bfloat16, False, scale=0.125)
    assert x.numel() > 2**31
    y = conv3d_fused(x, w)
    ref = F.conv3d(x[..., -2:].float(), w.float()).to(torch.bfloat16)
    assert torch.allclose(y[..., -2:].float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv_gpu_split_k_deep_layer(dtype):
    """layer4's 3x3x1 512->512 at the 192x192x64 input's deep resolution: few output tiles, so
    the launcher's own plan splits K; it matches the unsplit conv and the float64 oracle."""
    x = rand((1, 512, 6, 6, 8), dtype, True)
    w = rand((512, 512, 3, 3, 1), dtype, True, scale=0.02)
    kw = dict(padding=(1, 1, 0), bias=vec(512), relu=True)
    auto = conv3d_fused(x, w, **kw)
    one = conv3d_fused(x, w, split_k=1, **kw)
    check_conv(auto, x, w, **kw)
    assert (auto.float() - one.float()).abs().max() <= 2e-2 * one.float().abs().max() + 1e-3


# ------------------------------------------------------------------------------ padded channels, small heads

def _padded(x, cpad, fill=float("nan")):
    """x's values in the first C channels of a channels-last buffer of ``cpad`` channels whose
    padding holds ``fill``; returns the (N, C, ...) view (the fast AH-Net's decoder buffers)."""
    buf = torch.full((x.shape[0], cpad, *x.shape[2:]), fill, dtype=x.dtype, device=DEV).contiguous(memory_format=CL)
    buf[:, :x.shape[1]] = x
    return buf[:, :x.shape[1]]


def _launch_flags(fn):
    """The constexprs of the conv launches ``fn`` makes (recorded, not run)."""
    from ahnet_fast.kernels.aot import record_specs
    with record_specs() as log:
        fn()
    return [dict(spec.constexprs) for spec, _grid, _ints in log.launches if spec.kernel == "_conv_kernel"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom,cin,with_pro", [(K331, 20, True), (K113, 20, True), (K111, 20, False),
                                                (K111, 12, True), (K331, 127, True)])
def test_conv_reads_channel_padding_as_vectors(dtype, geom, cin, with_pro):
    """x in a channel-padded buffer (20 of 24, 12 of 16, 127 of 128; the padding NaN): the load
    covers the padding as whole vectors and zeroes it in registers, so nothing of it reaches the
    result; a dense x of the same shape does not take that path (its last row has no room)."""
    (k, stride, padding) = geom
    vmax = 16 // torch.empty((), dtype=dtype).element_size()
    cpad = -(-cin // vmax) * vmax
    dense = rand((2, cin, 3, 4, 3), dtype, True)
    x = _padded(dense, cpad)
    w = rand((20, cin, *k), dtype, False, scale=0.2)
    kw = dict(stride=stride, padding=padding)
    if with_pro:
        kw.update(in_scale=vec(cin), in_shift=vec(cin))
    y = conv3d_fused(x, w, **kw)
    assert not torch.isnan(y).any()
    check_conv(y, dense, w, **kw)
    (flags,) = _launch_flags(lambda: conv3d_fused(x, w, **kw))
    # fp32 20 and 12 channels are whole 16-byte vectors already: no padding to read
    assert flags["XPAD"] == (cin % vmax != 0) and flags["XV"] == vmax
    (dflags,) = _launch_flags(lambda: conv3d_fused(dense, w, **kw))
    assert not dflags["XPAD"]


def test_conv_padding_read_never_leaves_the_storage():
    """A channel slice at the very end of its storage has no room for the rounded-up read: the
    launcher keeps the exact channel mask there."""
    buf = rand((1, 24, 2, 2, 2), torch.bfloat16, True)
    tail = buf.flatten()[4:].view(-1)   # storage that ends right after the last real channel
    x = torch.as_strided(tail, (1, 20, 2, 2, 2), (24 * 8, 1, 24 * 4, 24 * 2, 24))
    w = rand((8, 20, 1, 1, 1), torch.bfloat16, False)
    (flags,) = _launch_flags(lambda: conv3d_fused(x, w))
    assert not flags["XPAD"]
    check_conv(conv3d_fused(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cout", [1, 2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_small_head_runs_on_fma(dtype, cout, channels_last):
    """A head with 1..4 output channels: an exact next_pow2(Cout)-wide tile on FMAs (no 16-wide
    MMA), with the BN+ReLU prologue, the bias and several K chunks."""
    x = rand((2, 70, 4, 3, 2), dtype, channels_last)
    w = rand((cout, 70, 3, 3, 1), dtype, False, scale=0.2)
    kw = dict(padding=(1, 1, 0), bias=vec(cout), in_scale=vec(70), in_shift=vec(70))
    y = conv3d_fused(x, w, **kw)
    check_conv(y, x, w, **kw)
    (flags,) = _launch_flags(lambda: conv3d_fused(x, w, **kw))
    assert flags["BLOCK_N"] == 1 << (cout - 1).bit_length()
