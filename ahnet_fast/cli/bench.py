"""`ahnet-fast bench [ops|model|all]`: the kernel micro-benchmarks and whole-model runs of bench/.

The suite lives in the source checkout (bench/, beside the ahnet_fast package); it is
not installed with a wheel. Results: bench/results/<date>-<gpu>/ (or --out) as
ops.json/ops.md/roofline.png and model.json/model.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType


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
                        "specs KIND:KHxKWxKD:CIN-COUT:NxHxWxD / zpool:C:NxHxWxD; "
                        "model (target model): NxCxHxWxD list, e.g. 1x1x192x192x64")
    p.add_argument("--model-shapes", default=None, help="model shapes when the target is all")
    p.add_argument("--quick", action="store_true", help="fewer shapes and 30 repetitions")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<date>-<gpu>/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    p.add_argument("--reps", type=int, default=None, help="timed runs per contender (default 100)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget in seconds; what does not fit is recorded as skipped")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode (default max-autotune)")
    p.add_argument("--modes", default="infer,train", help="infer,train (comma-separated)")
    p.add_argument("--contenders", default=None, help="keep contenders whose name contains one of these")
    p.add_argument("--model-config", default="paper", choices=["paper", "transpose-psp3"],
                   help="AH-Net settings of the model suite (paper: psp 4, trilinear)")
    p.add_argument("--layers", default=None, help="model suite: override layers, e.g. 1,1,1,1")
    p.add_argument("--psp", type=int, default=None, help="model suite: override psp_block_num")
    p.set_defaults(func=run)


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
    _bench_package()
    from bench import model as model_suite
    from bench import ops as ops_suite

    common = dict(quick=args.quick, out=args.out, device=args.device, dtype=args.dtype, reps=args.reps,
                  no_compile=args.no_compile, compile_mode=args.compile_mode)
    budget_ops = budget_model = args.budget_s
    if args.target == "all" and args.budget_s is not None:
        budget_ops = 0.55 * args.budget_s
    t0 = time.monotonic()
    try:
        if args.out is None:  # one folder for both suites of this run
            from bench.common import default_out_dir, env_record, resolve_device

            common["out"] = str(default_out_dir(env_record(resolve_device(args.device))))
        if args.target in ("ops", "all"):
            ns = argparse.Namespace(**common, budget_s=budget_ops, shapes=args.shapes, modes=args.modes,
                                    contenders=args.contenders)
            ops_suite.run_from_args(ns)
        if args.target in ("model", "all"):
            if args.target == "all" and args.budget_s is not None:
                budget_model = max(0.0, args.budget_s - (time.monotonic() - t0))
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
