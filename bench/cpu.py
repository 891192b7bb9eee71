"""CPU suite: the drop-in AH-Net against MONAI's on the CPU, eager and compiled.

    python -m bench.cpu [--threads 1 2] [--reps 5] [--no-compile] [--tiny] [--out DIR]

Cases (AHNet(in 1, out 4, psp_block_num=3, trilinear), float32, same weights for every
contender, BN statistics calibrated on a few training-mode passes so eval activations are
realistic):

* ``eval``    - one eval forward under no_grad at 1x1x128x128x32 and 1x1x192x192x64;
* ``train``   - one training step (forward, cross-entropy over 4 classes, backward, Adam) at
  1x1x128x128x32 and 2x1x96x96x32; ours also with ``activation_checkpointing=True``;
* ``segment`` - whole-volume sliding-window inference of a 197x233x48 volume (roi 128x128x32,
  overlap 0.25, Gaussian blend): MONAI's ``sliding_window_inference`` with MONAI's model
  against ``ahnet_fast.infer.sliding_window_inference`` with ours.

Contenders: MONAI eager, MONAI compiled (inductor; with freezing for eval/segment), ours
eager, ours compiled (``ahnet_fast.infer.compiled.inference_model`` for eval/segment, plain
``torch.compile`` for training). Compile time is measured apart (first call minus a steady
call) and never enters the timed repetitions.

Protocol: for each case and thread count every contender is built and warmed up, checked
against MONAI eager (eval/segment: relative max error; train: the first step's loss), then
timed in interleaved repetitions (contender order rotates every repetition), so a busy
shared machine slows every contender alike. Process CPU time (``time.process_time``) is the
stable figure on a shared machine; wall time is reported beside it. Min and median of both,
and ratios ours / MONAI (> 1 means ours is slower).

Peak memory: each contender of each case runs again in its own process (``--rss-child``),
which resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) after building and warming
up, runs the call twice and reports VmHWM minus the resident set before the call. For the
training rows the bytes autograd saves for backward in one forward are counted too.

Results: ``<out>/cpu.json`` and ``<out>/cpu.md`` (default ``bench/results``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]

FULL = {
    "eval": [(1, 1, 128, 128, 32), (1, 1, 192, 192, 64)],
    "train": [(1, 1, 128, 128, 32), (2, 1, 96, 96, 32)],
    "segment": [((1, 1, 197, 233, 48), (128, 128, 32))],
}
TINY = {
    "eval": [(1, 1, 64, 64, 32)],
    "train": [(1, 1, 64, 64, 32)],
    "segment": [((1, 1, 70, 75, 40), (64, 64, 32))],
}
# the eval case's first shape is the segment's window shape (they share one compile per side)
MODEL = dict(in_channels=1, out_channels=4, psp_block_num=3, upsample_mode="trilinear")
CONTENDERS = ("monai_eager", "monai_compiled", "ours_eager", "ours_compiled")


# ----------------------------------------------------------------------------- models
def build_models(seed: int = 0):
    """(MONAI model, ours) with the same weights and calibrated BN statistics."""
    from monai.networks.nets import AHNet as MonaiAHNet

    from ahnet_fast import AHNet

    torch.manual_seed(seed)
    monai = MonaiAHNet(**MODEL)
    monai.train()
    with torch.no_grad():  # calibrate the running statistics on a few random volumes
        for m in monai.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average
        for _ in range(3):
            monai(torch.randn(1, 1, 64, 64, 32))
        for m in monai.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
    ours = AHNet.from_monai(monai)
    return monai, ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


_COMPILED: dict = {}


def _compile_eval(model: torch.nn.Module, ours: bool) -> Callable:
    """Compiled inference callable, one per side for the whole run: the eval case at the
    segment's window shape and the segment case share it (compiles take minutes here)."""
    key = "ours" if ours else "monai"
    if key not in _COMPILED:
        _COMPILED[key] = _compile_eval_new(model, ours)
    return _COMPILED[key]


def _compile_eval_new(model: torch.nn.Module, ours: bool) -> Callable:
    if ours:
        from ahnet_fast.infer.compiled import inference_model

        return inference_model(model)
    fn = torch.compile(model, options={"freezing": True})

    def call(x):
        with torch.no_grad():
            return fn(x)
    return call


