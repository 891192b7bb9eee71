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

MAX_COMPILES_TRAIN_STEP = 40


def _train_step_census(shape, channels_last=False):
    torch.manual_seed(0)
    model = AHNet(psp_block_num=3, upsample_mode="trilinear").to(torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    model.train()
    with ahnet_fast.use_backend("triton"), record_specs() as log:
        model(x).float().sum().backward()
    return log


@pytest.fixture(scope="module")
def census_small():
    return _train_step_census((1, 1, 64, 64, 64))


def _summary(specs):
    return dict(collections.Counter(s.kernel for s in specs))


def test_train_step_compiles_at_most_40():
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
                                    cx["POOL"], cx["HAS_PRO"], cx["STATS"], cx["HAS_RES"])
        assert {k: cx[k] for k in cfg.kwargs} == cfg.kwargs
        assert (spec.num_warps, spec.num_stages) == (cfg.num_warps, cfg.num_stages)
        assert grid == (-(-val["M"] // cfg.kwargs["BLOCK_M"]), -(-val["Cout"] // cfg.kwargs["BLOCK_N"]))
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
                cap = 64 if dtype == torch.float32 else 128
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


def test_pack_conv_weight_layout():
    _, w = _conv_case()
    p = kconv.pack_conv_weight(w)
    assert p.shape == (3 * 3 * 1 * 12, 20) and p.is_contiguous()
    # row = tap * Cin + ci, tap = (kh * KW + kw) * KD + kd
    for kh, kw, ci, co in ((0, 0, 0, 0), (2, 1, 11, 19), (1, 2, 5, 7)):
        assert p[((kh * 3 + kw) * 1 + 0) * 12 + ci, co] == w[co, ci, kh, kw, 0]


def test_packed_weight_gives_the_same_result():
    x, w = _conv_case()
    kw = dict(padding=(1, 1, 0), in_scale=torch.rand(12) + 0.5, in_shift=torch.randn(12), relu=True)
    ref = kconv.conv3d_fused(x, w, **kw)
    got = kconv.conv3d_fused(x, w, packed_weight=kconv.pack_conv_weight(w), **kw)
    assert torch.equal(ref, got)
    expect = torch.nn.functional.conv3d(torch.relu(x * kw["in_scale"].view(1, -1, 1, 1, 1)
                                                   + kw["in_shift"].view(1, -1, 1, 1, 1)), w, padding=(1, 1, 0))
    torch.testing.assert_close(got, torch.relu(expect), rtol=1e-5, atol=1e-5)


def test_packed_weight_is_validated():
    x, w = _conv_case()
    p = kconv.pack_conv_weight(w)
    with pytest.raises(ValueError, match="shape"):
        kconv.conv3d_fused(x, w, padding=(1, 1, 0), packed_weight=p[:-1])
    with pytest.raises(TypeError, match="float32"):
        kconv.conv3d_fused(x, w, padding=(1, 1, 0), packed_weight=p.to(torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        kconv.conv3d_fused(x, w, padding=(1, 1, 0), packed_weight=p.t().contiguous().t())
    with pytest.raises(TypeError, match="Tensor"):
        kconv.conv3d_fused(x, w, padding=(1, 1, 0), packed_weight=p.tolist())


# ------------------------------------------------------------------------------------- warmup

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour (on a GPU warmup compiles)")
def test_warmup_without_gpu_says_so(capsys):
    from ahnet_fast.cli import main

    assert main(["warmup", "--psp", "3", "--upsample", "trilinear", "--dtype", "bf16", "--train"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU visible" in out and "nothing to compile" in out
