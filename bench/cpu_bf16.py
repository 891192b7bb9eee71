"""bfloat16 on the CPU: is it faster, and does it keep DESIGN.md's bf16 error rule? Per block.

    python -m bench.cpu_bf16 [--shape 1 1 128 128 32] [--threads 1] [--reps 3] [--tiny] [--out DIR]

Model and weights as ``bench/cpu.py`` (AHNet(in 1, out 4, psp_block_num=3, trilinear), BN
statistics calibrated, eval mode, no_grad). Four contenders on one input, timed in interleaved
repetitions (process CPU time, min and median): MONAI float32, MONAI under
``torch.autocast("cpu", bfloat16)``, ours float32, ours under the same autocast (the fast
model then runs its convs with bf16 weights and activations, BN math in fp32: what
``segment --bf16`` does).

Error: max |out - oracle| / max |oracle| against MONAI's model in float64. DESIGN.md's rule for
16-bit paths: ours' bf16 error <= 2x the error of the same-dtype torch composition, which here
is MONAI under torch's own bf16 autocast. Whole-model errors mix every layer's rounding, so the
same rule is also checked block by block: each top-level block (stem, the four encoder layers,
the decoder's up/dense blocks, PSP, the head) gets the float64 oracle's own input to that
block (cast down), and its output is compared with the oracle block's output. A block breaks
the rule when its bf16 error exceeds 2x MONAI's bf16 error on the same block.

"bf16 pays" on this CPU when ours in bf16 is faster than ours in float32 and the rule holds.

Results: ``<out>/cpu_bf16.json`` and ``<out>/cpu_bf16.md`` (default ``bench/results``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ahnet_fast.models.fast import _cast_run  # noqa: E402  (the fast model's bf16 casting)
from bench import cpu as cpu_suite  # noqa: E402

RULE_FACTOR = 2.0  # DESIGN.md: 16-bit error <= 2x the same-dtype torch composition's
FULL_SHAPE = (1, 1, 128, 128, 32)
TINY_SHAPE = (1, 1, 64, 64, 32)
CONTENDERS = ("monai_fp32", "monai_bf16", "ours_fp32", "ours_bf16")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """bench/cpu.py's relative max error; inf for a non-finite output (never "within the rule")."""
    return cpu_suite._rel(a, b) if torch.isfinite(a).all() else float("inf")


def _model_out(model: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The whole model in float32, or under torch's bf16 autocast (the fast model then casts
    itself: convs in bf16, BN math in fp32, as ``segment --bf16``)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(x)


