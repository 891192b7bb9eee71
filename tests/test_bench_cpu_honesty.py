"""`ahnet-fast bench` on a CPU tells the truth: what it times, no % of a ceiling it did not measure (and
never above 100), short float32 defaults, whole messages, results where the user runs it, and how to get
the MONAI rows. No timing assertions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench import common, model, ops  # noqa: E402
from bench.common import Unavailable  # noqa: E402


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_cli_cpu_defaults_note_and_results_in_the_working_directory(tmp_path, monkeypatch, capsys):
    from ahnet_fast.cli import main

    before = _tree(_ROOT / "bench")
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "ops", "--device", "cpu", "--shapes", "tiny_zpool_5", "--modes", "infer",
               "--contenders", "eager"])
    assert rc == 0
    cap = capsys.readouterr()
    first = cap.out.splitlines()[0]
    assert first.startswith("note: CPU run: ahnet_fast's fused kernels are GPU kernels")
    assert "CPU timings say nothing about GPU performance" in first
    (found,) = list((tmp_path / "bench-results").glob("*/ops.json"))
    payload = json.loads(found.read_text())
    # short, float32, no torch.compile, no ceilings and no % of one
    assert payload["config"]["dtype"] == "float32" and payload["config"]["reps"] == 5
    assert payload["config"]["compile_mode"] is None and payload["config"]["budget_s"] == 180.0
    assert "skipped" in payload["ceilings"] and "% roofline" not in json.dumps(payload["results"])
    assert not any(k.startswith("pct_") for r in payload["results"] for k in r)
    assert all(r["timing"]["reps"] <= 5 for r in payload["results"] if r["status"] == "ok")
    assert "0.0 TFLOP/s" not in cap.err and "ceilings: not measured (CPU run" in cap.err
    assert _tree(_ROOT / "bench") == before  # nothing written into the source checkout


def test_options_are_checked_before_anything_runs(tmp_path, capsys):
    from ahnet_fast.cli import main

    (tmp_path / "file").write_text("")
    for argv, msg in ((["--dtype", "half"], "--dtype half: expected bfloat16, float16 or float32"),
                      (["--reps", "0"], "--reps 0: expected an integer >= 1"),
                      (["--budget-s", "0"], "--budget-s 0: expected a number of seconds > 0"),
                      (["--modes", "eval"], "--modes eval: expected infer, train or infer,train"),
                      (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N"),
                      (["--out", str(tmp_path / "file")], "is a file, expected a folder"),
                      (["--shapes", "no_such_case"], "no_such_case")):
        assert main(["bench", "ops", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    assert not list(tmp_path.glob("bench-results"))


def test_messages_are_never_cut(tmp_path):
    reason = "needs a GPU: " + "x" * 400 + " END"
    logged: list[str] = []

    def unavailable(ctx):
        raise Unavailable(reason)

    def raising(ctx):
        raise RuntimeError("long failure " + "y" * 400 + " END")

    contenders = [ops.Contender("eager contig", "eager", "contig", ops._build_eager("contig")),
                  ops.Contender("long reason", "ours", "cl3d", unavailable),
                  ops.Contender("long failure", "alternative", "cl3d", raising)]
    payload = ops.run_ops(ops.parse_cases("tiny_zpool_5"), contenders=contenders, device=torch.device("cpu"),
                          dtype=torch.float32, modes=("infer",), reps=1, warmup=1, max_seconds=0.1,
                          compile=False, log=logged.append)
    st = {r["contender"]: r["status"] for r in payload["results"]}
    assert st["long reason"] == f"unavailable: {reason}"
    assert st["long failure"].endswith(" END") and "..." not in st["long failure"]
    assert any(line.endswith(f"unavailable: {reason}") for line in logged)
    assert common.short_error(RuntimeError("z" * 1000)) == "RuntimeError: " + "z" * 1000


def test_no_percentage_above_a_hundred():
    case = ops.parse_cases("tiny_post_3x3x1_4-4")[0]
    elt = 4
    nbytes, flops = case.min_bytes("infer", elt), case.flops("infer")
    ms = 1.0
    # ceilings the op beats (a cache-resident op against a DRAM copy): no % at all, and why
    low = {"copy_GBps": 0.5 * nbytes / (ms * 1e-3) / 1e9, "matmul_TFLOPs": 1e3}
    rec = ops._metrics(case, "infer", torch.float32, ms, low)
    assert not any(k.startswith("pct_") for k in rec) and "ceiling is too low" in rec["roofline_note"]
    # ceilings above what the op reaches: percentages, each at most 100
    high = {"copy_GBps": 4 * nbytes / (ms * 1e-3) / 1e9, "matmul_TFLOPs": 4 * flops / (ms * 1e-3) / 1e12}
    rec = ops._metrics(case, "infer", torch.float32, ms, high)
    assert 0 < rec["pct_roofline"] <= 100 and rec["pct_bw"] == pytest.approx(25.0)
    # no ceilings (a CPU run): no percentages
    assert not any(k.startswith("pct_") for k in ops._metrics(case, "infer", torch.float32, ms, {"skipped": "cpu"}))
    assert common.describe_ceilings({"skipped": "why"}) == "ceilings: not measured (why)"


def test_monai_rows_say_how_to_get_them(monkeypatch):
    for name in ("monai", "monai.networks", "monai.networks.nets"):
        monkeypatch.setitem(sys.modules, name, None)
    for factory in (model.monai_ahnet, model.monai_unet):
        with pytest.raises(Unavailable, match="MONAI not installed .*pip install monai"):
            factory({"in_channels": 1, "out_channels": 1})


def test_quick_cpu_model_run_is_short(monkeypatch, capsys):
    """`bench model --quick` on a CPU: one eval forward shape the paper network accepts, 3 timed calls,
    1 warm-up, no compile (so it times something within about a minute on a few cores)."""
    seen = {}

    def fake_run_model(shapes, **kw):
        seen.update(kw, shapes=[s.name for s in shapes])
        return {}

    monkeypatch.setattr(model, "run_model", fake_run_model)
    ns = dict(quick=True, out=str(Path.cwd() / "unused"), device="cpu", dtype=None, reps=None, no_compile=None,
              compile_mode="max-autotune", budget_s=None, model_shapes=None, model_modes=None,
              model_config="paper", layers=None, psp=None, model_contenders=None)
    import argparse

    model.run_from_args(argparse.Namespace(**ns))
    assert seen["shapes"] == ["1x1x128x128x32"] and seen["modes"] == ["infer"]
    assert seen["reps"] == 3 and seen["warmup"] == 1 and seen["compile"] is False
    assert seen["dtype"] == torch.float32 and seen["budget_s"] == 180.0
