"""`ahnet-fast warmup`: compile ahead of time the Triton kernels one AH-Net configuration needs.

Triton compiles a kernel the first time a launch with a new specialisation runs (and keeps it in
its on-disk cache, ~/.triton/cache or TRITON_CACHE_DIR, for later processes).  The launchers pick
one fixed tile per layer kind and never specialise on the volume size (kernels/conv.py,
kernels/aot.py), so one forward (+ backward with --train) of the model at ANY valid size compiles
everything that configuration will ever launch: warmup runs exactly that, once, on the triton
backend, and prints how long it took and how many kernel variants it went through.

Without a CUDA GPU there is nothing to compile (Triton builds kernels for the GPU it runs on; the
CPU path is the reference backend): warmup says so and exits 0.  It then still lists, with --list,
what a GPU would compile (recorded under the Triton interpreter, nothing executed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "warmup", help="compile the Triton kernels a model configuration needs, ahead of time",
        description="Run one forward (and, with --train, one training step) of the fast AH-Net on the "
                    "triton backend so that every kernel variant it uses is compiled into Triton's "
                    "on-disk cache; prints the time and the number of kernel variants. Kernels do not "
                    "depend on the volume size, so any valid --shape warms every size. Without a CUDA GPU "
                    "there is nothing to compile: it says so and exits 0 (--list then shows what a GPU "
                    "would compile).")
    p.add_argument("--psp", type=int, default=4, help="psp_block_num (default 4, as MONAI)")
    p.add_argument("--upsample", default="transpose", help="upsample_mode (default transpose, as MONAI)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=1)
    p.add_argument("--model-config", metavar="FILE",
                   help="AHNet keyword arguments from a JSON file ({...} or {\"model_config\": {...}}) or a "
                        "checkpoint holding 'model_config'; overrides --psp/--upsample/--in/out-channels")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--shape", type=int, nargs=5, metavar=("N", "C", "H", "W", "D"),
                   help="input shape (default: the smallest valid one; the size does not change the kernels)")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d input (the fast layout)")
    p.add_argument("--train", action="store_true", help="also a training step (forward + backward)")
    p.add_argument("--list", action="store_true", help="print every kernel variant")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # internal: CPU census
    p.set_defaults(func=_run)


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"spatial_dims": 3, "in_channels": args.in_channels, "out_channels": args.out_channels,
                           "psp_block_num": args.psp, "upsample_mode": args.upsample}
    if args.model_config:
        if args.model_config.endswith(".json"):
            with open(args.model_config) as f:
                loaded = json.load(f)
        else:
            import torch
            loaded = torch.load(args.model_config, map_location="cpu", weights_only=True)
        loaded = loaded.get("model_config", loaded) if isinstance(loaded, dict) else None
        if not isinstance(loaded, dict):
            raise SystemExit(f"warmup: {args.model_config} holds no AHNet keyword arguments (model_config)")
        cfg.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in loaded.items()})
    return cfg


def _workload(args: argparse.Namespace, device: str):
    """(model, input, steps): the calls that compile everything the configuration launches."""
    import torch

    from ahnet_fast import AHNet
    from ahnet_fast.models.validation import valid_spatial_shape

    dtype = getattr(torch, _DTYPES[args.dtype])
    model = AHNet(**_model_config(args)).to(device=device, dtype=dtype)
    if args.shape:
        shape = tuple(args.shape)
    else:
        n = 1
        shape = (n, model.input_spec.in_channels,
                 *valid_spatial_shape(model.input_spec, (1, 1, 1), batch=n, training=args.train))
    x = torch.randn(shape, device=device, dtype=dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model(x)

    def train_step():
        model.train()
        model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)

    steps = [("eval forward", eval_forward)] + ([("train step", train_step)] if args.train else [])
    return shape, steps


def _gpu_warmup(args: argparse.Namespace) -> dict:
    import torch
    from triton.runtime.jit import JITFunction

    import ahnet_fast
    from ahnet_fast.kernels.aot import spec_of

    shape, steps = _workload(args, "cuda")
    seen: dict = {}
    launches = [0]
    orig = JITFunction.run

    def run(self, *a, grid, warmup, **kw):
        # count the distinct compile keys as the launches go through (the kernels really run)
        seen.setdefault(spec_of(self, a, kw), True)
        launches[0] += 1
        return orig(self, *a, grid=grid, warmup=warmup, **kw)

    out = {"device": torch.cuda.get_device_name(), "shape": list(shape), "dtype": args.dtype, "steps": []}
    JITFunction.run = run
    try:
        with ahnet_fast.use_backend("triton"):
            for name, step in steps:
                before = len(seen)
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                out["steps"].append({"step": name, "seconds": round(time.perf_counter() - t0, 2),
                                     "new_variants": len(seen) - before})
    finally:
        JITFunction.run = orig
    out.update(variants=len(seen), launches=launches[0], kernels=[s.short() for s in seen])
    return out


def _cpu_census(args: argparse.Namespace) -> dict:
    """Under the interpreter (set by the caller): record, do not run, what a GPU would compile."""
    import ahnet_fast
    from ahnet_fast.kernels.aot import record_specs

    shape, steps = _workload(args, "cpu")
    out = {"shape": list(shape), "dtype": args.dtype, "steps": []}
    seen: dict = {}
    n = 0
    with ahnet_fast.use_backend("triton"):
        for name, step in steps:
            before = len(seen)
            with record_specs() as log:
                step()
            for s in log.specs:
                seen.setdefault(s, True)
            n += len(log.specs)
            out["steps"].append({"step": name, "new_variants": len(seen) - before})
    out.update(variants=len(seen), launches=n, kernels=[s.short() for s in seen])
    return out


def _print(summary: dict, args: argparse.Namespace, header: str) -> None:
    if args.json:
        print(json.dumps(summary if args.list else {k: v for k, v in summary.items() if k != "kernels"}))
        return
    print(header)
    for st in summary["steps"]:
        secs = f" in {st['seconds']:.1f} s" if "seconds" in st else ""
        print(f"  {st['step']}: {st['new_variants']} new kernel variants{secs}")
    print(f"  total: {summary['variants']} kernel variants, {summary['launches']} launches")
    if args.list:
        for k in summary["kernels"]:
            print("   ", k)


def _run(args: argparse.Namespace) -> int:
    if args.record:
        print(json.dumps(_cpu_census(args)))
        return 0
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        t0 = time.perf_counter()
        summary = _gpu_warmup(args)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        _print(summary, args, f"warmup on {summary['device']}: {summary['variants']} Triton kernel variants "
                              f"compiled or loaded from Triton's cache in {summary['seconds']:.1f} s "
                              f"(input {tuple(summary['shape'])}, {args.dtype})")
        return 0
    print("warmup: no CUDA GPU visible -- Triton compiles kernels only for the GPU it runs on, so there is "
          "nothing to compile here (the CPU runs the reference backend).")
    if not args.list and not args.json:
        return 0
    # the census needs the Triton interpreter, which must be chosen before triton is imported
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "ahnet_fast.cli", "warmup", *_argv_of(args), "--record"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return proc.returncode
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    _print(summary, args, f"a GPU would compile {summary['variants']} Triton kernel variants for this "
                          f"configuration ({args.dtype}, recorded on the CPU, nothing run):")
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    out = ["--psp", str(args.psp), "--upsample", args.upsample, "--in-channels", str(args.in_channels),
           "--out-channels", str(args.out_channels), "--dtype", args.dtype]
    if args.model_config:
        out += ["--model-config", args.model_config]
    if args.shape:
        out += ["--shape", *map(str, args.shape)]
    for flag in ("channels_last", "train", "list", "json"):
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    return out