def make_callable(case: str, contender: str, shape, models) -> tuple[Callable[[], object], dict]:
    """A zero-argument callable running one repetition of ``case`` for ``contender``."""
    monai, ours = models
    ours_side = contender.startswith("ours")
    compiled = contender.endswith("compiled")
    info: dict = {}
    if case == "eval":
        model = copy.deepcopy(ours if ours_side else monai).eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        if compiled:
            fn = _compile_eval(model, ours_side)
        else:
            def fn(x, model=model):
                with torch.no_grad():
                    return model(x)
        return (lambda: fn(x)), info
    if case == "train":
        ckpt = contender == "ours_eager_ckpt"
        model = copy.deepcopy(ours if ours_side else monai).train()
        if ckpt:
            model.activation_checkpointing = True
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, MODEL["out_channels"], (shape[0], *shape[2:]), generator=torch.Generator().manual_seed(2))
        fwd = torch.compile(model) if compiled else model

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        info["model"] = model
        info["forward"] = lambda: F.cross_entropy(fwd(x), y)
        return step, info
    if case == "segment":
        vol_shape, roi = shape
        model = copy.deepcopy(ours if ours_side else monai).eval()
        vol = torch.randn(*vol_shape, generator=torch.Generator().manual_seed(3))
        if ours_side:
            from ahnet_fast.infer.sliding_window import sliding_window_inference

            net = _compile_eval(model, True) if compiled else model

            def seg():
                return sliding_window_inference(vol, net, window=roi, overlap=0.25, blend="gaussian", rules=None)
        else:
            from monai.inferers import sliding_window_inference as monai_swi

            net = _compile_eval(model, False) if compiled else model

            def seg():
                with torch.no_grad():
                    return monai_swi(vol, roi, 1, net, overlap=0.25, mode="gaussian", sigma_scale=0.125)
        return seg, info
    raise ValueError(case)


# ----------------------------------------------------------------------------- timing
def _timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def _oracle_error_limit(case: str, shape, models, outs: dict) -> dict[str, tuple[float, float]]:
    """(error, limit) per contender. eval: relative error against the float64 MONAI model, limit
    max(2 x MONAI eager's float32 error, 1e-5) (the model amplifies rounding: MONAI's own float32
    result is ~1e-4 from float64 at these shapes); segment: against MONAI eager's stitched
    output, limit 1e-3 (the float64 whole-volume oracle costs more than the run); train: the
    first step's loss against MONAI eager's, limit 1e-4."""
    ref = outs.get("monai_eager")
    res: dict[str, tuple[float, float]] = {}
    if ref is None:
        return res
    if case == "eval":
        oracle = copy.deepcopy(models[0]).double().eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).double()
        with torch.no_grad():
            want = oracle(x)
        base = _rel(ref, want)
        for name, out in outs.items():
            res[name] = (_rel(out, want), max(2 * base, 1e-5))
        return res
    for name, out in outs.items():
        if case == "train":
            res[name] = (abs(float(out) - float(ref)) / max(abs(float(ref)), 1e-30), 1e-4)
        else:
            res[name] = (_rel(out, ref), 1e-3)
    return res


