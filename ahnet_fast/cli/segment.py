"""`ahnet-fast segment IN OUT --checkpoint CKPT`: segment NIfTI volumes with a trained AH-Net.

Several processes (``torchrun --nproc_per_node=N -m ahnet_fast.cli segment ...`` or
``--nproc N``): the volumes are split round-robin over the ranks (one GPU each), every output
is written once, by the rank that owns its input, and all ranks exit with the same code.
"""
from __future__ import annotations

import argparse
import sys


def _progress(args: argparse.Namespace) -> bool:
    """--progress/--no-progress as given, else on when stderr is a terminal (as train and demo)."""
    from ahnet_fast.cli.train import progress_enabled

    return progress_enabled(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment NIfTI volumes with a trained checkpoint",
        description=(
            "Segment IN (a .nii/.nii.gz file, a folder of them, or a dataset.json) and write labels to OUT "
            "(a file for a file, else a folder) on the input's grid: same affine, header and orientation. "
            "Outputs are written atomically; a failed case leaves no output; a case's labels and probabilities "
            "are published together. An OUT that would overwrite an input, or two cases with one output name, "
            "is refused before anything runs."
        ),
    )
    p.add_argument("input", metavar="IN", help="NIfTI file, folder of NIfTI files, or dataset.json")
    p.add_argument("output", metavar="OUT", help="output .nii/.nii.gz (file input) or folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint with 'model_config' and 'model'")
    p.add_argument("--probabilities", action="store_true",
                   help="also write class probabilities as <name>_probabilities.nii.gz (4D, float32)")
    p.add_argument("--window", type=int, nargs=3, metavar=("H", "W", "D"), default=None,
                   help="sliding-window size (rounded up to what the network accepts; default: the "
                        "checkpoint's patch size, else 192 192 64)")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap in [0, 1) (default 0.25)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time mirroring: average the outputs over in-plane flips (4 passes per window). "
                        "Default: on when the checkpoint was trained with flip augmentation (it records "
                        "which axes; ahnet-fast train does), off otherwise; --tta forces H and W flips "
                        "when it does not record them, --no-tta runs one pass")
    p.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--device", default=None, help="device for the model (default: cuda if available, else cpu)")
    p.add_argument("--stitch-device", default="cpu", help="device holding the whole-volume output (default cpu)")
    p.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="on a CPU, run the model compiled by torch.compile (inductor, frozen weights): "
                           "compiled once per process, reused for every window and volume; the compile "
                           "time is reported apart")
    comp.add_argument("--no-compile", dest="compile", action="store_false",
                      help="never compile (default today: compiled CPU inference has not measured faster "
                           "than the eager CPU path, see bench/results/cpu.md)")
    p.add_argument("--cascade", action="store_true",
                   help="coarse-to-fine: find the ROI at half in-plane resolution, then segment only the ROI")
    p.add_argument("--cascade-factor", type=int, default=2)
    p.add_argument("--split", default="test", choices=("test", "validation", "training"),
                   help="which list of a dataset.json to segment (default test)")
    p.add_argument("--intensity", choices=("ct", "percentile", "zscore", "none"), default=None,
                   help="override the checkpoint's intensity normalisation")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="HU window for --intensity ct (default -125 225)")
    p.add_argument("--no-resample", dest="resample", action="store_false",
                   help="segment each input on its own grid instead of resampling it to the training spacing "
                        "the checkpoint records (default: resample to it, and labels/probabilities back)")
    p.add_argument("--train-spacing", type=float, nargs=3, metavar=("H", "W", "D"), default=None,
                   help="training spacing in mm (in-plane, in-plane, slice axis) for a checkpoint that does not "
                        "record it, or to override what it records")
    p.add_argument("--nan-to-zero", action="store_true", help="replace NaN/Inf voxels by 0 instead of failing")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoints the safe loader refuses (only for files you trust)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per volume (default: on when stderr is a terminal, as for train and demo)")
    p.add_argument("--nproc", type=int, default=1,
                   help="worker processes (one per GPU), each segmenting its share of the volumes; same as "
                        "torchrun --nproc_per_node=N -m ahnet_fast.cli segment ... (default 1)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="timeout of the collectives between processes (default 1800)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(func=run)


def check_options(args: argparse.Namespace) -> str | None:
    """The first option that is out of range, as an error line; checked before any file is read."""
    from ahnet_fast.cli import device_problem

    if args.window is not None and any(v < 1 for v in args.window):
        return f"--window {' '.join(map(str, args.window))}: expected 3 positive sizes H W D (e.g. 192 192 64)"
    if not 0 <= args.overlap < 1:
        return f"--overlap {args.overlap:g}: expected a fraction in [0, 1) (e.g. 0.25)"
    if args.sw_batch_size < 1:
        return f"--sw-batch-size {args.sw_batch_size}: expected an integer >= 1"
    if args.cascade_factor < 1:
        return f"--cascade-factor {args.cascade_factor}: expected an integer >= 1 (e.g. 2)"
    if args.ct_window is not None and not args.ct_window[0] < args.ct_window[1]:
        return f"--ct-window {args.ct_window[0]:g} {args.ct_window[1]:g}: expected LO < HI (e.g. -125 225)"
    spacing = getattr(args, "train_spacing", None)
    if spacing is not None and not all(v > 0 and v == v and v != float("inf") for v in spacing):
        return (f"--train-spacing {' '.join(f'{v:g}' for v in spacing)}: expected 3 positive sizes in mm "
                "(e.g. 1 1 4)")
    if spacing is not None and not getattr(args, "resample", True):
        return "--train-spacing and --no-resample contradict each other: the spacing is only used to resample"
    if getattr(args, "nproc", 1) < 1:
        return f"--nproc {args.nproc}: expected an integer >= 1"
    if not getattr(args, "dist_timeout", 1.0) > 0:
        return f"--dist-timeout {args.dist_timeout:g}: expected a number of seconds > 0"
    for opt, value in (("--device", args.device), ("--stitch-device", args.stitch_device)):
        if value in (None, "cpu"):  # always usable; checking it would import torch
            continue
        problem = device_problem(value)
        if problem:
            return f"{opt} {value}: {problem}"
    return None


def check_paths(args: argparse.Namespace) -> str | None:
    """The first input/output/checkpoint path that cannot work, as an error line.

    Uses the file system only (no torch import), so a wrong path is reported at once: the input
    exists, a single-file input has a .nii/.nii.gz output whose folder is a folder (or can be
    created), and the checkpoint is a file. Outputs over inputs are refused later, before the model
    loads (:func:`ahnet_fast.infer.segment.check_outputs`).
    """
    from pathlib import Path

    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        return f"{src}: no such file or folder (expected a .nii/.nii.gz file, a folder of them or a dataset.json)"
    if src.is_file() and src.suffix.lower() != ".json":
        name = out.name.lower()
        if not (name.endswith(".nii") or name.endswith(".nii.gz")):
            return f"{out}: output for a single input file must end in .nii or .nii.gz"
        parent = next((q for q in [out.parent, *out.parent.parents] if q.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"{out}: {parent} is a file, not a folder"
    elif out.exists() and not out.is_dir():
        return f"{out}: must be a folder when the input is a folder or a dataset.json"
    return None


def _checkpoint_problem(path: str) -> str | None:
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        return f"{p}: checkpoint file not found (--checkpoint; training writes RUN/model.pt)"
    if not p.is_file():
        return f"{p}: --checkpoint must be a file (e.g. RUN/model.pt), got a folder"
    return None


def shard(pairs: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of the (input, output) pairs: round-robin, so each output has one owner."""
    return pairs[rank::world]


def _worker(args: argparse.Namespace) -> int:
    args.nproc = 1
    return run(args)


def run(args: argparse.Namespace) -> int:
    import os

    problem = check_options(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = check_paths(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from ahnet_fast.train import distributed as D  # imports torch: after the cheap checks

    if getattr(args, "nproc", 1) > 1 and "LOCAL_RANK" not in os.environ:
        res = D.launch(args.nproc, _worker, (args,))
        return max(int(v or 0) for v in res.values())
    try:
        ctx = D.setup(args.device, getattr(args, "dist_timeout", D.DEFAULT_TIMEOUT_S))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        code = _segment(args, ctx)
        if ctx is not None:  # every rank exits with the worst code of all
            import torch
            import torch.distributed as dist

            box = torch.tensor([code], dtype=torch.int64, device=ctx.device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            code = int(box.item())
        return code
    finally:
        D.teardown(ctx)


def _describe_inference(opts, window_source: str) -> str:
    """One line: window (and where it came from), overlap and test-time mirroring."""
    win = "x".join(str(w) for w in opts.window) if opts.window else "whole volume"
    src = f" ({window_source})"
    if opts.mirror_axes:
        names = ",".join("HWD"[a] for a in opts.mirror_axes)
        tta = f"mirrored along {names} ({2 ** len(opts.mirror_axes)} passes per window; --no-tta for one)"
    else:
        tta = "no test-time mirroring"
    return f"inference: {win} windows{src}, overlap {opts.overlap:g}, {opts.blend} blend, {tta}"


def _segment(args: argparse.Namespace, ctx) -> int:
    import torch

    from ahnet_fast._atomic import clean_stale_temps
    from ahnet_fast.data.intensity import IntensityConfig, describe_stats
    from ahnet_fast.data.spacing import training_spacing_from_meta
    from ahnet_fast.infer.model_io import load_model
    from ahnet_fast.infer.segment import (
        SegmentOptions,
        check_writable,
        checkpoint_window,
        collect_inputs,
        intensity_from_meta,
        probabilities_path,
        segment_file,
    )

    device = ctx.device if ctx is not None else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        # refused before the model loads: outputs over inputs, name clashes, unwritable folders
        pairs = collect_inputs(args.input, args.output, split=args.split, probabilities=args.probabilities)
        n_all = len(pairs)
        folders = sorted({str(dst.parent) for _, dst in pairs})
        for folder in folders:
            check_writable(folder)
            if ctx is None or ctx.rank == 0:
                clean_stale_temps(folder)  # left by an earlier run killed with SIGKILL
        if ctx is not None:
            pairs = shard(pairs, ctx.rank, ctx.world_size)
        problem = _checkpoint_problem(args.checkpoint)
        if problem:
            raise FileNotFoundError(problem)
        model, meta = load_model(args.checkpoint, map_location=device, allow_pickle=args.allow_pickle)
        override = None
        if args.intensity is not None:
            kw = {"mode": args.intensity}
            if args.ct_window:
                kw["window"] = tuple(args.ct_window)
            override = IntensityConfig(**kw)
        intensity = intensity_from_meta(meta, override)
        train_spacing = tuple(args.train_spacing) if args.train_spacing else training_spacing_from_meta(meta)
        window = args.window or checkpoint_window(meta)
        opts = SegmentOptions.from_checkpoint(
            meta, tta=args.tta, window=tuple(args.window) if args.window else None,
            overlap=args.overlap, blend=args.blend, sw_batch_size=args.sw_batch_size,
            device=device, stitch_device=args.stitch_device, bf16=args.bf16, progress=_progress(args),
            cascade=args.cascade, cascade_factor=args.cascade_factor,
            nonfinite="zero" if args.nan_to_zero else "raise", compile=args.compile,
            resample=getattr(args, "resample", True), training_spacing=train_spacing,
        )
    except (OSError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if ctx is None or ctx.rank == 0:
        print(_describe_inference(opts, "--window" if args.window else "the checkpoint's training patch" if window
                                  else "the default: the checkpoint records no training patch"))
    failures = 0
    warned: set[str] = set()
    for src, dst in pairs:
        try:
            res = segment_file(src, dst, model, intensity, opts, probabilities=args.probabilities, warn=False)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: e.g. out of memory
            if getattr(args, "debug", False):
                raise
            failures += 1
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # an error about the output (full disk, ...) names the output already; others get the input
            named = str(src) in msg or str(dst) in msg or str(probabilities_path(dst)) in msg
            print(f"error: {msg}" if named else f"error: {src}: {msg}", file=sys.stderr)
            continue
        fg = int((res.labels > 0).sum())
        line = f"{src} -> {dst}  ({res.seconds:.1f} s, {fg} foreground voxels"
        if "pass2_fraction" in res.stats:
            line += (f", cascade: pass 2 on {100 * res.stats['pass2_fraction']:.1f}% of the voxels, "
                     f"{res.stats['time_pass1']:.1f} s + {res.stats['time_pass2']:.1f} s")
        if res.stats.get("compile_seconds"):
            line += f", of which compiling {res.stats['compile_seconds']:.1f} s"
        print(line + ")")
        print(f"  {res.stats['spacing']}")
        print(f"  {describe_stats(res.stats['intensity'])}")
        for w in res.stats.get("warnings", []):
            if w not in warned or "training spacing unknown" not in res.stats["spacing"]:
                print(f"warning: {src}: {w}", file=sys.stderr)
            warned.add(w)
    if ctx is not None:
        print(f"[rank {ctx.rank}/{ctx.world_size}] segmented {len(pairs) - failures} of its {len(pairs)} case(s) "
              f"({n_all} in all)")
    if failures:
        print(f"{failures} of {len(pairs)} case(s) failed; their outputs were not written", file=sys.stderr)
        return 1
    return 0