def _block_out(block: nn.Module, x: torch.Tensor, how: str) -> torch.Tensor:
    """One block on the float64 oracle's input: ``fp32``; ``monai_bf16`` (torch's autocast) or
    ``ours_bf16`` (the fast model's own casting), both from the same bf16-rounded input, as a
    block inside a bf16 model receives (torch's autocast would keep a float32 input to a BN
    exact)."""
    with torch.no_grad():
        if how == "fp32":
            return block(x.float())
        xb = x.to(torch.bfloat16).float()
        if how == "ours_bf16":
            return _cast_run(block, xb, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block(xb)


def _blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def block_errors(monai: nn.Module, ours: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per top-level block: errors of MONAI bf16 and ours bf16 against the float64 block, each
    fed the float64 oracle's input to that block."""
    oracle = copy.deepcopy(monai).double().eval()
    captured: dict[str, tuple[tuple, torch.Tensor]] = {}
    hooks = []
    names = _blocks(oracle)
    for name in names:
        def hook(mod, args, out, name=name):
            if name not in captured:  # the first call (blocks are called once per forward)
                # copies: MONAI's ReLU runs in place on bn0's output right after this hook
                captured[name] = (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args),
                                  out.detach().clone())
        hooks.append(oracle.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        oracle(x.double())
    for h in hooks:
        h.remove()
    rows = []
    for name in names:
        if name not in captured:
            continue
        (x_in,), want = captured[name]  # MONAI calls every top-level block with one tensor
        m_err = _rel(_block_out(monai.get_submodule(name), x_in, "monai_bf16"), want)
        o_err = _rel(_block_out(ours.get_submodule(name), x_in, "ours_bf16"), want)
        f_err = _rel(_block_out(ours.get_submodule(name), x_in, "fp32"), want)
        rows.append({"block": name, "monai_bf16_error": m_err, "ours_bf16_error": o_err, "ours_fp32_error": f_err,
                     "ratio": o_err / max(m_err, 1e-30), "breaks_rule": bool(o_err > RULE_FACTOR * m_err)})
    return rows


def run(shape, threads: int, reps: int, log: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(threads)
    monai, ours = cpu_suite.build_models()
    monai.eval()
    ours.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    models = {"monai": monai, "ours": ours}
    calls = {name: (lambda name=name: _model_out(models[name.split("_")[0]], x, name.endswith("bf16")))
             for name in CONTENDERS}
    with torch.no_grad():
        want = copy.deepcopy(monai).double()(x.double())
    rows: dict[str, dict] = {}
    for name, fn in calls.items():
        out = fn()  # warm-up (oneDNN primitive caches, folds)
        rows[name] = {"error_vs_float64": _rel(out, want), "cpu_s": [], "wall_s": []}
    for rep in range(reps):
        order = list(CONTENDERS[rep % len(CONTENDERS):] + CONTENDERS[:rep % len(CONTENDERS)])
        for name in order:
            c, w, _ = cpu_suite._timed(calls[name])
            rows[name]["cpu_s"].append(c)
            rows[name]["wall_s"].append(w)
    for name, row in rows.items():
        row.update(cpu_min_s=min(row["cpu_s"]), cpu_median_s=statistics.median(row["cpu_s"]),
                   wall_min_s=min(row["wall_s"]), wall_median_s=statistics.median(row["wall_s"]))
        log(f"  {name}: CPU min {row['cpu_min_s']:.3f} s, error vs float64 {row['error_vs_float64']:.2e}")
    blocks = block_errors(monai, ours, x)
    for b in blocks:
        log(f"  block {b['block']}: bf16 error ours {b['ours_bf16_error']:.2e} / MONAI {b['monai_bf16_error']:.2e}"
            f" = {b['ratio']:.2f}{'  BREAKS THE RULE' if b['breaks_rule'] else ''}")
    speed = rows["ours_bf16"]["cpu_min_s"] / rows["ours_fp32"]["cpu_min_s"]
    rule_model = rows["ours_bf16"]["error_vs_float64"] <= RULE_FACTOR * rows["monai_bf16"]["error_vs_float64"]
    broken = [b["block"] for b in blocks if b["breaks_rule"]]
    verdict = {
        "ours_bf16_over_ours_fp32_cpu": speed,
        "ours_bf16_over_monai_bf16_cpu": rows["ours_bf16"]["cpu_min_s"] / rows["monai_bf16"]["cpu_min_s"],
        "monai_bf16_over_monai_fp32_cpu": rows["monai_bf16"]["cpu_min_s"] / rows["monai_fp32"]["cpu_min_s"],
        "model_keeps_rule": bool(rule_model),
        "blocks_breaking_rule": broken,
        "bf16_pays": bool(speed < 1.0 and rule_model and not broken),
    }
    return {"env": cpu_suite.env_record(), "shape": list(shape), "threads": threads, "reps": reps,
            "rule_factor": RULE_FACTOR, "contenders": rows, "blocks": blocks, "verdict": verdict}


def markdown(p: dict) -> str:
    env, v = p["env"], p["verdict"]
    out = ["# bfloat16 on the CPU: speed and DESIGN.md's bf16 error rule", "",
           f"{env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['torch']}, MONAI {env['monai']}, "
           f"commit {env['git_commit'][:10]}, {env['date']}. Eval forward, no_grad, input {tuple(p['shape'])}, "
           f"{p['threads']} thread(s), {p['reps']} interleaved repetitions. Error: max |out - oracle| / max |oracle| "
           "against MONAI's model in float64. Rule: ours' bf16 error <= "
           f"{p['rule_factor']:g}x MONAI's under torch's bf16 autocast.", "",
           "| contender | CPU min s | CPU median s | wall min s | error vs float64 |", "|---|---|---|---|---|"]
    for name, r in p["contenders"].items():
        out.append(f"| {name} | {r['cpu_min_s']:.3f} | {r['cpu_median_s']:.3f} | {r['wall_min_s']:.3f} | "
                   f"{r['error_vs_float64']:.2e} |")
    out += ["", "## Per block (each fed the float64 oracle's input)", "",
            "| block | ours fp32 error | MONAI bf16 error | ours bf16 error | ours / MONAI | rule |",
            "|---|---|---|---|---|---|"]
    for b in p["blocks"]:
        out.append(f"| {b['block']} | {b['ours_fp32_error']:.2e} | {b['monai_bf16_error']:.2e} | "
                   f"{b['ours_bf16_error']:.2e} | {b['ratio']:.2f} | {'breaks' if b['breaks_rule'] else 'keeps'} |")
    out += ["", "## Verdict", "",
            f"- ours bf16 / ours float32 (CPU time): {v['ours_bf16_over_ours_fp32_cpu']:.2f}; ours bf16 / MONAI bf16: "
            f"{v['ours_bf16_over_monai_bf16_cpu']:.2f}; MONAI bf16 / MONAI float32: "
            f"{v['monai_bf16_over_monai_fp32_cpu']:.2f}",
            f"- whole model keeps the rule: {'yes' if v['model_keeps_rule'] else 'no'}; blocks breaking it: "
            f"{', '.join(v['blocks_breaking_rule']) or 'none'}",
            f"- bf16 pays on this CPU (faster and within the rule): {'yes' if v['bf16_pays'] else 'no'}", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=5, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help=f"input {TINY_SHAPE} (CI smoke run)")
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        ap.error("--reps and --threads must be >= 1")
    shape = tuple(args.shape) if args.shape else (TINY_SHAPE if args.tiny else FULL_SHAPE)
    payload = run(shape, args.threads, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_bf16.json").write_text(json.dumps(payload, indent=1))
    (out / "cpu_bf16.md").write_text(markdown(payload))
    print(f"wrote {out / 'cpu_bf16.json'} and {out / 'cpu_bf16.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
