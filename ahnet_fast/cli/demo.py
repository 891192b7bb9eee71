"""`ahnet-fast demo`: the whole recipe on real data that ships with nilearn, end to end.

1. builds the MNI152 2009a tissue task (1 x 1 x 4 mm, 4 classes, posterior
   training part, anterior test part at another slice offset; see
   :mod:`ahnet_fast.data.mni`) as NIfTI files + dataset.json in ``OUT/data``;
2. runs the paper's recipe on it through the same file-based pipeline as
   ``ahnet-fast train`` (2D FCN on 3-slice stacks -> transfer -> 3D decoder with
   frozen encoder -> fine-tune);
3. segments the held-out anterior part, writes ``OUT/test_segmentation.nii.gz``
   and prints the Dice per class and the time per stage.

On a CPU it uses the ``cpu-small`` preset (AH-Net with one residual block per
layer, one PSP branch, nearest upsampling, 64 x 64 x 32 patches) sized to
finish in about five minutes on two cores; on a GPU the paper's full
configuration with the fast AH-Net and bf16, its patches narrowed to the
demo's volumes.

Output folder (``--out``, default ``./ahnet_demo`` in the current directory):
``data/`` (the task: NIfTI images, labels, dataset.json), ``run/`` (the training
run: model.pt, summary.json, progress.png, one folder per stage),
``test_segmentation.nii.gz`` and ``demo_result.json``. The demo ends by printing
these paths and the `ahnet-fast show` / `segment` commands to try next.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ahnet_fast._atomic import atomic_write_text
from ahnet_fast.cli.train import (
    add_training_arguments,
    apply_training_arguments,
    log_line,
    progress_enabled,
    run_guarded,
)
from ahnet_fast.train.presets import PRESETS, resolve_amp

#: default output folder (relative to the current directory)
DEFAULT_OUT = "ahnet_demo"
# small configuration for a 2-core CPU (see module docstring): the cpu-small preset
CPU_CONFIG = dict(PRESETS["cpu-small"])
#: the GPU presets, narrowed to the demo's volumes: full ResNet50 encoder; 3 PSP branches so that
#: 96-voxel-wide patches are valid (4 would need 128 in-plane, wider than the 104-voxel training part)
DEMO_GPU_CHANGES = {
    "model_config": {"layers": (3, 4, 6, 3), "psp_block_num": 3, "upsample_mode": "trilinear"},
    "patch_2d": (128, 96), "batch_2d": 16, "steps_2d": 1500,
    "patch_3d": (128, 96, 32), "batch_3d": 4, "steps_decoder": 1000, "steps_finetune": 3000,
    "steps_per_epoch": 100, "amp": "bf16", "class_balanced": True, "num_workers": 4,
}
GPU_CONFIG = {**PRESETS["gpu-paper"], **DEMO_GPU_CHANGES}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="build the MNI152 tissue task, run the whole recipe, report test Dice and stage times",
        description="End-to-end demo on nilearn's bundled MNI152 2009a template (nothing is downloaded): "
                    "anisotropic 1x1x4 mm volumes, 4 tissue classes, train on the posterior part, test on the "
                    "anterior part at a different slice offset. Small configuration on a CPU (about 5 minutes "
                    "on 2 cores), the paper's on a GPU.")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder (default ./{DEFAULT_OUT} in the current directory): data/, run/ (model.pt, "
                        "summary.json, progress.png), test_segmentation.nii.gz, demo_result.json")
    p.add_argument("--full", action="store_true", default=None,
                   help="the paper's full configuration (default on a GPU; same as --preset gpu-paper)")
    p.add_argument("--small", dest="full", action="store_false",
                   help="the small CPU configuration (same as --preset cpu-small)")
    add_training_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ahnet_fast.cli import device_problem

    problem = device_problem(args.device)
    if problem:
        print(f"ahnet-fast: error: --device {args.device}: {problem}", file=sys.stderr)
        return 2
    return run_guarded(lambda: run_demo(args), args)


def run_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ahnet_fast.data.dataset import load_case, read_dataset
    from ahnet_fast.data.mni import CLASS_NAMES, build_mni_dataset
    from ahnet_fast.data.nifti import save_like
    from ahnet_fast.infer.segment import SegmentOptions, predict_at_training_spacing
    from ahnet_fast.train.checkpoint import load_checkpoint
    from ahnet_fast.train.models import build_ahnet
    from ahnet_fast.train.recipe import RecipeConfig, evaluate, run_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and (args.device is None or str(args.device).startswith("cuda"))
    if args.preset is not None:
        if args.full is not None and args.full != args.preset.startswith("gpu"):
            raise ValueError(f"--preset {args.preset} and --{'full' if args.full else 'small'} contradict each "
                             "other: choose one")
        full = args.preset.startswith("gpu")
        name = args.preset
    else:
        full = cuda if args.full is None else args.full
        name = "gpu-paper" if full else "cpu-small"
    preset = {**PRESETS[name], **(DEMO_GPU_CHANGES if full else {})}
    if name == "gpu-12gb":
        preset["max_memory"] = PRESETS[name]["max_memory"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.time()

    t0 = time.time()
    js = build_mni_dataset(out / "data")
    times["data"] = time.time() - t0
    log_line(f"[data] MNI152 2009a tissue task in {js.parent} ({times['data']:.1f} s)")

    cfg = RecipeConfig(data=str(js), out_dir=str(out / "run"), **{k: v for k, v in preset.items()}, preset=name)
    if not cuda:
        cfg.device = "cpu"
    apply_training_arguments(cfg, args)
    log_line(f"[demo] {'full' if full else 'small'} configuration (preset {name}): AH-Net {cfg.model_config}, "
             f"2D {cfg.model_2d}, patches 2D {cfg.patch_2d} 3D {cfg.patch_3d}, steps 2d/decoder/finetune "
             f"{cfg.steps_2d}/{cfg.steps_decoder}/{cfg.steps_finetune}, device "
             f"{cfg.device or ('cuda' if cuda else 'cpu')}")
    res = run_recipe(cfg, resume=args.resume, progress=progress_enabled(args), log=log_line,
                     overwrite=args.overwrite, overrides=args.override, estimate=args.estimate)
    for k, v in res["stages"].items():
        times[k] = v["seconds"]

    # segment the held-out anterior part with the final model
    t0 = time.time()
    spec = read_dataset(js)
    k = res["num_classes"]
    ck = load_checkpoint(out / "run" / "model.pt")
    model = build_ahnet(ck["model_config"], fast=cfg.fast)
    model.load_state_dict(ck["model"])
    device = torch.device(cfg.device or ("cuda" if cuda else "cpu"))
    model.to(device).eval()
    test_cases = [load_case(r, k, res["intensity"]) for r in spec.test]
    # as `ahnet-fast segment` runs the model: windows of the training patch, mirrored along the
    # trained flips (bf16 where the training was)
    opts = SegmentOptions.from_checkpoint(ck, device=str(device), bf16=resolve_amp(cfg.amp, device)[0] == "bf16")

    done: dict[int, torch.Tensor] = {}  # the test segmentation below reuses evaluate's prediction
    spacing_of = {id(c.image): c.spacing for c in test_cases}

    def predict(m, im):
        if id(im) not in done:  # on the training spacing when it differs, the result on the case's grid
            res = predict_at_training_spacing(im, spacing_of[id(im)], m, opts)
            done[id(im)] = torch.from_numpy(res.probabilities).permute(3, 0, 1, 2)
        return done[id(im)]
    ev = evaluate(model, test_cases, k, predict)
    seg = predict(model, test_cases[0].image).argmax(0).numpy().astype(np.uint8)
    save_like(seg, test_cases[0].volume, out / "test_segmentation.nii.gz")
    times["test"] = time.time() - t0
    times["total"] = time.time() - t_all

    names = CLASS_NAMES if len(CLASS_NAMES) == k else [str(i) for i in range(k)]
    print("\nHeld-out (anterior, other slice offset) Dice per class:")
    for name, d in zip(names, ev["dice"]):
        print(f"  {name:<14s} {d:.3f}")
    print(f"  mean foreground {ev['mean_fg_dice']:.3f}")
    print("Time per stage: " + ", ".join(f"{s} {t:.1f} s" for s, t in times.items()))
    result = {"dice": dict(zip(names, ev["dice"])), "mean_fg_dice": ev["mean_fg_dice"], "seconds": times,
              "config": "full" if full else "small", "device": str(device),
              "segmentation": str(out / "test_segmentation.nii.gz")}
    atomic_write_text(out / "demo_result.json", json.dumps(result, indent=2))
    run = out / "run"
    test_image = Path(spec.test[0].image)
    print(f"\nResults in {out.resolve()}:")
    print(f"  model            {run / 'model.pt'}")
    print(f"  training summary {run / 'summary.json'}, curves {run / 'progress.png'}")
    print(f"  test segmentation {out / 'test_segmentation.nii.gz'} (Dice in {out / 'demo_result.json'})")
    print("Try next:")
    truth = spec.test[0].label
    centre = f" --center-on {truth}" if truth else ""
    print(f"  ahnet-fast show {test_image} --seg {out / 'test_segmentation.nii.gz'}{centre} --out {out / 'test.png'}")
    if truth:
        print(f"  ahnet-fast show {test_image} --seg {truth} --out {out / 'test_truth.png'}   (the same slices, "
              "ground truth)")
    print(f"  ahnet-fast segment {test_image} {out / 'my_segmentation.nii.gz'} --checkpoint {run / 'model.pt'}")
    return 0
