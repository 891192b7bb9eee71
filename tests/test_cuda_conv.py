"""The CUDA C++ conv3d_fused (csrc/cuda/conv_fused.cu) against float64 torch compositions.

Same oracle and tolerances (tests/_kernel_cases.py) as tests/test_kernels_conv.py (the Triton launcher)
and DESIGN.md:
float32 relative error <= 1e-5 against float64 (the CUDA kernel's float32 path is IEEE fp32 FMA,
never TF32); bf16/fp16 error <= 2x that of the same-dtype torch composition, never NaN.

Every test needs a CUDA GPU (marker `gpu`, skipped without one) and the compiled extension with
its conv3d_fused kernel (skipped, saying why, when the package was installed without it). The
shapes exercise both tile shapes of the kernel (128x32 for Cout <= 32, 64x64 above, several N
tiles above 64), both A-loader paths (16-byte vectors for channels-last x with Cin % 8 == 0,
element-wise otherwise), partial M/N/K tiles (odd H/W, D = 1, 2, 3; C not a multiple of 16) and
every fusion option. That the source compiles for sm_80/sm_90a is checked by CI
(csrc/check_compile.py compiles every csrc/cuda/*.cu).

Every test runs twice, once per conv kernel policy (ahnet_fast._cuda.set_conv_kernel): "wmma"
(conv_fused_kernel) and "wgmma" (the sm_90a wgmma + TMA kernel of csrc/cuda/conv_wgmma.cuh, for
the bf16/fp16 calls with channels-last x or one input channel; the others fall back to WMMA). The
wgmma half is skipped, saying why, off Hopper. It is the run that may flip
ahnet_fast._cuda.WGMMA_VERIFIED_ON_GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _kernel_cases import (CL, DEV, DTYPES, K111, K111_S2, K113, K331, K331_S2, check_conv, compose_conv,
                           layout_ok, rand, rel, vec)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["wmma", "wgmma"])
def conv3d_fused(request):
    """The wrapper ahnet_fast._cuda.conv3d_fused (contract signature of kernels/conv.py), with the
    conv kernel policy of the parameter set for the module's tests."""
    from ahnet_fast import _cuda

    ok, why = _cuda.status()
    if not ok:
        pytest.skip(f"CUDA extension not usable here: {why}")
    if "conv3d_fused" not in _cuda.implemented():
        pytest.skip(f"the CUDA extension has no conv3d_fused kernel (implemented: {sorted(_cuda.implemented())})")
    if request.param == "wgmma" and not _cuda.wgmma_supported():
        pytest.skip(f"the wgmma conv needs compute capability 9.0 and a 9.0a build; this is "
                    f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}, built for "
                    f"{(_cuda.build_info() or {}).get('cuda_arch_list')}")
    with _cuda.use_conv_kernel(request.param):
        yield _cuda.conv3d_fused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_kernel_takes_the_calls_it_accepts(dtype):
    """Under "wgmma" the Hopper kernel really runs (launch counters) for channels-last x and for one
    input channel in any layout, and WMMA takes NCDHW x with several channels and fp32; each output
    tile width (8, 24, 64, 80, 128) and both gathers are checked against float64."""
    from ahnet_fast import _cuda

    if not _cuda.status()[0] or not _cuda.wgmma_supported():
        pytest.skip("needs the CUDA extension on a compute capability 9.0 GPU with a 9.0a build")
    cases = [  # (geometry, shape, cout, channels_last, expected kernel)
        (K331, (1, 1, 9, 7, 4), 1, False, "wgmma"),      # one channel, NCDHW: element gather, N tile 8
        (K331, (2, 80, 9, 7, 3), 20, True, "wgmma"),     # decoder 3x3x1 80->20: vector gather, N tile 24
        (K113, (2, 20, 5, 6, 8), 20, True, "wgmma"),     # decoder 1x1x3 20->20: element gather (Cin % 8 != 0)
        (K111, (1, 64, 6, 5, 4), 64, True, "wgmma"),     # N tile 64
        (K111, (1, 104, 6, 5, 4), 80, True, "wgmma"),    # N tile 80, K = 104: a partial chunk
        (K331_S2, (1, 128, 9, 9, 2), 130, True, "wgmma"),  # two N tiles of 128, stride 2
        (K331, (1, 16, 5, 5, 3), 20, False, "wmma"),     # NCDHW with 16 channels: WMMA
    ]
    with _cuda.use_conv_kernel("wgmma"):
        for geom, shape, cout, cl, expect in cases:
            (k, stride, padding) = geom
            x = rand(shape, dtype, cl)
            w = rand((cout, shape[1], *k), dtype, False, scale=0.3)
            before = _cuda.conv_launch_counts()
            y = _cuda.conv3d_fused(x, w, stride=stride, padding=padding)
            torch.cuda.synchronize()
            after = _cuda.conv_launch_counts()
            assert after[expect] == before[expect] + 1, (shape, cout, cl, expect, before, after)
            check_conv(y, x, w, stride=stride, padding=padding)
        x = rand((1, 16, 5, 5, 3), torch.float32, True)
        before = _cuda.conv_launch_counts()
        _cuda.conv3d_fused(x, rand((8, 16, 3, 3, 1), torch.float32, False), padding=(1, 1, 0))
        assert _cuda.conv_launch_counts()["wmma"] == before["wmma"] + 1  # fp32 stays on the FMA kernel


