"""Bounded compiles: a fixed tile table instead of autotuning, kernels independent of the volume size.

The census records every Triton launch of an AH-Net training step on the CPU without running it
(``kernels.aot.record_specs``: the launchers pick their GPU tiles, each launch is reduced to
Triton's compile key -- constexprs, argument types, the "== 1" / "% 16" specialisations,
num_warps/num_stages).  Distinct keys are distinct compiles on a GPU.  Before this table, the
conv autotuner alone made 58 keys and 152 config benchmarks for one forward, and re-tuned for
every new input size.

(The census uses this package's own recorder, kernels.aot.record_specs, rather than
ahnet_fast.launches.record_launches: it needs Triton's specialisation of each launch, which the
general launch log does not keep.)
"""
from __future__ import annotations

import collections

import pytest
import torch

import ahnet_fast
from ahnet_fast import AHNet
from ahnet_fast.kernels import conv as kconv
from ahnet_fast.kernels.aot import KernelSpec, record_specs
from ahnet_fast.ops._util import gpu_gradient_layouts

# 38 before split-K; a split conv compiles its K-slice form beside the whole one (4 keys here) and
# the split-K reduction one variant per epilogue (2 here): 44
MAX_COMPILES_TRAIN_STEP = 44


def _train_step_census(shape, channels_last=False):
    torch.manual_seed(0)
    # conv weights channels_last_3d: the layout a model on a GPU has (what a GPU compiles)
    model = AHNet(psp_block_num=3, upsample_mode="trilinear").to(torch.bfloat16).use_gpu_weight_layout()
    x = torch.randn(shape, dtype=torch.bfloat16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    model.train()
    with ahnet_fast.use_backend("triton"), gpu_gradient_layouts(), record_specs() as log:
        model(x).float().sum().backward()
    return log


@pytest.fixture(scope="module")
def census_small():
    return _train_step_census((1, 1, 64, 64, 64))


def _summary(specs):
    return dict(collections.Counter(s.kernel for s in specs))


def test_train_step_compiles_at_most_44():
    # the smallest valid input: depth 1 at the deepest level, where torch itself hands some
    # tensors over in another layout (more variants, not fewer).  A 1-channel input is the same
    # tensor in both layouts, so one census covers both.
    log = _train_step_census((1, 1, 64, 64, 32))
    distinct = log.distinct()
    assert len(log.launches) > 500          # the whole step was recorded (795 launches)
    assert 0 < len(distinct) <= MAX_COMPILES_TRAIN_STEP, _summary(distinct)
    conv = [s for s in distinct if s.kernel == "_conv_kernel"]
    assert 5 <= len(conv) <= 20, _summary(distinct)


def test_compiles_do_not_depend_on_the_volume_size(census_small):
    # another valid size (models/validation.py: H, W >= 64 and multiples of 32, D multiple of 32):
    # every layer's H, and so every size/stride argument, changes.  Both sizes keep every axis
    # > 1 down to the deepest level: at size 1 torch may hand a tensor over in the other layout
    # (a gradient of a (..., 1) tensor), which is torch's choice, not a kernel specialisation.
    other = _train_step_census((1, 1, 96, 64, 64))
    assert len(other.launches) == len(census_small.launches)
    assert set(other.distinct()) == set(census_small.distinct())


def test_launcher_uses_the_table(census_small):
    """Every conv launch of the census carries exactly the config conv_configs returns for it."""
    n = 0
    for spec, grid, ints in census_small.launches:
        if spec.kernel != "_conv_kernel":
            continue
        cx = dict(spec.constexprs)
        val = {**ints, **{k: v for k, v in cx.items() if isinstance(v, int)}}
        (cfg,) = kconv.conv_configs(val["Cin"], val["Cout"], cx["KH"], cx["KW"], cx["KD"],
                                    (val["STH"], val["STW"], val["STD"]), torch.bfloat16, cx["XV"] > 0,
                                    cx["POOL"], cx["HAS_PRO"], cx["STATS"], cx["HAS_RES"], bool(cx["SPLIT"]))
        assert {k: cx[k] for k in cfg.kwargs} == cfg.kwargs
        assert (spec.num_warps, spec.num_stages) == (cfg.num_warps, cfg.num_stages)
        tiles = (-(-val["M"] // cfg.kwargs["BLOCK_M"]), -(-val["Cout"] // cfg.kwargs["BLOCK_N"]))
        k_iters = cx["KH"] * cx["KW"] * cx["KD"] * -(-val["Cin"] // cfg.kwargs["BLOCK_K"])
        split = kconv.split_k_plan(tiles[0] * tiles[1], k_iters, cfg.kwargs["BLOCK_K"], kconv.DEFAULT_NUM_SMS,
                                   val["M"] * val["Cout"] * (2 if cx["POOL"] else 1))
        # a split conv's K-slice launch has a third grid axis; an unsplit one has none
        assert grid == (tiles if split == 1 else (*tiles, split)), (grid, tiles, split)
        assert bool(cx["SPLIT"]) == (split > 1)
        n += 1
    assert n >= 118     # every fused conv of the step (118 encoder/decoder convs, + the stem)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pool", [0, 1, 2])
def test_conv_configs_is_a_small_pure_table(dtype, channels_last, pool):
    seen = set()
    for cin in (1, 20, 64, 80, 84, 127, 256, 1024, 2048):
        for cout in (1, 20, 64, 80, 256, 2048):
            for k in ((3, 3, 1), (1, 1, 3), (1, 1, 1)):
                args = (cin, cout, *k, (1, 1, 1), dtype, channels_last, pool, cin % 2 == 0, pool != 2, cout > 64)
                cfgs = kconv.conv_configs(*args)
                assert len(cfgs) == 1                      # no runtime search
                again = kconv.conv_configs(*args)          # pure
                c = cfgs[0]
                assert (c.kwargs, c.num_warps, c.num_stages) == (again[0].kwargs, again[0].num_warps, again[0].num_stages)
                bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
                # fp32 with the statistics epilogue, or the prologue over several taps, keeps to 32
                # output channels a tile (spills at 64)
                narrow = args[10] or (args[9] and k != (1, 1, 1))
                cap = (32 if narrow else 64) if dtype == torch.float32 else 128
                if cout <= kconv.FMA_MAX_COUT:
                    # a small head: an exact power-of-two tile on FMAs, no 16-wide MMA
                    assert bn == kconv.next_pow2(cout) and min(bm, bk) >= 16 and bk <= 64
                else:
                    assert min(bm, bn, bk) >= 16 and bn >= min(max(cout, 16), cap) and bk <= 64
                if dtype == torch.float32:
                    assert bk <= 32
                # fp32 accumulators per thread stay <= 64 registers (two with a z-pool)
                assert bm * bn * (2 if pool else 1) // (32 * c.num_warps) <= 64
                seen.add((bm, bn, bk, c.num_warps, c.num_stages))
    assert len(seen) <= 12


def test_kernel_spec_json_round_trip(census_small):
    for spec in census_small.distinct():
        assert KernelSpec.from_json(spec.to_json()) == spec


# ------------------------------------------------------------------------------------- weights

def _conv_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 12, 5, 4, 3, generator=g, dtype=dtype).to(memory_format=torch.channels_last_3d)
    w = torch.randn(20, 12, 3, 3, 1, generator=g, dtype=dtype)
    return x, w


def _weight_layouts(w):
    """The same weight values in the layouts a caller may hand the conv: contiguous,
    channels_last_3d (the fast model's), a permuted copy, and a strided view."""
    wide = torch.zeros(w.shape[0], w.shape[1] * 2, *w.shape[2:], dtype=w.dtype)
    wide[:, ::2] = w
    return {
        "contiguous": w.contiguous(),
        "channels_last_3d": w.contiguous(memory_format=torch.channels_last_3d),
        "cout_fastest": w.permute(2, 3, 4, 1, 0).contiguous().permute(4, 3, 0, 1, 2),
        "strided_view": wide[:, ::2],
    }


def test_conv_reads_weights_in_any_layout():
    """The conv kernel reads the weight through its own strides: every layout gives the same
    result, equal to F.conv3d of the prologue-transformed input."""
    x, w = _conv_case()
    kw = dict(padding=(1, 1, 0), in_scale=torch.rand(12) + 0.5, in_shift=torch.randn(12), relu=True)
    outs = {name: kconv.conv3d_fused(x, wl, **kw) for name, wl in _weight_layouts(w).items()}
    expect = torch.nn.functional.conv3d(torch.relu(x * kw["in_scale"].view(1, -1, 1, 1, 1)
                                                   + kw["in_shift"].view(1, -1, 1, 1, 1)), w, padding=(1, 1, 0))
    for name, got in outs.items():
        torch.testing.assert_close(got, torch.relu(expect), rtol=1e-5, atol=1e-5, msg=name)


def test_channels_last_weight_is_read_in_place():
    """A channels_last_3d weight reaches the kernel as it is (no copy launch, its own storage,
    input-channel stride 1: K-contiguous B tiles). On a GPU the fused op converts any other
    layout once per change of the weight (a cached copy), not on every call; the interpreter
    reads every layout in place."""
    from ahnet_fast import use_backend
    from ahnet_fast.launches import record_launches
    from ahnet_fast.ops import conv_bn_act

    x, w = _conv_case()
    wl = w.contiguous(memory_format=torch.channels_last_3d)
    with record_launches() as log:
        kconv.conv3d_fused(x, wl, padding=(1, 1, 0))
    (launch,) = log.triton
    assert not log.torch_ops, log.summary()
    assert launch.args[1].stride == wl.stride() and wl.stride(1) == 1
    gamma, beta = torch.rand(20) + 0.5, torch.randn(20)
    rm, rv = torch.randn(20), torch.rand(20) + 0.5
    gpu = x.is_cuda
    for weight, copies in ((wl, 0), (w.contiguous(), int(gpu))):
        with use_backend("triton"), torch.no_grad():
            conv_bn_act(x, weight, gamma, beta, rm, rv, padding=(1, 1, 0), training=False)  # plans built
            with record_launches() as log:
                conv_bn_act(x, weight, gamma, beta, rm, rv, padding=(1, 1, 0), training=False)
        assert log.total == 1, log.summary()  # the conv alone, whatever the weight's layout
        assert log.triton[0].args[1].stride == (wl.stride() if gpu else weight.stride())
        with use_backend("triton"):
            weight.add_(0.0)  # an optimizer step: a new version of the weight
            with torch.no_grad(), record_launches() as log:
                conv_bn_act(x, weight, gamma, beta, rm, rv, padding=(1, 1, 0), training=False)
        assert log.torch_ops.get("aten::copy_", 0) + log.torch_ops.get("aten::clone", 0) == copies, log.summary()


# ------------------------------------------------------------------------------------- warmup

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour (on a GPU warmup compiles)")
def test_warmup_without_gpu_says_so(capsys):
    from ahnet_fast.cli import main

    assert main(["warmup", "--psp", "3", "--upsample", "trilinear", "--dtype", "bf16", "--train"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU visible" in out and "nothing to compile" in out