def run_case(case: str, shape, contenders: list[str], threads_list: list[int], reps: int, models, log) -> list[dict]:
    """Build every contender once (compiles included), then for each thread count: one warm-up
    call each and ``reps`` interleaved timed repetitions."""
    fns, warm, outs = {}, {}, {}
    torch.set_num_threads(threads_list[0])
    for name in contenders:
        try:
            fn, _info = make_callable(case, name, shape, models)
            c1, w1, out = _timed(fn)  # first call: compiles for the compiled contenders
            fns[name] = fn
            warm[name] = {"first_call_wall_s": w1}
            outs[name] = out
            if "compiled" in name:  # compile time = first call minus a steady call
                c2, w2, out2 = _timed(fn)
                warm[name].update(compile_wall_s=max(0.0, w1 - w2), compile_cpu_s=max(0.0, c1 - c2))
                outs[name] = out if case == "train" else out2
            log(f"  {case} {shape} {name}: first call {w1:.1f} s")
        except Exception as exc:  # a contender that cannot run is reported, never fatal
            warm[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  {case} {shape} {name}: FAILED {warm[name]['error']}")
    errs = _oracle_error_limit(case, shape, models, outs)
    status = {n: ("ok" if errs.get(n, (0.0, 1.0))[0] <= errs.get(n, (0.0, 1.0))[1]
                  else f"wrong: error {errs[n][0]:.2e} > {errs[n][1]:.1e}") for n in outs}
    results = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        timed = [n for n in fns if status.get(n) == "ok"]
        for n in timed:
            fns[n]()  # warm-up at this thread count
        cpu: dict[str, list[float]] = {n: [] for n in timed}
        wall: dict[str, list[float]] = {n: [] for n in timed}
        for r in range(reps):
            order = timed[r % len(timed):] + timed[:r % len(timed)] if timed else []
            for n in order:
                c, w, _ = _timed(fns[n])
                cpu[n].append(c)
                wall[n].append(w)
        rows = {}
        for n in contenders:
            row = dict(warm.get(n, {}))
            row["status"] = status.get(n, row.get("error", "failed"))
            if n in errs:
                row["error_vs_oracle"], row["error_limit"] = errs[n]
            if n in cpu and cpu[n]:
                row.update(cpu_min_s=min(cpu[n]), cpu_median_s=statistics.median(cpu[n]),
                           wall_min_s=min(wall[n]), wall_median_s=statistics.median(wall[n]), reps=len(cpu[n]))
            rows[n] = row
        ratios = {}
        for base in ("monai_eager", "monai_compiled"):
            for n in ("ours_eager", "ours_compiled", "ours_eager_ckpt"):
                if "cpu_min_s" in rows.get(n, {}) and "cpu_min_s" in rows.get(base, {}):
                    b, o = rows[base], rows[n]
                    ratios[f"{n}/{base}"] = {
                        "cpu_min": o["cpu_min_s"] / b["cpu_min_s"],
                        "cpu_median": o["cpu_median_s"] / b["cpu_median_s"],
                        "wall_min": o["wall_min_s"] / b["wall_min_s"],
                        "wall_median": o["wall_median_s"] / b["wall_median_s"]}
        log(f"  {case} {shape} threads={threads}: " + ", ".join(f"{k} {v['cpu_min']:.2f}" for k, v in ratios.items()))
        results.append({"case": case, "shape": shape, "threads": threads, "contenders": rows, "ratios": ratios})
    return results


# ----------------------------------------------------------------------------- peak memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Distinct storage bytes autograd saves for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values())


def rss_child(case: str, contender: str, shape, threads: int) -> dict:
    torch.set_num_threads(threads)
    models = build_models()
    fn, info = make_callable(case, contender, shape, models)
    fn()  # build / compile / warm up
    out: dict = {}
    if case == "train" and "forward" in info:
        out["saved_for_backward_bytes"] = _saved_bytes(info["forward"])
        for p in info["model"].parameters():
            p.grad = None
    import gc

    gc.collect()
    base = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current resident set
        out["peak_rss_method"] = "VmHWM after clear_refs"
    except OSError:
        out["peak_rss_method"] = "VmHWM since process start (clear_refs not writable)"
    fn()
    fn()
    out["peak_rss_over_base_bytes"] = _hwm_bytes() - base
    return out


def measure_rss(case: str, contender: str, shape, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.cpu", "--rss-child", json.dumps([case, contender, shape, threads])]
    try:
        res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS ")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][4:])


# ----------------------------------------------------------------------------- report
def env_record() -> dict:
    import monai

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version(), "mkldnn": torch.backends.mkldnn.is_available(),
            "git_commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _fmt_s(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def markdown(payload: dict) -> str:
    env = payload["env"]
    out = [f"# CPU suite: ahnet_fast vs MONAI AH-Net", "",
           f"{env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['torch']}, MONAI {env['monai']}, "
           f"commit {env['git_commit'][:10]}, {env['date']}. Model: AHNet({', '.join(f'{k}={v}' for k, v in MODEL.items())}), "
           f"float32. Times in seconds per call; CPU = process CPU time (stable on a shared machine), "
           f"wall = elapsed. Ratios ours / MONAI: < 1 means ours is faster.", "",
           "## Ratios (CPU-time min; median in brackets)", "",
           "| case | shape | threads | ours eager / MONAI eager | ours compiled / MONAI eager | "
           "ours eager / MONAI compiled | ours compiled / MONAI compiled | wall: ours eager / MONAI eager |",
           "|---|---|---|---|---|---|---|---|"]

    def r(rat, key):
        v = rat.get(key)
        return f"{v['cpu_min']:.2f} ({v['cpu_median']:.2f})" if v else "-"
    for res in payload["results"]:
        rat = res["ratios"]
        w = rat.get("ours_eager/monai_eager")
        wall = f"{w['wall_min']:.2f}" if w else "-"
        out.append(f"| {res['case']} | {res['shape']} | {res['threads']} | {r(rat, 'ours_eager/monai_eager')} | "
                   f"{r(rat, 'ours_compiled/monai_eager')} | {r(rat, 'ours_eager/monai_compiled')} | "
                   f"{r(rat, 'ours_compiled/monai_compiled')} | {wall} |")
    out += ["", "## Every contender", "",
            "| case | shape | threads | contender | status | CPU min | CPU median | wall min | wall median | "
            "compile wall s | peak RSS +MiB | saved for backward MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in payload["results"]:
        for name, row in res["contenders"].items():
            mem = res.get("memory", {}).get(name, {})
            rss = f"{mem['peak_rss_over_base_bytes'] / 2**20:.0f}" if "peak_rss_over_base_bytes" in mem else \
                (mem.get("error", "-")[:40] if mem else "-")
            saved = f"{mem['saved_for_backward_bytes'] / 2**20:.0f}" if "saved_for_backward_bytes" in mem else "-"
            comp = f"{row['compile_wall_s']:.1f}" if "compiled" in name and "compile_wall_s" in row else "-"
            out.append(f"| {res['case']} | {res['shape']} | {res['threads']} | {name} | {row['status'][:60]} | "
                       f"{_fmt_s(row, 'cpu_min_s')} | {_fmt_s(row, 'cpu_median_s')} | {_fmt_s(row, 'wall_min_s')} | "
                       f"{_fmt_s(row, 'wall_median_s')} | {comp} | {rss} | {saved} |")
    out += ["", "Peak RSS: each contender in its own process, the kernel's peak mark reset after warm-up, "
            "two calls, peak minus the resident set before them (measured with 1 thread only).", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", nargs="+", default=["eval", "train", "segment"], choices=["eval", "train", "segment"])
    p.add_argument("--no-compile", action="store_true", help="skip the compiled contenders")
    p.add_argument("--no-rss", action="store_true", help="skip the per-process peak-memory runs")
    p.add_argument("--no-ckpt", action="store_true", help="skip ours with activation checkpointing (training)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CI smoke run)")
    p.add_argument("--compile-all", action="store_true",
                   help="compiled contenders for every shape and for training (default: eval at the window shape "
                        "and the segment)")
    p.add_argument("--rss-compiled", action="store_true", help="peak-memory runs for the compiled contenders too")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rss_child:
        case, contender, shape, threads = json.loads(a.rss_child)
        shape = [tuple(s) for s in shape] if case == "segment" else tuple(shape)
        print("RSS " + json.dumps(rss_child(case, contender, shape, threads)), flush=True)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    shapes = TINY if a.tiny else FULL
    models = build_models()
    payload = {"env": env_record(), "model": MODEL, "reps": a.reps, "results": []}
    for case in a.cases:
        for i, shape in enumerate(shapes[case]):
            names = ["monai_eager", "ours_eager"]
            if case == "train" and not a.no_ckpt:
                names.append("ours_eager_ckpt")
            # compiled contenders: eval at the segment's window shape and the segment (they share
            # one compile per side); --compile-all adds the other shapes and training
            if not a.no_compile and (a.compile_all or case == "segment" or (case == "eval" and i == 0)):
                names += ["monai_compiled", "ours_compiled"]
            log(f"{case} {shape}")
            results = run_case(case, shape, names, a.threads, a.reps, models, log)
            if not a.no_rss:
                mem_names = names if a.rss_compiled else [n for n in names if "compiled" not in n]
                results[0]["memory"] = {n: measure_rss(case, n, shape, a.threads[0], timeout=1800) for n in mem_names}
            payload["results"] += results
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench.common import atomic_write_text  # a reader never sees half a file

    atomic_write_text(out / "cpu.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out / "cpu.md", markdown(payload))
    log(f"wrote {out / 'cpu.json'} and {out / 'cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