# ------------------------------------------------------------------------------------------ plain conv

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom,shape,cout", [
    (K331, (1, 5, 5, 7, 3), 7),          # element-wise A loads, 128x32 tile, partial everything
    (K331, (2, 16, 7, 5, 2), 40),        # vector A loads (channels-last), 64x64 tile
    (K331_S2, (2, 24, 9, 7, 2), 20),     # stride (2,2,1), odd H/W
    (K113, (1, 20, 3, 3, 8), 20),        # z taps, Cin not a multiple of 8
    (K113, (1, 32, 3, 5, 3), 33),        # Cout just past the 128x32 tile
    (K111_S2, (2, 5, 5, 5, 1), 7),       # D = 1
    (K111, (1, 80, 4, 3, 5), 130),       # three N tiles, three K chunks
])
def test_conv_plain(conv3d_fused, dtype, channels_last, geom, shape, cout):
    (k, stride, padding) = geom
    x = rand(shape, dtype, channels_last)
    w = rand((cout, shape[1], *k), dtype, False, scale=0.3)
    y = conv3d_fused(x, w, stride=stride, padding=padding)
    check_conv(y, x, w, stride=stride, padding=padding)
    assert layout_ok(y, channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_bias_in_x_dtype_and_strided_input(conv3d_fused, dtype):
    """bias in x's dtype is accepted; a non-dense x (every other slice along W) is read through
    its strides, no copy."""
    base = rand((2, 12, 5, 10, 4), dtype, True)
    x = base[:, :, :, ::2]
    w = rand((9, 12, 3, 3, 1), dtype, False, scale=0.3)
    b = vec(9).to(dtype)
    y = conv3d_fused(x, w, padding=(1, 1, 0), bias=b)
    check_conv(y, x, w, padding=(1, 1, 0), bias=b.float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_generic_kernel(conv3d_fused, dtype):
    """Any (kh, kw, kd) and stride work (correctness first): a (2,3,2) kernel, stride (1,2,2)."""
    x = rand((2, 6, 7, 9, 5), dtype, True)
    w = rand((80, 6, 2, 3, 2), dtype, False, scale=0.3)
    y = conv3d_fused(x, w, stride=(1, 2, 2), padding=(1, 0, 1))
    check_conv(y, x, w, stride=(1, 2, 2), padding=(1, 0, 1))


# ------------------------------------------------------------------------------------------ prologue

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom,cin", [(K331, 5), (K331, 16), (K113, 5), (K113, 24)])
@pytest.mark.parametrize("in_relu", [True, False])
def test_conv_prologue_bn_relu(conv3d_fused, dtype, channels_last, geom, cin, in_relu):
    """Pre-activation BN(+ReLU) on load; a large positive shift makes padding-before-transform
    (relu(0*s + shift) != 0) visibly wrong, so this proves padding is applied after it."""
    (k, stride, padding) = geom
    x = rand((2, cin, 3, 5, 3), dtype, channels_last, shift=0.2)
    w = rand((7, cin, *k), dtype, False, scale=0.3)
    isc, ish = vec(cin), vec(cin, shift=1.0)
    kw = dict(stride=stride, padding=padding, in_scale=isc, in_shift=ish, in_relu=in_relu)
    y = conv3d_fused(x, w, **kw)
    check_conv(y, x, w, **kw)
    assert layout_ok(y, channels_last)
    # padding before the transform would differ by the border taps of relu(shift)
    wrong = compose_conv(F.pad(x.double(), (padding[2],) * 2 + (padding[1],) * 2 + (padding[0],) * 2), w,
                         torch.float64, stride=stride, in_scale=isc, in_shift=ish, in_relu=in_relu)
    assert (wrong - y.double()).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ epilogue

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool", ["before_affine", "after_affine"])
@pytest.mark.parametrize("cin,cout", [(5, 7), (16, 40)])
def test_conv_epilogue_pool_affine_residual_relu(conv3d_fused, dtype, channels_last, zpool, cin, cout):
    """Folded-BN epilogue with a z-pool (odd conv depth 5 -> pooled 2: the tail slice is dropped);
    channel 0 has a negative scale, where max-then-affine and affine-then-max differ (a kernel
    that folds the scale before the max fails this); the residual is in the other layout."""
    x = rand((2, cin, 3, 5, 5), dtype, channels_last)
    w = rand((cout, cin, 3, 3, 1), dtype, False, scale=0.3)
    b, osc, osh = vec(cout), vec(cout), vec(cout)
    osc[0] = -2.0
    osc[1] = 0.5
    res = rand((2, cout, 3, 5, 2), dtype, not channels_last)
    kw = dict(padding=(1, 1, 0), bias=b, out_scale=osc, out_shift=osh, zpool=zpool, residual=res, relu=True)
    y = conv3d_fused(x, w, **kw)
    assert y.shape == (2, cout, 3, 5, 2)
    check_conv(y, x, w, **kw)
    assert layout_ok(y, channels_last)
    other = "after_affine" if zpool == "before_affine" else "before_affine"
    a = compose_conv(x, w, torch.float64, **dict(kw, relu=False, residual=None))[:, 0]
    b2 = compose_conv(x, w, torch.float64, **dict(kw, zpool=other, relu=False, residual=None))[:, 0]
    assert (a - b2).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [
    dict(bias=True), dict(out_scale=True), dict(out_shift=True), dict(relu=True), dict(residual=True),
    dict(out_scale=True, out_shift=True, relu=True),
])
def test_conv_each_epilogue_piece_alone(conv3d_fused, dtype, opts):
    """Each optional piece on its own (missing pieces must be exact identities)."""
    x = rand((1, 8, 5, 3, 4), dtype, True)
    w = rand((11, 8, 1, 1, 3), dtype, False, scale=0.3)
    kw = dict(padding=(0, 0, 1))
    if opts.get("bias"):
        kw["bias"] = vec(11)
    if opts.get("out_scale"):
        kw["out_scale"] = vec(11)
    if opts.get("out_shift"):
        kw["out_shift"] = vec(11)
    if opts.get("residual"):
        kw["residual"] = rand((1, 11, 5, 3, 4), dtype, True)
    kw["relu"] = bool(opts.get("relu"))
    check_conv(conv3d_fused(x, w, **kw), x, w, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_pool_shortcut_odd_depth_and_stride(conv3d_fused, dtype):
    """1x1x1 stride (2,2,1) shortcut conv -> z-pool -> BN with an odd output depth (floor)."""
    x = rand((1, 6, 5, 3, 3), dtype, True)
    w = rand((7, 6, 1, 1, 1), dtype, False, scale=0.3)
    osc, osh = vec(7), vec(7)
    kw = dict(stride=(2, 2, 1), zpool="before_affine", out_scale=osc, out_shift=osh)
    y = conv3d_fused(x, w, **kw)
    assert y.shape == (1, 7, 3, 2, 1)
    check_conv(y, x, w, **kw)


def test_conv_pool_ties_and_nan_like_torch(conv3d_fused):
    """The pair rule is torch's: first element wins ties, NaN propagates (1x1x1 identity conv)."""
    x = torch.tensor([1.0, 1.0, 2.0, float("nan"), -1.0, 3.0, float("nan"), 0.0], device=DEV).view(1, 1, 1, 1, 8)
    w = torch.ones(1, 1, 1, 1, 1, device=DEV)
    for zpool in ("before_affine", "after_affine"):
        y = conv3d_fused(x, w, zpool=zpool, out_scale=torch.full((1,), -1.0, device=DEV))
        ref = compose_conv(x, w, torch.float32, zpool=zpool, out_scale=torch.full((1,), -1.0, device=DEV))
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(ref))


# ------------------------------------------------------------------------------------------ out slices

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin", [3, 16])
def test_conv_out_channel_slice(conv3d_fused, dtype, channels_last, cin):
    """Dense-block concat: write into channels [cin, cin+7) of a NaN-poisoned buffer; the input is
    itself a channel slice of the same buffer (the real use), the rest stays untouched."""
    fmt = CL if channels_last else torch.contiguous_format
    buf = torch.full((2, cin + 12, 3, 5, 2), float("nan"), device=DEV, dtype=dtype).contiguous(memory_format=fmt)
    src = rand((2, cin, 3, 5, 2), dtype, channels_last)
    buf[:, :cin] = src
    x = buf[:, :cin]
    w = rand((7, cin, 3, 3, 1), dtype, False, scale=0.3)
    isc, ish = vec(cin), vec(cin)
    view = conv3d_fused(x, w, padding=(1, 1, 0), in_scale=isc, in_shift=ish, out=buf, out_channel_offset=cin)
    assert view.data_ptr() == buf[:, cin:cin + 7].data_ptr()
    check_conv(buf[:, cin:cin + 7], src, w, padding=(1, 1, 0), in_scale=isc, in_shift=ish)
    assert torch.equal(buf[:, :cin], src)
    assert torch.isnan(buf[:, cin + 7:]).all()


# ------------------------------------------------------------------------------------------ stats

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("zpool", ["none", "before_affine"])
@pytest.mark.parametrize("cout", [7, 40])
def test_conv_stats(conv3d_fused, dtype, channels_last, zpool, cout):
    """Training BN statistics from the epilogue: of acc+bias (after a before-affine pool), merged
    over many M tiles (the last one partial), with a residual/ReLU in the same epilogue (they do
    not enter the statistics); bitwise reproducible."""
    x = rand((2, 5, 19, 17, 6), dtype, channels_last, shift=3.0)   # offset mean: stable merge
    w = rand((cout, 5, 3, 3, 1), dtype, False, scale=0.3)
    b = vec(cout, shift=5.0)
    kw = dict(padding=(1, 1, 0), bias=b, zpool=zpool)
    dout = 3 if zpool != "none" else 6
    res = rand((2, cout, 19, 17, dout), dtype, channels_last)
    y, (mean, var) = conv3d_fused(x, w, compute_stats=True, residual=res, relu=True, **kw)
    check_conv(y, x, w, residual=res, relu=True, **kw)
    ref = compose_conv(x, w, torch.float64, **kw)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (cout,)
    vr, mr = torch.var_mean(ref, dim=(0, 2, 3, 4), unbiased=False)
    if dtype == torch.float32:
        assert rel(mean, mr) <= 1e-5 and rel(var, vr) <= 1e-5
    else:
        vt, mt = torch.var_mean(compose_conv(x, w, dtype, **kw).float(), dim=(0, 2, 3, 4), unbiased=False)
        assert rel(mean, mr) <= 2 * rel(mt, mr) + 1e-6
        assert rel(var, vr) <= 2 * rel(vt, vr) + 1e-6
    _, (mean2, var2) = conv3d_fused(x, w, compute_stats=True, residual=res, relu=True, **kw)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)


