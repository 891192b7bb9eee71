"""Smoke tests of the benchmark suite (bench/) on CPU, float32, tiny shapes.

They check that the harness runs end to end for the contenders available here, writes
JSON + markdown, and that the correctness gate rejects a wrong contender before timing.
No timing assertions: CPU times say nothing about the GPU.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# bench/ is a top-level folder of the checkout, not an installed package
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import common, model, ops, report  # noqa: E402
from bench.common import Unavailable  # noqa: E402

CPU = torch.device("cpu")
FAST = dict(device=CPU, dtype=torch.float32, reps=2, warmup=1, max_seconds=0.5, quick_ceilings=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes run fastest on one thread (and do not fight other test processes)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _statuses(payload: dict) -> dict[tuple, str]:
    return {(r["case"], r["mode"], r["contender"]): r["status"] for r in payload["results"]}


def test_ops_end_to_end_writes_json_and_markdown(tmp_path: Path) -> None:
    cases = ops.parse_cases("tiny_pre_3x3x1_6-5,tiny_post_1x1x3_5-7")
    payload = ops.run_ops(cases, compile=False, out_dir=tmp_path, **FAST)
    st = _statuses(payload)
    # every contender that applies to a case appears once per mode
    assert ("tiny_post_1x1x3_5-7", "infer", "folded-BN conv+ReLU") in st
    assert ("tiny_pre_3x3x1_6-5", "infer", "folded-BN conv+ReLU") not in st  # post-activation only
    for (case, mode, name), status in st.items():
        assert status == "ok" or status.startswith("unavailable: "), (case, mode, name, status)
        if name in ("eager contig", "eager cl3d", "conv2d view", "max over (D/2,2) view"):
            assert status == "ok", (case, mode, name, status)
    # GPU-only contenders say why they did not run
    assert st[("tiny_pre_3x3x1_6-5", "infer", "ours[triton]")].startswith("unavailable: ")
    assert st[("tiny_post_1x1x3_5-7", "infer", "cudnn conv+bias+ReLU")] == "unavailable: torch.cudnn_convolution_relu needs CUDA"
    for r in payload["results"]:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["timing"]["reps"] >= 1 and r["check"]["ok"]
            assert math.isfinite(r["gbps"]) and math.isfinite(r["tflops"])
            assert all(e <= lim for e, lim in zip(r["check"]["errors"].values(), r["check"]["limits"].values()))
    saved = json.loads((tmp_path / "ops.json").read_text())
    # a CPU run measures no ceiling and reports no % of one (cache-resident ops beat any CPU "roof")
    assert saved["env"]["torch"] == torch.__version__ and "copy_GBps" not in saved["ceilings"]
    assert "no % of roofline" in saved["ceilings"]["skipped"] and "GPU performance" in saved["note"]
    assert not any("pct_roofline" in r or "pct_bw" in r for r in saved["results"])
    assert len(saved["results"]) == len(payload["results"])
    md = (tmp_path / "ops.md").read_text()
    assert "tiny_pre_3x3x1_6-5" in md and "| eager contig |" in md
    assert "- ceilings: not measured (CPU run" in md and "- note: CPU run" in md
    assert not (tmp_path / "roofline.png").exists()
    # the reference backend of ours runs on CPU whenever ahnet_fast.ops is importable
    ref_status = st[("tiny_pre_3x3x1_6-5", "train", "ours[reference]")]
    try:
        import ahnet_fast.ops  # noqa: F401
    except ImportError:
        assert ref_status.startswith("unavailable: ")
    else:
        assert ref_status == "ok"
        assert "## Ours against the others" in md


def _wrong_build(ctx: ops.BuildContext):
    """The eager composition with outputs off by a relative 1e-3 (far above the fp32 limit)."""
    good = ops._build_eager("contig")(ctx)
    return lambda x, gy: [t * (1 + 1e-3) for t in good(x, gy)]


def _nan_build(ctx: ops.BuildContext):
    good = ops._build_eager("contig")(ctx)

    def fn(x, gy):
        outs = good(x, gy)
        outs[0] = outs[0].clone()
        outs[0].view(-1)[0] = float("nan")
        return outs

    return fn


def _unavailable_build(ctx: ops.BuildContext):
    raise Unavailable("not built in this test")


def _raising_build(ctx: ops.BuildContext):
    raise RuntimeError("boom")


def test_gate_rejects_wrong_contenders_before_timing(tmp_path: Path) -> None:
    contenders = [
        ops.Contender("eager contig", "eager", "contig", ops._build_eager("contig")),
        ops.Contender("wrong by 1e-3", "ours", "contig", _wrong_build),
        ops.Contender("nan", "ours", "cl3d", _nan_build),
        ops.Contender("missing", "ours", "cl3d", _unavailable_build),
        ops.Contender("raises", "alternative", "cl3d", _raising_build),
    ]
    payload = ops.run_ops(ops.parse_cases("tiny_post_3x3x1_4-4"), contenders=contenders, compile=False,
                          out_dir=tmp_path, **FAST)
    for mode in ("infer", "train"):
        st = _statuses(payload)
        assert st[("tiny_post_3x3x1_4-4", mode, "eager contig")] == "ok"
        assert st[("tiny_post_3x3x1_4-4", mode, "wrong by 1e-3")].startswith("wrong: out: rel err")
        assert st[("tiny_post_3x3x1_4-4", mode, "nan")].startswith("wrong: out: rel err inf")
        assert st[("tiny_post_3x3x1_4-4", mode, "missing")] == "unavailable: not built in this test"
        assert st[("tiny_post_3x3x1_4-4", mode, "raises")] == "failed: RuntimeError: boom"
    for r in payload["results"]:
        if r["status"].startswith("wrong"):
            assert "ms" not in r and "timing" not in r  # never timed
    md = (tmp_path / "ops.md").read_text()
    assert "wrong: out: rel err" in md


def test_case_specs_and_roofline_numbers() -> None:
    dec = ops.DEFAULT_CASES["dec_3x3x1_80-20"]
    assert dec.kind == "pre" and dec.in_shape == (2, 80, 96, 96, 32) and dec.out_shape == (2, 20, 96, 96, 32)
    assert dec.flops("infer") == 2 * (2 * 20 * 96 * 96 * 32) * 80 * 9
    assert dec.flops("train") == 3 * dec.flops("infer")
    assert dec.min_bytes("infer", 2) == 2 * (2 * 80 * 96 * 96 * 32 + 2 * 20 * 96 * 96 * 32 + 20 * 80 * 9)
    pool = ops.DEFAULT_CASES["stem_zpool_64"]
    assert pool.out_shape == (2, 64, 96, 96, 32)
    assert pool.min_bytes("infer", 2) == 2 * 2 * 64 * 96 * 96 * (64 + 32)
    (spec,) = ops.parse_cases("post:1x1x3:16-24:2x8x8x6")
    assert spec.kernel == (1, 1, 3) and spec.padding == (0, 0, 1) and spec.c_out == 24
    (zp,) = ops.parse_cases("zpool:8:1x4x4x5")
    assert zp.out_shape == (1, 8, 4, 4, 2)
    assert [c.name for c in ops.parse_cases(None, quick=True)] == ops.QUICK_CASES
    with pytest.raises(ValueError, match="unknown op case 'nope'"):
        ops.parse_cases("nope")
    with pytest.raises(ValueError, match="NxCxHxWxD"):
        model.parse_shapes("1x192x192x64")
    # 2x L2 worth of rotation sets on an H100-sized L2; one set on CPU
    assert common.rotation_sets(10_000_000, CPU) == 1


def test_check_outputs_gate_rules() -> None:
    ref = torch.randn(4, 5, dtype=torch.float64)
    ok = common.check_outputs([ref.float()], [ref], ["out"], torch.float32)
    assert ok.ok and ok.errors[0] < 1e-7
    shape = common.check_outputs([ref[:3].float()], [ref], ["out"], torch.float32)
    assert not shape.ok and "shape mismatch" in shape.reason
    # bf16: the limit is 2x the same-dtype baseline error when that is above the floor
    noisy = ref * (1 + 0.03)
    assert common.check_outputs([noisy], [ref], ["out"], torch.bfloat16, [0.02]).ok
    assert not common.check_outputs([noisy], [ref], ["out"], torch.bfloat16, [0.01]).ok
    assert not common.check_outputs([ref], [ref, ref], ["a", "b"], torch.float32).ok


class _TinyNet(nn.Module):
    """Stands in for AH-Net so the model harness runs in a second on CPU."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.conv1 = nn.Conv3d(cfg["in_channels"], 6, (3, 3, 1), padding=(1, 1, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(6)
        self.conv2 = nn.Conv3d(6, cfg["out_channels"], (1, 1, 3), padding=(0, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


def _wrong_model(ctx: model.ModelContext) -> model.Built:
    built = model._eager(_TinyNet, "contig")(ctx)
    return model.Built(built.module, lambda x: built.module(x) * 1.01)


def test_model_harness_end_to_end_and_gate(tmp_path: Path) -> None:
    contenders = [
        model.ModelContender("tiny eager contig", "eager", "contig", model._eager(_TinyNet, "contig")),
        model.ModelContender("tiny eager cl3d", "eager", "cl3d", model._eager(_TinyNet, "cl3d")),
        model.ModelContender("tiny + CUDA graph", "ours", "cl3d", model._eager(_TinyNet, "cl3d"),
                             modes=frozenset({"infer"}), graph=True),
        model.ModelContender("tiny wrong", "ours", "contig", _wrong_model),
    ]
    payload = model.run_model(model.parse_shapes("2x1x6x5x4"), device=CPU, dtype=torch.float32,
                              config={"layers": (1, 1, 1, 1)}, reps=2, warmup=1, max_seconds=0.5,
                              contenders=contenders, network=_TinyNet, out_dir=tmp_path)
    st = {(r["mode"], r["contender"]): r["status"] for r in payload["results"]}
    for mode in ("infer", "train"):
        assert st[(mode, "tiny eager contig")] == "ok"
        assert st[(mode, "tiny eager cl3d")] == "ok"
        assert st[(mode, "tiny wrong")].startswith("wrong: out: rel err")
    assert st[("infer", "tiny + CUDA graph")] == "unavailable: CUDA graphs need a CUDA device"
    assert ("train", "tiny + CUDA graph") not in st
    train = [r for r in payload["results"] if r["mode"] == "train" and r["status"] == "ok"]
    # the train gate compares the parameter gradients too, not only the output
    assert all(set(r["check"]["errors"]) == {"out", "grads"} for r in train)
    assert all(r["params"] == sum(p.numel() for p in _TinyNet({"in_channels": 1, "out_channels": 1}).parameters())
               for r in train)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["suite"] == "model" and saved["env"]["torch"] == torch.__version__
    md = (tmp_path / "model.md").read_text()
    assert "### 2x1x6x5x4, train" in md and "| tiny eager cl3d |" in md


def test_cli_bench_ops_runs_and_report_rerenders(tmp_path: Path) -> None:
    from ahnet_fast.cli import main

    rc = main(["bench", "ops", "--device", "cpu", "--dtype", "float32", "--shapes", "tiny_zpool_5", "--no-compile",
               "--reps", "2", "--modes", "infer", "--contenders", "eager", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "ops.json").read_text())
    assert {r["contender"] for r in payload["results"]} == {"eager contig", "eager cl3d"}
    (tmp_path / "ops.md").unlink()
    assert report.main([str(tmp_path)]) == 0
    assert "tiny_zpool_5" in (tmp_path / "ops.md").read_text()
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])


