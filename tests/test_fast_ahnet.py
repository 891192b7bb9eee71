"""The drop-in fast AH-Net: parity with MONAI and the reference, conversions, memory options.

CPU runs use the reference backend of the fused ops (what `auto` picks for CPU tensors) for
the model-level parity checks, and the Triton interpreter for one small model to prove the
fused kernels are really used. The full configurations run on a GPU (marker `gpu`).
"""
from __future__ import annotations

import copy

import pytest
import torch

import ahnet_fast
from ahnet_fast.models.fast import FAST_BLOCKS, FastAHNet
from ahnet_fast.ops import use_backend
from ahnet_fast.reference import AHNet as ReferenceAHNet
from ahnet_fast.train.presets import PRESETS

monai_nets = pytest.importorskip("monai.networks.nets")

SMALL = dict(layers=(1, 1, 1, 1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _grad_errors(ref: torch.nn.Module, fast: torch.nn.Module) -> dict[str, float]:
    """Per-parameter gradient error relative to the largest gradient of the whole model.

    Some gradients are analytically ~0 (a bias in front of a training-mode BatchNorm): their
    relative error alone is noise, so the scale is the model's largest gradient.
    """
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    out = {}
    for (name, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        out[name] = (p.grad - q.grad).abs().max().item() / scale
    return out


def _assert_same_grads(ref: torch.nn.Module, fast: torch.nn.Module, y_ref: torch.Tensor, y_fast: torch.Tensor,
                       tol: float) -> None:
    """Backpropagate ``mean(y**2)`` through both models; every parameter gradient within ``tol``
    (:func:`_grad_errors`)."""
    y_ref.square().mean().backward()
    y_fast.square().mean().backward()
    errs = _grad_errors(ref, fast)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"grad of {worst} off by {errs[worst]:.2e}"


def _fresh_input(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def test_top_level_ahnet_is_the_fast_model():
    assert ahnet_fast.AHNet is FastAHNet
    net = ahnet_fast.AHNet(**SMALL, psp_block_num=1)
    assert type(net.layer1[0]) is FAST_BLOCKS.bottleneck


PARITY_CONFIGS = [
    dict(SMALL, in_channels=2, out_channels=3, psp_block_num=1, upsample_mode="trilinear"),
    dict(SMALL, psp_block_num=2, upsample_mode="transpose"),
    dict(SMALL, spatial_dims=2, in_channels=3, out_channels=2, psp_block_num=1, upsample_mode="bilinear"),
]


def _monai_and_fast(cfg: dict, seed: int):
    torch.manual_seed(seed)
    monai = monai_nets.AHNet(**cfg)
    fast = FastAHNet(**cfg)
    fast.load_state_dict(monai.state_dict(), strict=True)
    sd = cfg.get("spatial_dims", 3)
    x = _fresh_input((2, cfg.get("in_channels", 1), 32, 32, 32)[: 2 + sd])
    return monai, fast, x


@pytest.mark.parametrize("cfg", PARITY_CONFIGS, ids=["3d-trilinear-psp1-2in3out", "3d-transpose-psp2", "2d-bilinear-psp1"])
def test_parity_with_monai_eval_float32(cfg):
    """Weights loaded from MONAI; float32 (TF32 off), eval mode: outputs and every parameter
    gradient within 1e-4 of MONAI's."""
    monai, fast, x = _monai_and_fast(cfg, seed=1)
    monai.eval()
    fast.eval()
    y_m, y_f = monai(x.clone()), fast(x.clone())
    assert torch.isfinite(y_f).all()
    assert _rel(y_f, y_m) <= 1e-4
    _assert_same_grads(monai, fast, y_m, y_f, 1e-4)


def test_parity_with_monai_training_float32():
    """Training mode, float32, weights from MONAI. Batch statistics at the 1x1x1..4x4x4 deep
    levels amplify rounding: MONAI's own float32 result is ~4e-4 from float64 here, so two
    float32 implementations cannot agree to 1e-4. The check is against the float64 oracle:
    ours within 1e-4 of it, or no further than 1.5x MONAI's float32 error - for the output,
    every parameter gradient and every updated running statistic."""
    cfg = PARITY_CONFIGS[0]
    monai, fast, x = _monai_and_fast(cfg, seed=2)
    oracle = copy.deepcopy(monai).double()
    for net in (monai, fast, oracle):
        net.train()
    y_m, y_f, y_o = monai(x.clone()), fast(x.clone()), oracle(x.double())
    for y in (y_m, y_f, y_o):
        y.square().mean().backward()
    err_f, err_m = _rel(y_f.double(), y_o), _rel(y_m.double(), y_o)
    assert err_f <= max(1e-4, 1.5 * err_m), (err_f, err_m)
    g_f, g_m = _grad_errors(oracle, fast), _grad_errors(oracle, monai)
    bad = {k: (g_f[k], g_m[k]) for k in g_f if g_f[k] > max(1e-4, 1.5 * g_m[k])}
    assert not bad, bad
    for (name, o), (_, m), (_, f) in zip(oracle.named_buffers(), monai.named_buffers(), fast.named_buffers()):
        if o.is_floating_point():
            e_f, e_m = _rel(f.double(), o), _rel(m.double(), o)
            assert e_f <= max(1e-4, 1.5 * e_m), (name, e_f, e_m)
        else:
            assert torch.equal(f, o), name


def test_parity_with_reference_float64_every_psp_and_mode():
    """Same topology through the fused ops (reference backend) in float64: 1e-10 relative.
    (Every psp_block_num 0..4 against MONAI is covered by the reference model's tests; the
    block sets differ only in forward, so three settings cover the fused forwards.)"""
    for psp, mode in ((0, "nearest"), (1, "transpose"), (2, "trilinear")):
        torch.manual_seed(2)
        ref = ReferenceAHNet(**SMALL, psp_block_num=psp, upsample_mode=mode).double().eval()
        fast = FastAHNet.from_monai(ref)
        x = _fresh_input((1, 1, 32, 32, 32), torch.float64)
        assert _rel(fast(x), ref(x)) <= 1e-10, (psp, mode)


def test_cpu_small_model_trains_like_the_reference_float64():
    """The ``cpu-small`` preset's model (4 classes; nearest upsampling, one PSP branch) in training
    mode, float64: output, every parameter gradient and every updated running statistic within
    1e-9 of the reference model (float32 rounding at the 1x1x1 deep levels would hide a real
    difference below MONAI's own float32 error, so the comparison is made in float64)."""
    torch.manual_seed(3)
    ref = ReferenceAHNet(**PRESETS["cpu-small"]["model_config"], out_channels=4).double().train()
    fast = FastAHNet.from_monai(ref).double().train()
    x = _fresh_input((2, 1, 32, 32, 32), torch.float64)
    y_r, y_f = ref(x), fast(x)
    assert _rel(y_f, y_r) <= 1e-9
    _assert_same_grads(ref, fast, y_r, y_f, 1e-9)
    for (name, r), (_, f) in zip(ref.named_buffers(), fast.named_buffers()):
        if r.is_floating_point():
            assert _rel(f, r) <= 1e-9, name
        else:
            assert torch.equal(f, r), name


def test_from_monai_and_to_reference_round_trip():
    torch.manual_seed(3)
    monai = monai_nets.AHNet(**SMALL, in_channels=2, out_channels=4, psp_block_num=2, upsample_mode="nearest")
    monai.eval()
    fast = FastAHNet.from_monai(monai)
    assert not fast.training
    assert fast._config() == dict(
        layers=(1, 1, 1, 1), spatial_dims=3, in_channels=2, out_channels=4, psp_block_num=2, upsample_mode="nearest"
    )
    assert list(fast.state_dict()) == list(monai.state_dict())
    ref = fast.to_reference()
    assert type(ref) is ReferenceAHNet
    for (k, a), (_, b) in zip(monai.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    x = _fresh_input((1, 2, 32, 32, 32))
    assert _rel(fast(x), monai(x)) <= 1e-4


def test_state_dict_keys_equal_monai_default_config():
    fast = FastAHNet()
    monai = monai_nets.AHNet()
    a, b = fast.state_dict(), monai.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert sum(p.numel() for p in fast.parameters()) == 38_133_768


def test_activation_checkpointing_same_grads_and_single_running_stat_update():
    # 2D keeps it cheap on CPU: the checkpointed stages and the BN bookkeeping are the same
    torch.manual_seed(4)
    plain = FastAHNet(**SMALL, spatial_dims=2, psp_block_num=1, upsample_mode="bilinear").train()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    x = _fresh_input((2, 1, 64, 64))
    plain(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    errs = _grad_errors(plain, ckpt)
    assert max(errs.values()) <= 1e-5
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name  # updated once, not twice


def test_autocast_bf16_within_twice_monai_error():
    """Under CPU autocast (bf16) the fast model's error against float64 is at most 2x MONAI's."""
    torch.manual_seed(5)
    monai = monai_nets.AHNet(**SMALL, spatial_dims=2, psp_block_num=1, upsample_mode="bilinear").train()
    fast = FastAHNet.from_monai(monai)
    oracle = copy.deepcopy(monai).double()
    x = _fresh_input((2, 1, 64, 64))
    want = oracle(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_m = monai(x)
        y_f = fast(x)
    assert y_f.dtype == torch.bfloat16
    assert torch.isfinite(y_f.float()).all()
    err_m = _rel(y_m.double(), want)
    err_f = _rel(y_f.double(), want)
    assert err_f <= 2 * err_m + 1e-3, (err_f, err_m)
    y_f.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)


def test_dense_block_writes_into_one_buffer_in_inference():
    torch.manual_seed(6)
    fast = FastAHNet(**SMALL, psp_block_num=0, upsample_mode="nearest").eval()
    ref = fast.to_reference().eval()
    x = _fresh_input((1, 64, 8, 8, 8))
    with torch.no_grad():
        got = fast.dense3(x)
        want = ref.dense3(x)
    assert got.shape == (1, 124, 8, 8, 8)
    assert _rel(got, want) <= 1e-5


@pytest.mark.interpreter
def test_dense_block_inference_reads_channel_padded_buffers():
    """bf16 channels-last inference on the fused path: the concat buffer (124 -> 128 channels)
    and each layer's 20-channel tensors live in channel-padded buffers, the convs reading
    them load whole 16-byte vectors (XPAD), bn2+ReLU runs in the bottleneck conv's epilogue
    (the 3x3x1 without a prologue), the outputs keep their logical shapes, and the block
    matches the reference module (float64) within twice a bf16 torch run's error."""
    from ahnet_fast.kernels.aot import record_specs

    torch.manual_seed(8)
    fast = FastAHNet(**SMALL, psp_block_num=0, upsample_mode="nearest").eval()
    ref = fast.to_reference().eval()
    x = _fresh_input((1, 64, 6, 5, 4)).to(memory_format=torch.channels_last_3d)
    fast16 = fast.to(torch.bfloat16).use_gpu_weight_layout()
    with torch.no_grad():
        want = ref.double().dense3(x.double())
        torch_bf16 = ref.to(torch.bfloat16).dense3(x.to(torch.bfloat16))
        with use_backend("triton"):
            got = fast16.dense3(x.to(torch.bfloat16))
            with record_specs() as log:
                fast16.dense3(x.to(torch.bfloat16))
    assert got.shape == (1, 124, 6, 5, 4) and got.stride(1) == 1 and got.stride(-1) == 128
    assert _rel(got.double(), want) <= 2 * _rel(torch_bf16.double(), want) + 1e-3
    convs = [dict(s.constexprs) for s, _g, _i in log.launches if s.kernel == "_conv_kernel"]
    padded = [c for c in convs if c["XPAD"]]
    # per layer: the 1x1x3 and last 1x1x1 read 20-in-24 buffers; layer 2 reads 84 channels of
    # the 128-channel concat buffer (64 and 104 are whole vectors already)
    assert len(convs) == 12 and len(padded) == 7 and all(c["XV"] == 8 for c in padded)
    # bn2 + ReLU folded into the bottleneck 1x1x1's epilogue: the 3x3x1 has no prologue
    k331 = [c for c in convs if c["KH"] == 3]
    bottleneck = [c for c in convs if c["KH"] == 1 and c["KD"] == 1 and c["HAS_OSC"]]
    assert len(k331) == 3 and not any(c["HAS_PRO"] for c in k331)
    assert len(bottleneck) == 3 and all(c["HAS_PRO"] and c["HAS_OSH"] and c["RELU"] for c in bottleneck)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dense_block_inference_fold_float32(backend):
    """The same inference forms (bn2+ReLU in the bottleneck's epilogue, the 3x3x1 on the
    activation) in float32 on a custom-op backend: the reference model's numbers to 1e-5."""
    torch.manual_seed(9)
    fast = FastAHNet(**SMALL, psp_block_num=0, upsample_mode="nearest").eval()
    for m in fast.modules():   # non-trivial running statistics, so that the folded affine matters
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    ref = fast.to_reference().eval()
    x = _fresh_input((1, 64, 6, 5, 4)).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        want = ref.double().dense3(x.double())
        with use_backend(backend):
            got = fast.dense3(x)
    assert _rel(got.double(), want) <= 1e-5


@pytest.fixture
def conv_launch_log(monkeypatch):
    """Records the weight shape of every call of the Triton conv launcher (wrapped where the
    triton backend keeps its loaded launchers)."""
    from ahnet_fast.ops import triton_backend

    launchers = triton_backend._pipe.launchers()
    assert launchers is not None and launchers.conv3d_fused is not None, triton_backend._pipe.load_error()
    calls: list[tuple[int, ...]] = []
    real = launchers.conv3d_fused

    def counting(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(launchers, "conv3d_fused", counting)
    return calls


@pytest.mark.interpreter
def test_fused_triton_kernels_really_run_whole_model(conv_launch_log):
    """A whole (2D, so the interpreter stays fast) fast AH-Net under the explicit triton
    backend, which raises instead of falling back: every encoder/decoder conv reaches the
    Triton conv launcher, and the result matches the reference model."""
    torch.manual_seed(7)
    fast = FastAHNet(**SMALL, spatial_dims=2, psp_block_num=0, upsample_mode="nearest").eval()
    ref = fast.to_reference().eval()
    x = _fresh_input((1, 1, 32, 32))
    with torch.no_grad(), use_backend("triton"):
        y = fast(x)
    with torch.no_grad():
        want = ref(x)
    assert _rel(y, want) <= 1e-4
    from ahnet_fast.ops._fused import FUSED_KERNELS

    fused = [
        tuple(m.weight.shape) + (1,)
        for name, m in fast.named_modules()
        if isinstance(m, torch.nn.Conv2d)
        and not name.startswith(("psp", "conv1"))
        and tuple(m.weight.shape[2:]) + (1,) in FUSED_KERNELS
    ]
    # every conv with a fused kernel shape (in 2D MONAI's "3x3x1"/"1x1x3" decoder convs are
    # (3,1)/(1,3) and take torch's conv inside the op), but the 2D stem and the PSP's
    assert len(fused) >= 20
    assert sorted(conv_launch_log) == sorted(fused)


@pytest.mark.interpreter
def test_fused_triton_bottleneck_with_z_pools_trains(conv_launch_log):
    """The 3D stride-2 bottleneck (z-pool before BN on the shortcut, after BN on the main
    path, residual and ReLU in the epilogue) in training mode under the Triton interpreter:
    output, gradients and running statistics equal the reference block's."""
    from ahnet_fast.models.ahnet import Bottleneck3x3x1

    torch.manual_seed(8)
    ref = ReferenceAHNet(**SMALL, psp_block_num=0, upsample_mode="nearest").layer2[0]
    assert isinstance(ref, Bottleneck3x3x1) and ref.downsample is not None
    # a narrow stand-in of layer2[0] (same structure: 1x1x1, 3x3x1 /(2,2,1), 1x1x1, shortcut)
    ref = _narrow_bottleneck(Bottleneck3x3x1)
    fast = _narrow_bottleneck(FAST_BLOCKS.bottleneck)
    fast.load_state_dict(ref.state_dict())
    x = _fresh_input((2, 12, 6, 5, 4))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_r = ref(xr)
    with use_backend("triton"):
        y_f = fast(xf)
        y_f.square().mean().backward()
    y_r.square().mean().backward()
    assert y_f.shape == y_r.shape == (2, 12, 3, 3, 2)
    assert _rel(y_f, y_r) <= 1e-5
    assert _rel(xf.grad, xr.grad) <= 1e-5
    for (name, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert _rel(q.grad, p.grad) <= 1e-4, name
    for (name, a), (_, b) in zip(ref.named_buffers(), fast.named_buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    assert len(conv_launch_log) == 4  # conv1, conv2, conv3 and the shortcut


def _narrow_bottleneck(block_type):
    """A stride-(2,2,1) Bottleneck3x3x1 with 12 -> 3 -> 12 channels and MONAI's shortcut."""
    torch.manual_seed(9)
    downsample = torch.nn.Sequential(
        torch.nn.Conv3d(12, 12, kernel_size=1, stride=(2, 2, 1), bias=False),
        torch.nn.MaxPool3d(kernel_size=(1, 1, 2), stride=(1, 1, 2)),
        torch.nn.BatchNorm3d(12),
    )
    return block_type(3, 12, 3, (2, 2, 1), downsample)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_gpu_full_config_parity(dtype, layout):
    torch.manual_seed(8)
    monai = monai_nets.AHNet(psp_block_num=3, upsample_mode="trilinear").cuda().train()
    fast = FastAHNet.from_monai(monai)
    x = torch.randn(2, 1, 96, 96, 64, device="cuda")
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    oracle = copy.deepcopy(monai).double()
    want = oracle(x.double())
    with use_backend("triton"):
        y_f = fast.to(dtype)(x.to(dtype))
    y_m = monai.to(dtype)(x.to(dtype))
    err_f, err_m = _rel(y_f.double(), want), _rel(y_m.double(), want)
    if dtype == torch.float32:
        assert err_f <= 1e-4
    else:
        assert err_f <= 2 * err_m
    assert y_f.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last_3d")


@pytest.mark.gpu
def test_gpu_eval_forward_compiles_and_captures_in_cuda_graph():
    fast = FastAHNet(psp_block_num=3, upsample_mode="trilinear").cuda().eval().to(torch.bfloat16)
    x = torch.randn(1, 1, 96, 96, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = fast(x)
        compiled = torch.compile(fast, fullgraph=True)
        assert _rel(compiled(x).double(), want.double()) <= 1e-2
        g = torch.cuda.CUDAGraph()
        static_x = x.clone()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            fast(static_x)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            static_y = fast(static_x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, want)