# ------------------------------------------------------------------------------------------ errors

def test_conv_errors_name_the_op_and_shapes(conv3d_fused):
    x = torch.randn(1, 4, 3, 3, 2, device=DEV)
    w = torch.randn(5, 4, 3, 3, 1, device=DEV)
    with pytest.raises(RuntimeError, match=r"conv3d_fused.*weight dtype.*must match x dtype"):
        conv3d_fused(x, w.half())
    with pytest.raises(RuntimeError, match=r"conv3d_fused.*weight expects 3 input channels but x has 4"):
        conv3d_fused(x, torch.randn(5, 3, 3, 3, 1, device=DEV))
    with pytest.raises(RuntimeError, match="in_scale and in_shift must be given together"):
        conv3d_fused(x, w, in_scale=torch.ones(4, device=DEV))
    with pytest.raises(RuntimeError, match=r"out_scale must be float32"):
        conv3d_fused(x, w, out_scale=torch.ones(5, device=DEV, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"in_scale must have shape \(4,\)"):
        conv3d_fused(x, w, in_scale=torch.ones(5, device=DEV), in_shift=torch.ones(5, device=DEV))
    with pytest.raises(ValueError, match="compute_stats"):
        conv3d_fused(x, w, padding=(1, 1, 0), out_scale=torch.ones(5, device=DEV), compute_stats=True)
    with pytest.raises(ValueError, match="zpool"):
        conv3d_fused(x, w, zpool="max")
    with pytest.raises(RuntimeError, match=r"too small for kernel"):
        conv3d_fused(x, torch.randn(5, 4, 5, 5, 1, device=DEV))
    with pytest.raises(RuntimeError, match=r"residual has shape"):
        conv3d_fused(x, w, padding=(1, 1, 0), residual=torch.randn(1, 5, 3, 3, 1, device=DEV))


# ------------------------------------------------------------------------------------------ AH-Net sizes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom,shape,cout", [
    (K331, (2, 80, 96, 96, 32), 20),       # decoder 3x3x1 80 -> 20
    (K113, (2, 20, 96, 96, 32), 20),       # decoder 1x1x3 20 -> 20
    (K331, (2, 64, 48, 48, 16), 64),       # encoder 3x3x1 64 -> 64
    (K331_S2, (1, 128, 64, 64, 16), 256),  # downsampling encoder conv
    (K111, (1, 256, 48, 48, 16), 64),
])
def test_conv_ahnet_shapes(conv3d_fused, dtype, channels_last, geom, shape, cout):
    (k, stride, padding) = geom
    x = rand(shape, dtype, channels_last)
    w = rand((cout, shape[1], *k), dtype, False, scale=(shape[1] * k[0] * k[1] * k[2]) ** -0.5)
    y = conv3d_fused(x, w, stride=stride, padding=padding)
    check_conv(y, x, w, stride=stride, padding=padding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv_every_fusion_at_size_and_agrees_with_triton(conv3d_fused, dtype):
    """Every fusion at a real size (prologue, pool before/after with negative scales, residual,
    ReLU, channel-slice output, stats), and the Triton launcher within the same tolerance."""
    from ahnet_fast.kernels.conv import conv3d_fused as triton_conv

    x = rand((2, 64, 48, 48, 16), dtype, True, shift=0.5)
    w = rand((64, 64, 3, 3, 1), dtype, False, scale=(64 * 9) ** -0.5)
    isc, ish = vec(64), vec(64)
    b, osc, osh = vec(64), vec(64), vec(64)
    res = rand((2, 64, 48, 48, 8), dtype, True)
    for zpool in ("before_affine", "after_affine"):
        kw = dict(padding=(1, 1, 0), bias=b, in_scale=isc, in_shift=ish, out_scale=osc, out_shift=osh,
                  zpool=zpool, residual=res, relu=True)
        y = conv3d_fused(x, w, **kw)
        ref = check_conv(y, x, w, **kw)
        yt = triton_conv(x, w, **kw)
        bound = 1e-5 if dtype == torch.float32 else 2 * rel(compose_conv(x, w, dtype, **kw), ref)
        assert rel(y, yt.double()) <= 2 * bound
    buf = torch.full((2, 100, 48, 48, 8), float("nan"), device=DEV, dtype=dtype).contiguous(memory_format=CL)
    kw = dict(padding=(1, 1, 0), bias=b, zpool="before_affine")
    _, (mean, var) = conv3d_fused(x, w, out=buf, out_channel_offset=30, compute_stats=True, **kw)
    ref = check_conv(buf[:, 30:94], x, w, **kw)
    assert torch.isnan(buf[:, :30]).all() and torch.isnan(buf[:, 94:]).all()
    vr, mr = torch.var_mean(ref, dim=(0, 2, 3, 4), unbiased=False)
    assert rel(mean, mr) <= 1e-3 and rel(var, vr) <= 1e-3


def test_conv_int64_offsets(conv3d_fused):
    """An input past 2^31 elements (~9 GB) takes 64-bit offsets all the way to the last voxel."""
    x = torch.randn((1, 512, 512, 130, 64), device=DEV, dtype=torch.bfloat16).permute(0, 4, 1, 2, 3)
    w = rand((16, 64, 1, 1, 1), torch.bfloat16, False, scale=0.125)
    assert x.numel() > 2**31
    y = conv3d_fused(x, w)
    ref = F.conv3d(x[:, :, -3:, :, -2:].float(), w.float())
    got = y[:, :, -3:, :, -2:].float()
    assert rel(got, ref) <= 1e-2
