"""`ahnet-fast bench [ops|model|all]`: the kernel micro-benchmarks and whole-model runs of bench/.

The suite lives in the source checkout (bench/, beside the ahnet_fast package); it is
not installed with a wheel. Results go to ./bench-results/<date>-<gpu or cpu>/ in the
working directory (or --out) as ops.json/ops.md/roofline.png and model.json/model.md;
bench/results/README.md says what each file holds.

On a GPU: bfloat16, 100 timed calls per contender, the AH-Net shapes, torch.compile included.
On a CPU: ahnet_fast's fused kernels are GPU kernels, so only the plain-PyTorch paths are
timed and the numbers say nothing about GPU performance; the defaults are a short run
(float32, 5 timed calls, 3 with --quick, tiny op shapes, AH-Net at 1x1x128x128x32, no
torch.compile, a 180 s budget per suite), each of which an option overrides.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path
from types import ModuleType

_DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the fused ops and the whole AH-Net against eager, compiled and MONAI",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", default="all", choices=["ops", "model", "all"],
                   help="which suite (default all)")
    p.add_argument("--shapes", default=None,
                   help="ops: case names, groups (all, quick, tiny, decoder, encoder, zpool, synthetic, ahnet) or "
                        "specs KIND:KHxKWxKD:CIN-COUT:NxHxWxD / zpool:C:NxHxWxD (default: all on a GPU, tiny on a "
                        "CPU); model (target model): NxCxHxWxD list, e.g. 1x1x192x192x64")
    p.add_argument("--model-shapes", default=None, help="model shapes when the target is all")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--out", default=None,
                   help="output folder (default ./bench-results/<date>-<gpu or cpu>/ in the working directory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None,
                   help="bfloat16 | float16 | float32 (default bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs per contender (default on a GPU 100, quick 30; on a CPU 5, quick 3)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget in seconds; what does not fit is recorded as skipped (default: none "
                        "on a GPU, 180 s per suite on a CPU)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--no-compile", dest="no_compile", action="store_true", default=None,
                      help="leave out the torch.compile contenders (the default on a CPU)")
    comp.add_argument("--compile", dest="no_compile", action="store_false", default=None,
                      help="include the torch.compile contenders (the default on a GPU; minutes each on a CPU)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")
    p.add_argument("--modes", default=None, help="infer,train (comma-separated; default both, a quick CPU "
                                                 "model run: infer)")
    p.add_argument("--contenders", default=None, help="keep contenders whose name contains one of these")
    p.add_argument("--model-config", default="paper", choices=["paper", "transpose-psp3"],
                   help="AH-Net settings of the model suite (paper: psp 4, trilinear)")
    p.add_argument("--layers", default=None, help="model suite: override layers, e.g. 1,1,1,1")
    p.add_argument("--psp", type=int, default=None, help="model suite: override psp_block_num")
    p.set_defaults(func=run)


def check_options(args: argparse.Namespace) -> str | None:
    """The first option that cannot work, as an error line; checked before torch is imported."""
    if args.dtype is not None and args.dtype.lower() not in _DTYPES:
        return f"--dtype {args.dtype}: expected bfloat16, float16 or float32"
    if args.reps is not None and args.reps < 1:
        return f"--reps {args.reps}: expected an integer >= 1"
    if args.budget_s is not None and not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        return f"--budget-s {args.budget_s:g}: expected a number of seconds > 0"
    if args.modes is not None:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or any(m not in ("infer", "train") for m in modes):
            return f"--modes {args.modes}: expected infer, train or infer,train"
    if args.psp is not None and not 0 <= args.psp <= 4:
        return f"--psp {args.psp}: expected an integer in 0..4"
    if args.layers is not None:
        parts = args.layers.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            return f"--layers {args.layers}: expected 4 comma-separated positive integers, e.g. 1,1,1,1"
    if args.device not in ("auto", "cpu", "cuda") and not (args.device.startswith("cuda:")
                                                           and args.device[5:].isdigit()):
        return f"--device {args.device}: expected auto, cpu, cuda or cuda:N"
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out}: is a file, expected a folder"
    return None


def _bench_package() -> ModuleType:
    """Import bench/ from the checkout this ahnet_fast comes from (editable install or cwd)."""
    import ahnet_fast

    root = Path(ahnet_fast.__file__).resolve().parents[1]
    if (root / "bench" / "ops.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        pkg = importlib.import_module("bench")
        importlib.import_module("bench.ops")
        importlib.import_module("bench.model")
    except ImportError as exc:
        raise SystemExit(
            f"ahnet-fast bench needs the source checkout: bench/ was not found beside {root} ({exc}). "
            "Run it from a clone installed with `pip install -e .`."
        ) from None
    return pkg


def run(args: argparse.Namespace) -> int:
    problem = check_options(args)
    if problem:
        print(f"ahnet-fast bench: error: {problem}", file=sys.stderr)
        return 2
    _bench_package()
    from bench import common as bench_common
    from bench import model as model_suite
    from bench import ops as ops_suite

    try:
        device = bench_common.resolve_device(args.device)
        # shapes are parsed up front: a typo is reported before anything is measured
        if args.target in ("ops", "all") and args.shapes is not None:
            ops_suite.parse_cases(args.shapes, quick=args.quick)
        model_spec = args.shapes if args.target == "model" else args.model_shapes
        if args.target in ("model", "all") and model_spec is not None:
            model_suite.parse_shapes(model_spec, quick=args.quick)
    except ValueError as exc:
        print(f"ahnet-fast bench: error: {exc}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print(f"note: {bench_common.CPU_NOTE}", flush=True)
    common = dict(quick=args.quick, out=args.out, device=args.device, dtype=args.dtype, reps=args.reps,
                  no_compile=args.no_compile, compile_mode=args.compile_mode)
    budget_ops = budget_model = args.budget_s
    if args.target == "all" and args.budget_s is not None:
        budget_ops = 0.55 * args.budget_s
    t0 = time.monotonic()
    try:
        if args.out is None:  # one folder for both suites of this run
            common["out"] = str(bench_common.default_out_dir(bench_common.env_record(device)))
        print(f"results go to {common['out']}", flush=True)
        if args.target in ("ops", "all"):
            ns = argparse.Namespace(**common, budget_s=budget_ops, shapes=args.shapes, modes=args.modes,
                                    contenders=args.contenders)
            ops_suite.run_from_args(ns)
        if args.target in ("model", "all"):
            if args.target == "all" and args.budget_s is not None:
                budget_model = max(1.0, args.budget_s - (time.monotonic() - t0))
            shapes = args.shapes if args.target == "model" else args.model_shapes
            ns = argparse.Namespace(**common, budget_s=budget_model, model_shapes=shapes, model_modes=args.modes,
                                    model_config=args.model_config, layers=args.layers, psp=args.psp,
                                    model_contenders=args.contenders)
            model_suite.run_from_args(ns)
    except ValueError as exc:
        print(f"ahnet-fast bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"results in {common['out']}")
    return 0
