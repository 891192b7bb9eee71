"""`ahnet-fast train`: the paper's recipe (2D MC-FCN -> transfer -> 3D decoder -> fine-tune) on NIfTI data.

Several processes: ``torchrun --nproc_per_node=N -m ahnet_fast.cli train ...`` or
``ahnet-fast train --nproc N ...`` (DDP, one GPU per process, gloo on CPU; see
:mod:`ahnet_fast.train.distributed`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGE_HELP = "comma-separated subset of 2d,transfer,decoder,finetune (default: all, in that order)"


def _preset_default(field: str) -> str:
    from ahnet_fast.train.presets import describe_default

    return f"default from --preset: {describe_default(field)}"


def _duration(text: str) -> float:
    from ahnet_fast.train.budget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def log_line(msg: str) -> None:
    """Print a line to stdout without breaking the progress bar on stderr (tqdm.write clears it first)."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress`` as given, else bars only when stderr is a terminal."""
    if getattr(args, "progress", None) is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by ',' or 'x', got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip().lstrip("-").replace("-", "_") for v in text.split(",") if v.strip()]


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `demo` (model, schedule, memory)."""
    from ahnet_fast.train.presets import PRESET_SUMMARY

    b = p.add_argument_group("preset and budget")
    b.add_argument("--preset", choices=list(PRESET_SUMMARY),
                   help="a named configuration; the options below change single settings of it. "
                        + "; ".join(f"{k}: {v}" for k, v in PRESET_SUMMARY.items())
                        + " (default: cpu-small on a CPU, gpu-paper on a GPU)")
    b.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="wall time for the whole run, e.g. 20m, 1h30m, 900 (seconds): a few steps of each stage "
                        "are timed first, the preset's steps are scaled by one factor to fit, each stage stops "
                        "at its share, and model.pt is kept current from the first 3D epoch on; with --resume "
                        "the recorded steps stand and the budget bounds the resumed run")
    b.add_argument("--step-budget", type=_positive_int, metavar="N",
                   help="optimizer steps of all trained stages together, split in the preset's proportions")
    b.add_argument("--no-estimate", dest="estimate", action="store_false", default=True,
                   help="skip timing a few steps of each stage before training (then no run ETA is printed)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=_ints, help="AH-Net residual blocks per layer, e.g. 3,4,6,3 (paper)")
    g.add_argument("--psp", type=int, help="PSP pooling branches 0..4 (paper: 4)")
    g.add_argument("--upsample", choices=["transpose", "trilinear", "nearest"], help="AH-Net upsampling mode")
    g.add_argument("--model-2d", choices=["mcfcn", "fcn"], help="2D network of stage 2d (paper: mcfcn)")
    g.add_argument("--fast", dest="fast", action="store_true", default=None,
                   help="train the fast AH-Net (default on CUDA)")
    g.add_argument("--reference", dest="fast", action="store_false", help="train the plain-PyTorch reference AH-Net")
    s = p.add_argument_group("schedule")
    s.add_argument("--steps-2d", type=int, help=f"optimizer steps of stage 2d ({_preset_default('steps_2d')})")
    s.add_argument("--steps-decoder", type=int,
                   help=f"optimizer steps of stage decoder ({_preset_default('steps_decoder')})")
    s.add_argument("--steps-finetune", type=int,
                   help=f"optimizer steps of stage finetune ({_preset_default('steps_finetune')})")
    s.add_argument("--steps-per-epoch", type=int, help="steps per epoch (summary, validation, checkpoint; "
                                                       f"{_preset_default('steps_per_epoch')})")
    s.add_argument("--lr-2d", type=float, help="Adam learning rate of stage 2d (paper 5e-4)")
    s.add_argument("--lr-3d", type=float, help="Adam learning rate of the 3D stages (paper 1e-3)")
    s.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help=f"constant (paper) or cosine decay to 0 within each stage ({_preset_default('lr_schedule')})")
    s.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.99) and "
                        "validate and save it instead of the last weights (default 0: off)")
    s.add_argument("--loss", choices=["ce_then_focal", "ce", "focal", "dice_ce"],
                   help="ce_then_focal (paper): cross-entropy, focal loss once the loss plateaus; dice_ce: "
                        f"cross-entropy + soft Dice ({_preset_default('loss')})")
    s.add_argument("--focal-gamma", type=float, help="focal loss gamma (default 2)")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    m = p.add_argument_group("memory and speed")
    m.add_argument("--patch-2d", type=_ints, help=f"2D patch H,W (multiples of 32; {_preset_default('patch_2d')})")
    m.add_argument("--patch-3d", type=_ints,
                   help=f"3D patch H,W,D (D a multiple of 32; {_preset_default('patch_3d')})")
    m.add_argument("--batch-2d", type=int, help=f"2D micro-batch size ({_preset_default('batch_2d')})")
    m.add_argument("--batch-3d", type=int, help=f"3D micro-batch size ({_preset_default('batch_3d')})")
    m.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"],
                   help="mixed precision: fp16 uses a GradScaler; auto is bf16 where the device computes it "
                        f"natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16), else fp32 ({_preset_default('amp')})")
    m.add_argument("--checkpointing", action="store_true", default=None,
                   help="activation checkpointing (recompute block activations in backward)")
    m.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    m.add_argument("--max-memory", type=float, metavar="GB",
                   help="pick the largest patch/batch/checkpointing that fits in GB (measured on a GPU, "
                        "estimated on the CPU) and print the choice")
    m.add_argument("--workers", type=int, help="DataLoader worker processes (0: patches drawn in the training "
                                                "process; " + _preset_default("num_workers") + ")")
    m.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's, one per core)")
    m.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (its settings, from recipe.json, must be given again)")
    p.add_argument("--overwrite", action="store_true",
                   help="without --resume: replace the results of the stages to run that --out already holds")
    p.add_argument("--override", type=_names, action="extend", default=[], metavar="NAME[,NAME]",
                   help="with --resume: settings that may differ from the resumed run, e.g. lr_3d,seed "
                        "(recorded in recipe.json and log.jsonl)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: shown when stderr is a terminal)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def apply_training_arguments(cfg, args: argparse.Namespace) -> None:
    """Copy the options that were given onto a RecipeConfig."""
    mc = dict(cfg.model_config)
    for key, arg in (("layers", "layers"), ("psp_block_num", "psp"), ("upsample_mode", "upsample")):
        v = getattr(args, arg)
        if v is not None:
            mc[key] = v
    if mc.get("layers") is not None and len(mc["layers"]) != 4:
        raise ValueError(f"--layers needs 4 numbers, got {mc['layers']}")
    cfg.model_config = mc
    simple = {
        "model_2d": "model_2d", "fast": "fast", "steps_2d": "steps_2d", "steps_decoder": "steps_decoder",
        "steps_finetune": "steps_finetune", "steps_per_epoch": "steps_per_epoch", "lr_2d": "lr_2d",
        "lr_3d": "lr_3d", "lr_schedule": "lr_schedule", "ema": "ema", "loss": "loss", "focal_gamma": "focal_gamma",
        "seed": "seed", "batch_2d": "batch_2d",
        "batch_3d": "batch_3d", "amp": "amp", "checkpointing": "checkpointing", "grad_accum": "grad_accum",
        "max_memory": "max_memory", "num_workers": "workers", "device": "device",
        "time_budget": "time_budget", "step_budget": "step_budget",
    }
    for field_, arg in simple.items():
        v = getattr(args, arg, None)
        if v is not None:
            setattr(cfg, field_, v)
    if args.patch_2d is not None:
        if len(args.patch_2d) != 2:
            raise ValueError(f"--patch-2d needs H,W, got {args.patch_2d}")
        cfg.patch_2d = args.patch_2d
    if args.patch_3d is not None:
        if len(args.patch_3d) != 3:
            raise ValueError(f"--patch-3d needs H,W,D, got {args.patch_3d}")
        cfg.patch_3d = args.patch_3d


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train AH-Net with the paper's recipe (2D -> transfer -> 3D decoder -> fine-tune)",
        description="Train on a Medical Segmentation Decathlon folder, a dataset.json or a CSV (columns image,"
                    "label). Stages: 2d (MC-FCN on 3-slice stacks), transfer (2D encoder -> AH-Net), decoder "
                    "(3D decoder, encoder frozen), finetune (everything). Settings start from a --preset (by "
                    "default cpu-small on a CPU, gpu-paper on a GPU); --time-budget or --step-budget scale its steps "
                    "to fit. Outputs in --out: <stage>/last.pt (what a resume needs), <stage>/best.pt and "
                    "<stage>/log.jsonl, model.pt (weights and config for `ahnet-fast segment`, kept at the best 3D "
                    "epoch so far), recipe.json, summary.json and progress.png. Results already in "
                    "--out are never replaced silently: continue with --resume (the same settings; --override to "
                    "change one) or replace them with --overwrite.")
    p.add_argument("data", help="dataset folder, dataset.json or CSV file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stages", default="all", help=STAGE_HELP)
    p.add_argument("--num-classes", type=int, help="classes incl. background (default: dataset.json 'labels')")
    p.add_argument("--intensity", choices=["ct", "percentile", "zscore", "none"],
                   help="ct window (default for CT), zscore (default otherwise: each case's foreground mean and "
                        "standard deviation, clipped at +-3 sd, as nnU-Net normalises MRI) or percentile scaling")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="HU window for --intensity ct (default -125 225, the paper's)")
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="percentiles for --intensity percentile (default 0.5 99.5); for zscore the range the "
                        "foreground is clipped to before its mean and standard deviation are taken")
    p.add_argument("--intensity-stats", choices=["case", "training"], default=None,
                   help="for --intensity percentile or zscore: 'case' scales each image by its own statistics "
                        "(default); 'training' by the training cases' pooled ones, one fixed window for every case, "
                        "recorded in model.pt for `segment` (for one subject or one scanner protocol, where the "
                        "statistics of a partial view shift with what it holds)")
    p.add_argument("--spacing", nargs="+", metavar="H W D|auto|native", default=None,
                   help="resample every case to this voxel size in mm (in-plane, in-plane, slice axis) for training; "
                        "recorded in model.pt so `segment` resamples its inputs to it and the result back. AH-Net "
                        "predicts at half resolution on every axis: on thick slices (e.g. 1 x 1 x 4 mm) half the "
                        "slice spacing (1 1 2) gives it back the slice resolution, at twice the voxels. 'auto' does "
                        "that where slices are 2x the in-plane spacing or more, and halves the in-plane spacing too "
                        "while the largest case stays within 256^3 voxels (same cost per step, larger validation "
                        "and `segment` grids); 'native': the cases' own grids "
                        "(default from --preset: auto under cpu-small, native under the GPU presets)")
    # defaults of None: with --resume, an option not given keeps the resumed run's value
    p.add_argument("--fg-ratio", type=float, default=None, help="share of patches centred on foreground (0.7)")
    p.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the foreground class uniformly first, then a voxel of it; --no-class-balanced: "
                        "a foreground voxel uniformly, so classes in proportion to their volume "
                        "(" + _preset_default("class_balanced") + ")")
    p.add_argument("--no-augment", action="store_true", default=None,
                   help="no augmentation at all (rotation, scaling, mirroring, intensity)")
    p.add_argument("--aug-rotation", type=float, default=None, metavar="DEG",
                   help="in-plane rotation augmentation: largest |angle| in degrees, 0 to 180 (paper and presets: 20; "
                        "0: none)")
    p.add_argument("--aug-scale", type=float, default=None, metavar="FRAC",
                   help="in-plane scaling augmentation: largest |factor - 1|, 0 to <1 (paper and presets: 0.2; 0: none). "
                        "With --aug-rotation 0 --aug-scale 0 only mirroring is left (no interpolation of the patches)")
    p.add_argument("--aug-brightness", type=float, default=None, metavar="FRAC",
                   help="intensity augmentation: multiply the image patch by a factor within 1 +- FRAC, 0 to <1 "
                        "(0: none)")
    p.add_argument("--aug-contrast", type=float, default=None, metavar="FRAC",
                   help="intensity augmentation: scale the patch about its mean by a factor within 1 +- FRAC, clipped "
                        "to its range, 0 to <1 (0: none)")
    p.add_argument("--aug-gamma", type=float, default=None, metavar="G",
                   help="intensity augmentation: gamma between 1/(1+G) and 1+G on the patch rescaled to [0, 1], mean "
                        "and std kept, 0 to 4 (0: none)")
    p.add_argument("--aug-intensity-prob", type=float, default=None, metavar="P",
                   help="probability of each intensity change per patch, 0 to 1 (default 0.3)")
    p.add_argument("--init-2d", help="transfer from this 2D state-dict file (FCN/MCFCN/torchvision ResNet50) "
                                     "instead of stage 2d's output")
    add_training_arguments(p)
    d = p.add_argument_group("several processes (DDP)")
    d.add_argument("--nproc", type=int, default=1,
                   help="worker processes on this machine, one per GPU (same as torchrun --nproc_per_node=N "
                        "-m ahnet_fast.cli train ...); batch sizes are per process (default 1)")
    d.add_argument("--sync-bn", action="store_true", default=None,
                   help="BatchNorm statistics over the batches of all processes (synchronized BatchNorm)")
    d.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="timeout of collectives: a rank waiting on a failed one stops after it (default 1800)")
    p.set_defaults(func=_run)


def _spacing(words: list[str]) -> tuple[float, float, float] | str | None:
    """``--spacing``: ``auto``, ``native`` (None) or 3 sizes in mm; ``ValueError`` naming what is accepted."""
    from ahnet_fast.data.spacing import check_target_spacing

    if len(words) == 1 and words[0] in ("auto", "native"):
        return None if words[0] == "native" else "auto"
    try:
        return check_target_spacing(words)
    except ValueError:
        raise ValueError(f"--spacing {' '.join(words)}: expected 3 positive voxel sizes in mm (H W D, e.g. 1 1 2), "
                         "'auto' or 'native'") from None


def _stages(text: str) -> tuple[str, ...]:
    from ahnet_fast.train.recipe import STAGES

    if text.strip() == "all":
        return STAGES
    st = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in st if s not in STAGES]
    if bad or not st:
        raise ValueError(f"--stages: unknown stage(s) {bad or text!r}; choose from {', '.join(STAGES)} or 'all'")
    return st


def run_guarded(fn, args: argparse.Namespace) -> int:
    """Run ``fn()``; bad input becomes a one-line error and exit code 2 (unless --debug)."""
    from ahnet_fast.data.errors import DataError

    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print("interrupted; resume with --resume (the last checkpoint is intact)", file=sys.stderr)
        return 130
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"ahnet-fast: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, read-only folder: the message names the file
        if getattr(args, "debug", False):
            raise
        print(f"ahnet-fast: error: {_first_line(exc)}", file=sys.stderr)
        return 1


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _worker(args: argparse.Namespace) -> int:
    """Entry point of each --nproc worker (the launcher sets RANK, WORLD_SIZE, ...)."""
    args.nproc = 1
    return _run(args)


def _preflight(cfg) -> None:
    """Checks every rank runs before training: the dataset list and every file's header."""
    from ahnet_fast.data.dataset import check_headers, read_dataset, require_labels

    spec = read_dataset(cfg.data)
    require_labels(spec)
    check_headers(spec.training + spec.validation)


