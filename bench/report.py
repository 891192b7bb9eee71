"""Result files of the benchmark suite: JSON (with the environment record), a markdown
table a person can read, and a roofline plot (matplotlib, Agg backend, PNG).

Layout of a result folder (flat, so a GPU run's $OUT comes back whole)::

    ops.json   ops.md   roofline.png     (bench.ops)
    model.json model.md                  (bench.model)

Every file is written atomically (temporary file + os.replace), so a run stopped by a
time limit leaves the last complete version. ``python -m bench.report DIR`` re-renders
the markdown and the plot from the JSON files in DIR.
"""
from __future__ import annotations

import io
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from bench.common import atomic_write_bytes, atomic_write_json, atomic_write_text

#: families whose best time is "the best alternative" to ours
ALTERNATIVE_FAMILIES = ("alternative", "compile")


# ----------------------------------------------------------------------------
# summaries


def _groups(results: Sequence[dict], key: Sequence[str]) -> "OrderedDict[tuple, list[dict]]":
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in results:
        groups.setdefault(tuple(r.get(k) for k in key), []).append(r)
    return groups


def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and isinstance(r.get("ms"), (int, float)) and r["ms"] > 0


def _best(rows: Sequence[dict], families: Sequence[str] | None = None) -> dict | None:
    cands = [r for r in rows if _ok(r) and (families is None or r.get("family") in families)]
    return min(cands, key=lambda r: r["ms"]) if cands else None


def annotate(results: list[dict], key: Sequence[str]) -> None:
    """Add ``x_best`` (ms / best ms of the group; 1.0 = the fastest) to every ok record."""
    for rows in _groups(results, key).values():
        best = _best(rows)
        for r in rows:
            if best is not None and _ok(r):
                r["x_best"] = r["ms"] / best["ms"]


def summarize(results: list[dict], key: Sequence[str]) -> list[dict]:
    """One row per 'ours' record that ran: speed-ups against the best eager contender,
    the best alternative (compile included) and the best compiled one; memory ratio."""
    rows_out = []
    for group_key, rows in _groups(results, key).items():
        eager = _best(rows, ("eager",))
        alt = _best(rows, ALTERNATIVE_FAMILIES)
        comp = _best(rows, ("compile",))
        for r in rows:
            if r.get("family") != "ours" or not _ok(r):
                continue
            row = dict(zip(key, group_key))
            row.update(contender=r["contender"], ms=r["ms"], pct_roofline=r.get("pct_roofline"))
            for name, other in (("eager", eager), ("alternative", alt), ("compile", comp)):
                row[f"vs_{name}"] = other["ms"] / r["ms"] if other else None
                row[f"{name}_contender"] = other["contender"] if other else None
            if eager and eager.get("peak_bytes") and r.get("peak_bytes") is not None:
                row["mem_vs_eager"] = r["peak_bytes"] / eager["peak_bytes"]
            rows_out.append(row)
    return rows_out


# ----------------------------------------------------------------------------
# markdown


