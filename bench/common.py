"""Shared machinery of the benchmark suite: environment record, measured ceilings,
timing, the correctness gate, peak memory and atomic result files.

Measurement protocol (see DESIGN.md, "Benchmarks"):

* one process, one device, the same dtype for every contender of a case;
* ``torch.backends.cudnn.benchmark`` on for the baselines (set once per run);
* float32 runs switch TF32 off (cuDNN and matmul), so float32 means float32;
* warm-up first, then the median of >= ``reps`` (default 100) timed calls with
  CUDA events around each call; for small ops (one call under
  ``graph_threshold_ms``) the calls are also captured into a CUDA graph and
  the graph replays are timed, which removes the launch gaps: the primary
  number of a small op is then the graph time;
* inputs rotate among several sets whose total size is at least twice the L2
  cache (50 MB on H100), so repeated calls do not measure the cache;
* every contender is checked against a higher-precision reference (float64 for
  float32 runs, float32 with TF32 off for bf16/fp16 runs) before it is timed;
  a contender that fails the check is reported as ``wrong`` and not timed.

Nothing in this module touches CUDA at import time.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ahnet_fast import _atomic

REPO_ROOT = Path(__file__).resolve().parents[1]

#: L2 size assumed when the device does not report one (H100 SXM: 50 MB).
DEFAULT_L2_BYTES = 50 * 1000 * 1000

#: Datasheet numbers, for the record only (ratios use the measured ceilings).
DATASHEET = {
    "H100": {"hbm_TBps": 3.35, "bf16_dense_TFLOPs": 989.0},
    "H200": {"hbm_TBps": 4.8, "bf16_dense_TFLOPs": 989.0},
}

#: Smallest relative-error limit of the correctness gate per dtype. The limit
#: of a contender is max(2 x error of the same-dtype eager torch composition,
#: this floor): the floor only keeps a lucky baseline from failing contenders
#: that round differently (bf16 output rounding alone is ~1e-3).
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Unavailable(Exception):
    """A contender cannot run in this environment (missing implementation,
    backend not built, wrong device). Reported as ``unavailable: <reason>``."""


# ----------------------------------------------------------------------------
# small utilities


class Deadline:
    """Wall-clock budget shared by a whole benchmark run (None = unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + float(seconds)

    def left(self) -> float:
        return math.inf if self._end is None else self._end - time.monotonic()

    def expired(self, margin: float = 0.0) -> bool:
        return self.left() <= margin


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16'/'bfloat16'/'fp16'/'float16'/'fp32'/'float32' -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in ERROR_FLOOR:
            raise ValueError(f"unsupported dtype {name}; accepted: float32, bfloat16, float16")
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(sorted(DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_device(name: str | None) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cuda', 'cuda:N' or 'cpu'."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device {name!r} not supported; accepted: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release what the last contender left (device memory only: CPU runs skip the slow gc)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def set_flags(dtype: torch.dtype) -> dict:
    """cudnn.benchmark on; TF32 off for float32 runs. Returns the flags set."""
    torch.backends.cudnn.benchmark = True
    if dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def short_error(exc: BaseException, limit: int | None = None) -> str:
    """One line 'Type: message' for result records: the whole message on one line (``limit``, if
    given, cuts it and says so; no suite does, a cut reason is no reason)."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    if limit is None or len(text) <= limit:
        return text
    return text[: limit] + f"... ({len(text) - limit} more characters)"


# ----------------------------------------------------------------------------
# environment record


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_record() -> dict:
    rec: dict[str, Any] = {"commit": os.environ.get("AHNET_FAST_GIT_COMMIT") or None, "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            rec["commit"] = head.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            rec["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git on this machine (the GPU copy of the tree may have no .git)
    if rec["commit"] is None:
        rec["note"] = "no git checkout here; set AHNET_FAST_GIT_COMMIT to record the commit"
    return rec


def _nvidia_smi() -> dict | None:
    fields = ["name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "power.limit", "temperature.gpu", "persistence_mode"]
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": short_error(exc)}
    if res.returncode != 0:
        return {"error": res.stderr.strip()[:200]}
    first = res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""
    return dict(zip(fields, [v.strip() for v in first.split(",")]))


def _backend_status() -> Any:
    try:
        ops = importlib.import_module("ahnet_fast.ops")
        status = getattr(ops, "backend_status")
    except (ImportError, AttributeError) as exc:
        return f"unavailable: {short_error(exc)}"
    try:
        return json.loads(json.dumps(status(), default=str))
    except Exception as exc:  # report, never crash the record
        return f"error: {short_error(exc)}"


def env_record(device: torch.device) -> dict:
    """Everything needed to interpret and repeat a run: versions, device, commit, date."""
    cudnn_version = None
    try:
        if torch.backends.cudnn.is_available():
            cudnn_version = torch.backends.cudnn.version()
    except Exception:
        cudnn_version = None
    rec: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn_version,
        "triton": _pkg_version("triton"),
        "monai": _pkg_version("monai"),
        "ahnet_fast": _pkg_version("ahnet_fast"),
        "git": _git_record(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_bytes=props.total_memory,
            l2_bytes=getattr(props, "L2_cache_size", None),
            nvidia_smi=_nvidia_smi(),
        )
    else:
        rec.update(gpu=None, cpu=platform.processor() or platform.machine())
    rec["backend_status"] = _backend_status()
    return rec


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return int(size) if size > 0 else DEFAULT_L2_BYTES


def gpu_slug(env: dict) -> str:
    name = env.get("gpu") or f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


#: default results folder, relative to the working directory (never the source checkout's bench/results/,
#: which holds only runs committed on purpose: pass --out bench/results/<name> for that)
RESULTS_DIRNAME = "bench-results"


def default_out_dir(env: dict) -> Path:
    """``./bench-results/<YYYY-MM-DD>-<gpu or cpu>/`` in the current working directory."""
    return Path.cwd() / RESULTS_DIRNAME / f"{env['date_utc'][:10]}-{gpu_slug(env)}"


#: what a CPU run times, said before it starts and written into its results
CPU_NOTE = ("CPU run: ahnet_fast's fused kernels are GPU kernels (Triton, CUDA); on a CPU only the plain-PyTorch "
            "paths run (ours[reference], eager and compiled torch, MONAI), the Triton/CUDA rows are reported as "
            "unavailable, and no roofline is computed. CPU timings say nothing about GPU performance; use a GPU "
            "(bash bench/gpu_check.sh) for that.")

#: defaults of a run on a CPU: short, float32, few repetitions, no torch.compile
CPU_DEFAULTS = {"dtype": "float32", "reps": 5, "reps_quick": 3, "max_seconds": 2.0, "budget_s": 180.0}
GPU_DEFAULTS = {"dtype": "bfloat16", "reps": 100, "reps_quick": 30, "max_seconds": 10.0, "budget_s": None}


def run_defaults(device: torch.device) -> dict:
    """The defaults a run on ``device`` uses for options the user did not give."""
    return dict(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)


# ----------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Result of one timing. ``ms`` is the primary number (graph replay per call
    for small ops when capture worked, else the per-call event median)."""

    ms: float
    method: str  # "graph" | "events" | "wall"
    reps: int
    ms_events: float | None = None
    ms_events_p20: float | None = None
    ms_events_p80: float | None = None
    ms_graph: float | None = None
    graph_calls: int | None = None
    graph_error: str | None = None
    rotation_sets: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def rotation_sets(bytes_per_set: int, device: torch.device, max_sets: int = 16) -> int:
    """How many input sets to rotate so their total is >= 2x the L2 cache."""
    l2 = l2_bytes(device)
    if l2 <= 0 or bytes_per_set <= 0 or bytes_per_set >= 2 * l2:
        return 1
    return int(min(max_sets, math.ceil(2 * l2 / bytes_per_set)))


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _event_times(fn: Callable, arg_sets: Sequence[tuple], reps: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    k = len(arg_sets)
    for i in range(reps):
        starts[i].record()
        fn(*arg_sets[i % k])
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _graph_time(fn: Callable, arg_sets: Sequence[tuple], est_ms: float, reps: int) -> tuple[float, int]:
    """Capture m calls (cycling through the input sets) into one CUDA graph and
    return (median ms per call over the replays, m). Outputs are not kept, so the
    graph's private pool reuses one call's worth of memory."""
    k = len(arg_sets)
    m = max(1, min(64, math.ceil(2.0 / max(est_ms, 1e-3))))
    m = k * math.ceil(m / k)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for i in range(3):
            fn(*arg_sets[i % k])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(m):
            fn(*arg_sets[j % k])
    graph.replay()
    torch.cuda.synchronize()
    n = max(20, math.ceil(reps / m))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    per_call = [s.elapsed_time(e) / m for s, e in zip(starts, ends)]
    del graph
    return statistics.median(per_call), m


def time_fn(
    fn: Callable,
    arg_sets: Sequence[tuple],
    device: torch.device,
    *,
    reps: int = 100,
    warmup: int = 5,
    graph: bool | str = "auto",
    graph_threshold_ms: float = 1.0,
    max_seconds: float = 10.0,
    min_reps: int = 10,
) -> Timing:
    """Median time of ``fn(*arg_sets[i % len(arg_sets)])``.

    CUDA: events around each call (median of ``reps``; fewer only when ``reps``
    calls would take longer than ``max_seconds``, never fewer than ``min_reps``,
    and the count is recorded). ``graph``: True, False or "auto" (capture when one
    call takes under ``graph_threshold_ms``); a failed capture is recorded and
    the event median is used. CPU: host clock per call (``method="wall"``).
    """
    if not arg_sets:
        raise ValueError("time_fn needs at least one argument set")
    k = len(arg_sets)
    for i in range(max(1, warmup)):
        fn(*arg_sets[i % k])
    if device.type != "cuda":
        est = []
        for i in range(min(3, reps)):
            t0 = time.perf_counter()
            fn(*arg_sets[i % k])
            est.append(time.perf_counter() - t0)
        n = int(max(1, min(reps, max(min(min_reps, reps), max_seconds / max(statistics.median(est), 1e-9)))))
        # the estimate's calls are timed calls like the others: a slow CPU call is not repeated for nothing
        times = [t * 1e3 for t in est[:n]]
        for i in range(len(times), n):
            t0 = time.perf_counter()
            fn(*arg_sets[i % k])
            times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
        return Timing(ms=med, method="wall", reps=n, ms_events=med, ms_events_p20=_quantile(times, 0.2),
                      ms_events_p80=_quantile(times, 0.8), rotation_sets=k)
    torch.cuda.synchronize(device)
    est_ms = statistics.median(_event_times(fn, arg_sets, min(5, reps)))
    n = int(min(reps, max(min_reps, max_seconds * 1e3 / max(est_ms, 1e-6))))
    times = _event_times(fn, arg_sets, n)
    med = statistics.median(times)
    timing = Timing(ms=med, method="events", reps=n, ms_events=med, ms_events_p20=_quantile(times, 0.2),
                    ms_events_p80=_quantile(times, 0.8), rotation_sets=k)
    want_graph = graph is True or (graph == "auto" and med < graph_threshold_ms)
    if want_graph:
        try:
            timing.ms_graph, timing.graph_calls = _graph_time(fn, arg_sets, med, reps)
            timing.ms, timing.method = timing.ms_graph, "graph"
        except Exception as exc:  # capture is not possible for every contender
            timing.graph_error = short_error(exc)
            torch.cuda.synchronize(device)
    return timing


def peak_memory_bytes(fn: Callable, args: tuple, device: torch.device) -> int | None:
    """Peak device memory one call allocates beyond what was allocated before it
    (inputs, weights and caches excluded; outputs and workspaces included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base)


# ----------------------------------------------------------------------------
# correctness gate


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf on NaN/inf or shape mismatch)."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    a = out.detach().to(device=ref.device, dtype=torch.float64)
    b = ref.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    denom = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    return num / denom if denom > 0 else num


@dataclass
class Check:
    ok: bool
    errors: list[float]
    limits: list[float]
    names: list[str] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict:
        return {"ok": self.ok, "errors": dict(zip(self.names, self.errors)),
                "limits": dict(zip(self.names, self.limits)), "reason": self.reason}


def check_outputs(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], names: Sequence[str],
                  dtype: torch.dtype, base_errors: Sequence[float] | None = None) -> Check:
    """Gate: every output within max(2 x base error, ERROR_FLOOR[dtype]) of the
    reference, none NaN, shapes equal. ``base_errors`` are the errors of the
    same-dtype eager torch composition (None: floor only)."""
    if len(outs) != len(refs):
        return Check(False, [], [], list(names), f"{len(outs)} outputs, reference has {len(refs)}")
    floor = ERROR_FLOOR[dtype]
    errors, limits, bad = [], [], []
    for i, (o, r) in enumerate(zip(outs, refs)):
        e = rel_err(o, r)
        base = base_errors[i] if base_errors is not None and i < len(base_errors) else None
        lim = max(floor, 2.0 * base) if base is not None and math.isfinite(base) else floor
        errors.append(e)
        limits.append(lim)
        if not e <= lim:
            name = names[i] if i < len(names) else str(i)
            what = "shape mismatch" if tuple(o.shape) != tuple(r.shape) else f"rel err {e:.3g} > {lim:.3g}"
            bad.append(f"{name}: {what}")
    return Check(not bad, errors, limits, list(names), "; ".join(bad))


# ----------------------------------------------------------------------------
# ceilings and the cuDNN check


def measure_ceilings(device: torch.device, *, quick: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Measured device-copy bandwidth (bytes read + written) and matmul rate.

    CUDA: a 1 GiB (quick: 256 MiB) device-to-device copy and an 8192^3 (quick:
    4096^3) matmul in ``dtype`` on random data. CPU: nothing is measured (``{"skipped": why}``):
    tiny ops run from the CPU caches, faster than any DRAM copy, so a CPU "roofline" read
    above 100%; no % of a ceiling is reported for a CPU run."""
    rec: dict[str, Any] = {}
    if device.type != "cuda":
        return {"skipped": "CPU run: no ceiling is measured and no % of roofline is reported (small ops run from "
                           "the CPU caches, faster than a DRAM copy, so a copy/matmul ceiling is no roof for them)"}
    n_copy = (128 if quick else 512) * 2**20  # bf16 elements
    # the matmul in the run's dtype: float32 runs have TF32 off, so their ceiling is plain fp32
    mm_n, mm_dtype = (4096 if quick else 8192), dtype
    reps = 10 if quick else 30
    src = torch.randn(n_copy, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), [()], device, reps=reps, warmup=3, graph=False)
    rec["copy_GBps"] = 2 * src.numel() * src.element_size() / (t.ms * 1e-3) / 1e9
    rec["copy_bytes"] = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    t = time_fn(lambda: torch.mm(a, b), [()], device, reps=reps, warmup=3, graph=False)
    rec["matmul_TFLOPs"] = 2 * mm_n**3 / (t.ms * 1e-3) / 1e12
    rec["matmul"] = f"{mm_n}x{mm_n}x{mm_n} {dtype_name(mm_dtype)}"
    del a, b
    free_memory(device)
    name = torch.cuda.get_device_properties(device).name
    for key, sheet in DATASHEET.items():
        if key in name:
            rec["datasheet"] = sheet
    return rec


def describe_ceilings(ceilings: dict) -> str:
    """One line for the log: the measured ceilings, or why there are none."""
    if ceilings.get("skipped"):
        return f"ceilings: not measured ({ceilings['skipped']})"
    return (f"ceilings: device copy {ceilings['copy_GBps']:.0f} GB/s, matmul {ceilings['matmul_TFLOPs']:.1f} "
            f"TFLOP/s ({ceilings.get('matmul')})")


_CUDNN_NAME = re.compile(r"cudnn|xmma|fprop|implicit_convolve|implicit_gemm|conv", re.IGNORECASE)
_FALLBACK_NAME = re.compile(r"vol2col|im2col|col2vol|slow_conv", re.IGNORECASE)


def cudnn_conv_check(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Profile one eager conv3d (decoder 3x3x1 80->20 at 2x96x96x32) in both
    layouts and record the CUDA kernel names: DESIGN.md notes torch builds whose
    bf16 conv3d silently falls back to vol2col + GEMM (about 4x slower)."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    from torch.profiler import ProfilerActivity, profile

    rec: dict[str, Any] = {"rule": "cudnn_like = a kernel name matches "
                                   f"/{_CUDNN_NAME.pattern}/i and none matches /{_FALLBACK_NAME.pattern}/i"}
    torch.backends.cudnn.benchmark = True
    w = torch.randn(20, 80, 3, 3, 1, device=device, dtype=dtype)
    for layout in ("contiguous", "channels_last_3d"):
        x = torch.randn(2, 80, 96, 96, 32, device=device, dtype=dtype)
        ww = w
        if layout == "channels_last_3d":
            x = x.contiguous(memory_format=torch.channels_last_3d)
            ww = w.contiguous(memory_format=torch.channels_last_3d)
        try:
            for _ in range(3):
                torch.nn.functional.conv3d(x, ww, padding=(1, 1, 0))
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                torch.nn.functional.conv3d(x, ww, padding=(1, 1, 0))
                torch.cuda.synchronize(device)
            names = sorted({e.name for e in prof.events()
                            if str(getattr(e, "device_type", "")).endswith("CUDA")})
            rec[layout] = {
                "kernels": names,
                "cudnn_like": any(_CUDNN_NAME.search(n) for n in names)
                and not any(_FALLBACK_NAME.search(n) for n in names),
            }
        except Exception as exc:
            rec[layout] = {"error": short_error(exc)}
    rec["ok"] = all(isinstance(rec.get(l), dict) and rec[l].get("cudnn_like")
                    for l in ("contiguous", "channels_last_3d"))
    free_memory(device)
    return rec


# ----------------------------------------------------------------------------
# files


def to_jsonable(obj: Any) -> Any:
    """Recursively make ``obj`` JSON-safe (non-finite floats -> None, dtypes/paths -> str)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "as_dict"):
        return to_jsonable(obj.as_dict())
    return str(obj)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder, then os.replace."""
    _atomic.atomic_write_bytes(path, data, fsync=True, mkdir=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------
# shared by the suites (bench/ops.py, bench/model.py)


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays free for the caller)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_tf32():
    """cuDNN and matmul in true float32 inside the block (the references), restored after."""
    prev = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the ops and model suites."""
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default ./{RESULTS_DIRNAME}/<date>-<gpu or cpu>/ in the working directory)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None,
                        help="bfloat16 | float16 | float32 (default bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per contender (default on a GPU 100, quick 30; on a CPU 5, quick 3)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget; the rest is recorded as skipped (default: none on a GPU, "
                             f"{CPU_DEFAULTS['budget_s']:.0f} s on a CPU)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-compile", action="store_true", default=None,
                       help="leave out the torch.compile contenders (the default on a CPU)")
    group.add_argument("--compile", dest="no_compile", action="store_false", default=None,
                       help="include the torch.compile contenders (the default on a GPU)")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")


@dataclass(frozen=True)
class RunOptions:
    """The options of :func:`add_run_arguments`, resolved and checked."""
    device: torch.device
    dtype: torch.dtype
    reps: int
    out: Path
    compile: bool = True
    budget_s: float | None = None
    max_seconds: float = 10.0


def run_options(args: argparse.Namespace) -> RunOptions:
    """Resolve --device/--dtype/--reps/--out/--budget-s/--compile with the device's defaults
    (:func:`run_defaults`: a CPU run is short, float32, without torch.compile unless asked);
    raises ValueError on a bad value."""
    device = resolve_device(args.device)
    d = run_defaults(device)
    dtype = parse_dtype(args.dtype or d["dtype"])
    reps = args.reps if args.reps is not None else (d["reps_quick"] if args.quick else d["reps"])
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    budget = getattr(args, "budget_s", None)
    if budget is None:
        budget = d["budget_s"]
    elif not budget > 0:
        raise ValueError(f"--budget-s must be > 0 seconds, got {budget:g}")
    no_compile = getattr(args, "no_compile", None)
    compile_ = (device.type == "cuda") if no_compile is None else not no_compile
    out = Path(args.out) if args.out else default_out_dir(env_record(device))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a folder")
    return RunOptions(device=device, dtype=dtype, reps=reps, out=out, compile=compile_, budget_s=budget,
                      max_seconds=d["max_seconds"])


def suite_main(argv: Sequence[str] | None, *, prog: str, description: str,
               add_arguments: Callable[[argparse.ArgumentParser], None],
               run_from_args: Callable[[argparse.Namespace], Any]) -> int:
    """``python -m bench.<suite>``: the suite's options plus :func:`add_run_arguments`; a bad value
    exits through ``parser.error`` (status 2)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 0