def _read_record(path: Path) -> dict:
    import json

    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the settings of the run to resume ({exc})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object of recipe settings")
    return record


def _run(args: argparse.Namespace) -> int:
    import os

    from ahnet_fast.cli import device_problem
    from ahnet_fast.train import distributed as D

    problem = device_problem(args.device)
    if problem:  # before any data is read or model built (torch's own message blames other things)
        print(f"ahnet-fast: error: --device {args.device}: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "nproc", 1) > 1 and "LOCAL_RANK" not in os.environ:
        try:
            res = D.launch(args.nproc, _worker, (args,))
        except Exception as exc:  # ChildFailedError: the launcher names the failed rank
            print(f"ahnet-fast: error: a worker process failed: {exc}", file=sys.stderr)
            return 1
        return max(int(v or 0) for v in res.values())
    try:
        ctx = D.setup(args.device, getattr(args, "dist_timeout", D.DEFAULT_TIMEOUT_S))
    except ValueError as exc:
        print(f"ahnet-fast: error: {exc}", file=sys.stderr)
        return 2
    try:
        if ctx is not None:
            args.device = ctx.device
        return _run_one(args, ctx)
    except Exception as exc:
        if ctx is None or getattr(args, "debug", False):
            raise
        print(f"ahnet-fast: error: {D.describe_failure(exc)}", file=sys.stderr)
        return 1
    finally:
        D.teardown(ctx)


def preset_for(args: argparse.Namespace) -> tuple[str, str]:
    """The preset to start from and why: ``--preset`` as given, else the device's default."""
    import torch

    from ahnet_fast.train.presets import default_preset

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset is not None:
        why = "--preset"
        if args.preset.startswith("gpu") and torch.device(dev).type != "cuda":
            why += (f"; warning: a GPU schedule on device {dev}: expect it to take very long (see the estimate "
                    "below; --preset cpu-small or --time-budget bound it)")
        return args.preset, why
    name = default_preset(dev)
    return name, f"the default on device {dev}; --preset to choose another"


def _run_one(args: argparse.Namespace, ctx) -> int:
    from ahnet_fast.train import distributed as D

    main_rank = ctx is None or ctx.rank == 0
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)

    def go() -> int:
        import dataclasses

        from ahnet_fast.data.dataset import read_dataset
        from ahnet_fast.data.intensity import STATISTICS_MODES, IntensityConfig
        from ahnet_fast.data.sampling import AugmentConfig
        from ahnet_fast.train.presets import preset_values
        from ahnet_fast.train.recipe import RecipeConfig, recipe_config_from_record, run_recipe

        if args.overwrite and args.resume:
            raise ValueError("--overwrite and --resume contradict each other: choose one")
        if args.override and not args.resume:
            raise ValueError("--override only applies with --resume")
        base = None
        saved = Path(args.out) / "recipe.json"
        if args.resume and saved.is_file():
            # resuming: the run's own settings, so only options given now can differ from them
            base = recipe_config_from_record(_read_record(saved), data=args.data, out_dir=args.out)
        if base is None or args.preset is not None:
            name, why = preset_for(args)
            values = preset_values(name)
            if base is not None:
                base = dataclasses.replace(base, **values, preset=name)
            else:
                base = RecipeConfig(data=args.data, out_dir=args.out, **values, preset=name)
            if main_rank:
                log_line(f"[run] preset {name} ({why})")
        # replace() runs the checks of RecipeConfig again (stages put in recipe order)
        cfg = dataclasses.replace(base, stages=_stages(args.stages))
        if args.intensity is not None or args.ct_window or args.percentiles or args.intensity_stats:
            # the options given change the mode named (or the run's, or the modality's default) field by field
            if args.intensity is not None:
                was = IntensityConfig(args.intensity)
            else:
                was = cfg.intensity or IntensityConfig.for_modality(read_dataset(args.data).modality)
            cfg.intensity = IntensityConfig(was.mode, tuple(args.ct_window or was.window),
                                            tuple(args.percentiles or was.percentiles), was.nonzero,
                                            was.fg_threshold, args.intensity_stats or was.stats)
            # an option the mode does not read would be dropped without a word
            for given, option, modes in ((args.ct_window, "--ct-window", ("ct",)),
                                         (args.percentiles, "--percentiles", STATISTICS_MODES)):
                if given and cfg.intensity.mode not in modes:
                    names = " or ".join(f"--intensity {m}" for m in modes)
                    raise ValueError(f"{option} applies to {names}, and this run normalises with "
                                     f"{cfg.intensity.mode!r}; give {names} or leave {option} out")
        if args.spacing is not None:
            cfg.spacing = _spacing(args.spacing)
        for field_, value in (("num_classes", args.num_classes), ("fg_ratio", args.fg_ratio),
                              ("class_balanced", args.class_balanced), ("init_2d", args.init_2d),
                              ("sync_bn", getattr(args, "sync_bn", None))):
            if value is not None:
                setattr(cfg, field_, value)
        if args.no_augment is not None:
            cfg.augment = AugmentConfig(enabled=not args.no_augment)
        strength = {k: v for k, v in (("rotation", args.aug_rotation), ("scale", args.aug_scale),
                                      ("brightness", args.aug_brightness), ("contrast", args.aug_contrast),
                                      ("gamma", args.aug_gamma), ("intensity_prob", args.aug_intensity_prob))
                    if v is not None}
        if strength:
            given = ", ".join("--aug-" + k.replace("_", "-") for k in strength)
            if args.no_augment:
                raise ValueError(f"{given} set augmentation that --no-augment turns off; give one or the other")
            try:
                cfg.augment = dataclasses.replace(cfg.augment, **strength)
            except ValueError as exc:
                raise ValueError(f"{given}: {exc}") from None
        apply_training_arguments(cfg, args)
        if ctx is not None:  # a rank that cannot see a file stops every rank now, with its error
            D.agree(lambda: _preflight(cfg))
        res = run_recipe(cfg, resume=args.resume, progress=progress_enabled(args) and main_rank,
                         log=log_line if main_rank else (lambda m: None), overwrite=args.overwrite,
                         overrides=args.override, estimate=args.estimate)
        if main_rank:
            print("stage times: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in res["stages"].items()))
            if "finetune" in res["stages"] or (Path(args.out) / "model.pt").is_file():
                print(f"model: {Path(args.out) / 'model.pt'}; next: ahnet-fast segment IMAGES OUT_FOLDER "
                      f"--checkpoint {Path(args.out) / 'model.pt'}")
        return 0

    return run_guarded(go, args)
