"""Smoke test of the CPU suite (bench/cpu.py) on a tiny shape: it runs end to end, checks every
contender before timing, writes JSON + markdown with ratios, and measures peak RSS in a child
process. No timing assertions (CI machines say nothing about speed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import cpu  # noqa: E402


def test_cpu_suite_runs_on_a_tiny_shape(tmp_path):
    prev = torch.get_num_threads()
    try:
        assert cpu.main(["--tiny", "--no-compile", "--no-rss", "--threads", "1", "--reps", "1",
                         "--cases", "eval", "train", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(prev)
    payload = json.loads((tmp_path / "cpu.json").read_text())
    cases = {(r["case"], r["threads"]) for r in payload["results"]}
    assert cases == {("eval", 1), ("train", 1)}
    for res in payload["results"]:
        rows = res["contenders"]
        assert set(rows) >= {"monai_eager", "ours_eager"}
        for name, row in rows.items():
            assert row["status"] == "ok", (res["case"], name, row["status"])
            assert row["cpu_min_s"] > 0 and row["wall_min_s"] > 0 and row["reps"] == 1
            assert row["error_vs_oracle"] <= row["error_limit"]
        assert "ours_eager/monai_eager" in res["ratios"]
    assert "ours_eager_ckpt" in payload["results"][1]["contenders"]
    md = (tmp_path / "cpu.md").read_text()
    assert "ours eager / MONAI eager" in md and "monai_eager" in md
    assert payload["env"]["torch"] == torch.__version__


def test_peak_rss_child_process():
    mem = cpu.measure_rss("eval", "ours_eager", cpu.TINY["eval"][0], 1, timeout=300)
    assert "error" not in mem, mem
    assert mem["peak_rss_method"].startswith("VmHWM")
    # >= 0, not > 0: at this tiny shape a warm forward may run entirely in memory the allocator
    # kept from the warm-up call (seen on a fresh clone: 0 bytes over the base)
    assert isinstance(mem["peak_rss_over_base_bytes"], int) and mem["peak_rss_over_base_bytes"] >= 0


def test_cpu_bf16_suite_runs_on_a_tiny_shape(tmp_path):
    """bench/cpu_bf16.py end to end: four contenders timed and checked against float64, every
    parameterised top-level block compared in isolation, a verdict, JSON + markdown."""
    from bench import cpu_bf16

    prev = torch.get_num_threads()
    try:
        assert cpu_bf16.main(["--tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(prev)
    payload = json.loads((tmp_path / "cpu_bf16.json").read_text())
    rows = payload["contenders"]
    assert set(rows) == set(cpu_bf16.CONTENDERS)
    for name, row in rows.items():
        assert row["cpu_min_s"] > 0 and len(row["cpu_s"]) == 1, name
        assert 0 <= row["error_vs_float64"] < 1, (name, row["error_vs_float64"])  # finite, not garbage
    # float32 is float32-accurate; bf16 is visibly coarser in both libraries
    assert rows["ours_fp32"]["error_vs_float64"] < 1e-3 and rows["monai_fp32"]["error_vs_float64"] < 1e-3
    assert rows["ours_bf16"]["error_vs_float64"] > rows["ours_fp32"]["error_vs_float64"]
    blocks = {b["block"] for b in payload["blocks"]}
    assert {"conv1", "layer1", "layer4", "dense4", "psp", "final"} <= blocks
    for b in payload["blocks"]:
        assert b["ours_fp32_error"] < 1e-3, b  # the isolation itself is exact in float32
        assert b["breaks_rule"] == (b["ours_bf16_error"] > cpu_bf16.RULE_FACTOR * b["monai_bf16_error"])
    v = payload["verdict"]
    assert v["bf16_pays"] == (v["ours_bf16_over_ours_fp32_cpu"] < 1 and v["model_keeps_rule"]
                              and not v["blocks_breaking_rule"])
    assert "Per block" in (tmp_path / "cpu_bf16.md").read_text()