def _f(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def _mib(v: Any) -> str:
    return "" if v is None else f"{v / 2**20:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def clean(c: str) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def env_lines(payload: dict) -> list[str]:
    env = payload.get("env", {})
    smi = env.get("nvidia_smi") or {}
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"- device: {env.get('gpu') or env.get('cpu') or env.get('device')}"
        + (f", driver {smi.get('driver_version')}" if smi.get("driver_version") else "")
        + (f", {env.get('sm_count')} SMs, L2 {env.get('l2_bytes', 0) / 1e6:.0f} MB" if env.get("sm_count") else ""),
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
        f"triton {env.get('triton')}, monai {env.get('monai')}, ahnet_fast {env.get('ahnet_fast')}",
        f"- commit {commit}, date {env.get('date_utc')}",
    ]
    if payload.get("note"):
        lines.append(f"- note: {payload['note']}")
    ceil = payload.get("ceilings") or {}
    if ceil.get("skipped"):
        lines.append(f"- ceilings: not measured ({ceil['skipped']})")
    elif ceil:
        lines.append(f"- measured ceilings: device copy {_f(ceil.get('copy_GBps'), '{:.0f}')} GB/s, "
                     f"matmul {_f(ceil.get('matmul_TFLOPs'), '{:.1f}')} TFLOP/s ({ceil.get('matmul')})"
                     + (f"; datasheet {ceil['datasheet']}" if ceil.get("datasheet") else ""))
    cfg = payload.get("config") or {}
    if cfg:
        lines.append("- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("cases", "shapes")))
    flags = payload.get("flags")
    if flags:
        lines.append("- flags: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
    cud = payload.get("cudnn_check") or {}
    if "ok" in cud:
        names = {l: (cud.get(l) or {}).get("kernels") for l in ("contiguous", "channels_last_3d")}
        lines.append(f"- eager bf16 conv3d ran cuDNN kernels: {'yes' if cud['ok'] else 'NO'} "
                     f"(contiguous: {names['contiguous']}; channels_last_3d: {names['channels_last_3d']})")
    elif cud:
        lines.append(f"- cuDNN check: {cud}")
    return lines


def markdown_ops(payload: dict) -> str:
    results = [dict(r) for r in payload.get("results", [])]
    key = ("case", "mode")
    annotate(results, key)
    parts = ["# ahnet_fast op benchmarks", "", *env_lines(payload), ""]
    summary = summarize(results, key)
    if summary:
        parts += ["## Ours against the others", "",
                  "Speed-up = other ms / our ms (> 1: ours is faster); memory = our peak / eager peak.", "",
                  _table(["case", "mode", "ours", "ms", "% roofline", "vs eager", "vs best alternative",
                          "vs compile", "memory vs eager"],
                         [[s["case"], s["mode"], s["contender"], _f(s["ms"], "{:.4f}"), _f(s["pct_roofline"], "{:.0f}"),
                           _f(s["vs_eager"], "{:.2f}x"),
                           (_f(s["vs_alternative"], "{:.2f}x") + f" ({s['alternative_contender']})")
                           if s["vs_alternative"] else "",
                           _f(s["vs_compile"], "{:.2f}x"), _f(s.get("mem_vs_eager"), "{:.2f}")] for s in summary]),
                  ""]
    parts += ["## Every contender", "",
              "ms: graph-replay median per call for small ops (timing = graph), else CUDA-event median "
              "(events) or host clock (wall); GB/s from minimal bytes; % of the measured ceilings (blank when none "
              "were measured, or when a contender beat a ceiling, which then was too low); "
              "x best = ms / fastest ms; peak = device memory one call allocates beyond its inputs.", ""]
    for (case, mode), rows in _groups(results, key).items():
        r0 = rows[0]
        head = f"### {case} ({r0.get('describe', '')}), {mode}, {r0.get('dtype', '')}"
        ai = r0.get("intensity")
        head += f": {r0.get('flops', 0) / 1e9:.3g} GFLOP, {r0.get('min_bytes', 0) / 1e6:.3g} MB minimal"
        if ai is not None:
            head += f", {ai:.1f} FLOP/B" + (f" ({r0['bound']}-bound)" if r0.get("bound") else "")
        table = [[r["contender"], r.get("layout", ""), r.get("status", ""), _f(r.get("ms"), "{:.4f}"),
                  (r.get("timing") or {}).get("method", ""), _f(r.get("gbps"), "{:.0f}"), _f(r.get("pct_bw"), "{:.0f}"),
                  _f(r.get("tflops"), "{:.1f}"), _f(r.get("pct_flops"), "{:.0f}"), _f(r.get("pct_roofline"), "{:.0f}"),
                  _f(r.get("x_best"), "{:.2f}"), _mib(r.get("peak_bytes"))] for r in rows]
        parts += [head, "", _table(["contender", "layout", "status", "ms", "timing", "GB/s", "% BW", "TFLOP/s",
                                    "% peak", "% roofline", "x best", "peak MiB"], table), ""]
    return "\n".join(parts) + "\n"


def markdown_model(payload: dict) -> str:
    results = [dict(r) for r in payload.get("results", [])]
    key = ("shape", "mode")
    annotate(results, key)
    parts = ["# ahnet_fast whole-model benchmarks", "", *env_lines(payload), ""]
    if payload.get("model_config"):
        parts += [f"- model: {payload['model_config']}", ""]
    summary = summarize(results, key)
    if summary:
        parts += ["## Ours against MONAI", "", "Speed-up = other ms / our ms; memory = our peak / eager peak.", "",
                  _table(["shape", "mode", "ours", "ms", "vs MONAI eager", "vs compiled", "memory vs eager"],
                         [[s["shape"], s["mode"], s["contender"], _f(s["ms"], "{:.3f}"), _f(s["vs_eager"], "{:.2f}x"),
                           _f(s["vs_compile"], "{:.2f}x"), _f(s.get("mem_vs_eager"), "{:.2f}")] for s in summary]),
                  ""]
    parts += ["## Every contender", "",
              "mode infer = eval forward (no autograd); train = one step: forward, loss, backward, Adam. "
              "ms = CUDA-event median; launches = kernels one call launches (Triton and torch ops, eager "
              "contenders only); peak = device memory one call allocates beyond weights, optimizer state "
              "and inputs; x best = ms / fastest.", ""]
    for (shape, mode), rows in _groups(results, key).items():
        table = [[r["contender"], r.get("layout", ""), r.get("status", ""), _f(r.get("ms"), "{:.3f}"),
                  _f(r.get("launches"), "{:d}"), _f(r.get("tflops"), "{:.1f}"), _mib(r.get("peak_bytes")),
                  _f(r.get("x_best"), "{:.2f}"), _f((r.get("timing") or {}).get("reps"), "{:d}")] for r in rows]
        parts += [f"### {shape}, {mode}", "",
                  _table(["contender", "layout", "status", "ms", "launches", "TFLOP/s", "peak MiB", "x best", "reps"],
                         table), ""]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------
# roofline


def roofline_png(payload: dict) -> bytes | None:
    """PNG bytes of a roofline per mode (achieved TFLOP/s over FLOP/byte, measured
    ceilings as the roof), or None when nothing ran or matplotlib is missing."""
    results = [r for r in payload.get("results", []) if _ok(r) and r.get("intensity")]
    ceil = payload.get("ceilings") or {}
    bw, peak = ceil.get("copy_GBps"), ceil.get("matmul_TFLOPs")
    if not results or not bw or not peak:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return None
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 6), squeeze=False)
    colors = {"eager": "tab:gray", "alternative": "tab:blue", "compile": "tab:green", "ours": "tab:red"}
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results if r["mode"] == mode]
        ais = [r["intensity"] for r in rows]
        lo, hi = min(ais) / 2, max(max(ais) * 2, 2 * peak * 1e3 / bw)
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(bw * x / 1e3, peak) for x in xs], "k-", lw=1.5,
                label=f"roof: {bw:.0f} GB/s, {peak:.0f} TFLOP/s")
        seen = set()
        for r in rows:
            fam = r.get("family", "other")
            lab = fam if fam not in seen else None
            seen.add(fam)
            ax.scatter(r["intensity"], r["tflops"], c=colors.get(fam, "tab:purple"),
                       marker="*" if fam == "ours" else "o", s=90 if fam == "ours" else 25, alpha=0.8, label=lab)
            if fam == "ours":
                ax.annotate(f"{r['case']}", (r["intensity"], r["tflops"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain labels: mathtext tick labels are slow to render
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("arithmetic intensity (FLOP / minimal byte)")
        ax.set_ylabel("achieved TFLOP/s")
        env = payload.get("env", {})
        ax.set_title(f"{mode}, {payload.get('config', {}).get('dtype', '')}, {env.get('gpu') or env.get('device')}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.93, wspace=0.18)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------
# writing


def write_suite(out_dir: str | Path, payload: dict, *, plot: bool = True) -> list[Path]:
    """Write <suite>.json and <suite>.md (and roofline.png for ops) atomically."""
    out = Path(out_dir)
    suite = payload.get("suite", "ops")
    if suite not in ("ops", "model"):
        raise ValueError(f"payload suite {suite!r} not in ops, model")
    written = [out / f"{suite}.json", out / f"{suite}.md"]
    atomic_write_json(written[0], payload)
    atomic_write_text(written[1], markdown_ops(payload) if suite == "ops" else markdown_model(payload))
    if plot and suite == "ops":
        png = roofline_png(payload)
        if png is not None:
            atomic_write_bytes(out / "roofline.png", png)
            written.append(out / "roofline.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.report RESULT_DIR   (re-renders *.md and roofline.png from *.json)",
              file=sys.stderr)
        return 2
    out = Path(args[0])
    found = False
    for suite in ("ops", "model"):
        path = out / f"{suite}.json"
        if path.exists():
            found = True
            for p in write_suite(out, json.loads(path.read_text())):
                print(p)
    if not found:
        print(f"no ops.json or model.json in {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