def _wrong_by_5_percent(ctx: ops.BuildContext):
    good = ops._build_eager("cl3d")(ctx)
    return lambda x, gy: [t * 1.05 for t in good(x, gy)]


@pytest.mark.gpu
def test_ops_harness_cuda_paths(tmp_path: Path) -> None:
    """The CUDA-only machinery: event timing, CUDA-graph replays, peak memory, the cuDNN
    profile check, bf16 gate against the float32 reference."""
    dev = torch.device("cuda", torch.cuda.current_device())
    contenders = [c for c in ops.default_contenders(compile=False) if c.family in ("eager", "alternative")]
    contenders.append(ops.Contender("wrong by 5%", "ours", "cl3d", _wrong_by_5_percent))
    payload = ops.run_ops(ops.parse_cases("pre:3x3x1:24-20:2x16x16x8,zpool:16:2x16x16x8"), device=dev,
                          dtype=torch.bfloat16, reps=20, warmup=2, max_seconds=1.0, quick_ceilings=True,
                          contenders=contenders, out_dir=tmp_path)
    assert payload["ceilings"]["copy_GBps"] > 100 and payload["ceilings"]["matmul_TFLOPs"] > 1
    cud = payload["cudnn_check"]
    assert cud["contiguous"]["kernels"] and cud["channels_last_3d"]["kernels"]
    st = {(r["case"], r["mode"], r["contender"]): r for r in payload["results"]}
    for (case, mode, name), r in st.items():
        if name == "wrong by 5%":
            assert r["status"].startswith("wrong: "), r["status"]
            continue
        assert r["status"] == "ok", (case, mode, name, r["status"])
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0
        # one call of these tiny ops is far under 1 ms: graph replays are the primary number
        assert r["timing"]["method"] == "graph", r["timing"]
        assert 0 < r["timing"]["ms_graph"] <= r["timing"]["ms_events"] * 1.5
        assert r["timing"]["rotation_sets"] > 1  # the inputs are far smaller than L2


@pytest.mark.gpu
def test_model_harness_cuda_graph_and_train_step(tmp_path: Path) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    contenders = [
        model.ModelContender("tiny eager cl3d", "eager", "cl3d", model._eager(_TinyNet, "cl3d")),
        model.ModelContender("tiny + CUDA graph", "ours", "cl3d", model._eager(_TinyNet, "cl3d"),
                             modes=frozenset({"infer"}), graph=True),
    ]
    payload = model.run_model(model.parse_shapes("2x1x16x16x8"), device=dev, dtype=torch.bfloat16,
                              reps=20, warmup=2, max_seconds=1.0, contenders=contenders, network=_TinyNet,
                              out_dir=tmp_path)
    st = {(r["mode"], r["contender"]): r for r in payload["results"]}
    assert all(r["status"] == "ok" for r in st.values()), {k: r["status"] for k, r in st.items()}
    assert st[("infer", "tiny + CUDA graph")]["timing"]["method"] == "graph"
    assert st[("train", "tiny eager cl3d")]["peak_bytes"] > 0
