"""`ahnet-fast demo`: the whole recipe on real data that ships with nilearn, end to end.

1. builds the MNI152 2009a tissue task (1 x 1 x 4 mm, 4 classes, posterior
   training part, anterior test part at another slice offset; see
   :mod:`ahnet_fast.data.mni`) as NIfTI files + dataset.json in ``OUT/data``;
2. runs the paper's recipe on it through the same file-based pipeline as
   ``ahnet-fast train`` (2D FCN on 3-slice stacks -> transfer -> 3D decoder with
   frozen encoder -> fine-tune);
3. segments the held-out anterior part, writes ``OUT/test_segmentation.nii.gz``
   and prints the Dice per class and the time per stage.

On a CPU it uses a small configuration (AH-Net with one residual block per
layer, one PSP branch, trilinear upsampling, 64 x 64 x 32 patches) sized to
finish in about ten minutes on two cores; on a GPU the paper's full
configuration with the fast AH-Net and bf16.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ahnet_fast._atomic import atomic_write_text
from ahnet_fast.cli.train import add_training_arguments, apply_training_arguments, run_guarded

# small configuration for a 2-core CPU (see module docstring)
CPU_CONFIG = {
    "model_config": {"layers": (1, 1, 1, 1), "psp_block_num": 1, "upsample_mode": "trilinear"},
    "model_2d": "fcn",
    "patch_2d": (64, 64), "batch_2d": 8, "steps_2d": 60,
    "patch_3d": (64, 64, 32), "batch_3d": 2, "steps_decoder": 40, "steps_finetune": 500,
    "steps_per_epoch": 50, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "cosine",
    # patches are drawn in the main process: a worker would take a core from the 2 torch threads
    "class_balanced": True, "num_workers": 0, "plateau_patience": 2,
}
# the paper's configuration for a GPU
GPU_CONFIG = {
    # full ResNet50 encoder; 3 PSP branches so that 96-voxel-wide patches are valid (4 would need
    # 128 in-plane, wider than the 104-voxel training part)
    "model_config": {"layers": (3, 4, 6, 3), "psp_block_num": 3, "upsample_mode": "trilinear"},
    "model_2d": "mcfcn",
    "patch_2d": (128, 96), "batch_2d": 16, "steps_2d": 1500,
    "patch_3d": (128, 96, 32), "batch_3d": 4, "steps_decoder": 1000, "steps_finetune": 3000,
    "steps_per_epoch": 100, "amp": "bf16", "class_balanced": True, "num_workers": 4,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="build the MNI152 tissue task, run the whole recipe, report test Dice and stage times",
        description="End-to-end demo on nilearn's bundled MNI152 2009a template (nothing is downloaded): "
                    "anisotropic 1x1x4 mm volumes, 4 tissue classes, train on the posterior part, test on the "
                    "anterior part at a different slice offset. Small configuration on a CPU (about 10 minutes "
                    "on 2 cores), the paper's on a GPU.")
    p.add_argument("--out", default="ahnet_demo", help="output folder (default ./ahnet_demo)")
    p.add_argument("--full", action="store_true", default=None,
                   help="the paper's full configuration (default on a GPU)")
    p.add_argument("--small", dest="full", action="store_false", help="the small CPU configuration")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
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
    from ahnet_fast.train.checkpoint import load_checkpoint
    from ahnet_fast.train.models import build_ahnet
    from ahnet_fast.train.recipe import RecipeConfig, evaluate, predict_3d, run_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and (args.device is None or str(args.device).startswith("cuda"))
    full = cuda if args.full is None else args.full
    preset = GPU_CONFIG if full else CPU_CONFIG
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.time()

    t0 = time.time()
    js = build_mni_dataset(out / "data")
    times["data"] = time.time() - t0
    print(f"[data] MNI152 2009a tissue task in {js.parent} ({times['data']:.1f} s)")

    cfg = RecipeConfig(data=str(js), out_dir=str(out / "run"), **{k: v for k, v in preset.items()})
    if not cuda:
        cfg.device = "cpu"
    apply_training_arguments(cfg, args)
    print(f"[demo] {'full' if full else 'small'} configuration: AH-Net {cfg.model_config}, 2D {cfg.model_2d}, "
          f"patches 2D {cfg.patch_2d} 3D {cfg.patch_3d}, steps 2d/decoder/finetune "
          f"{cfg.steps_2d}/{cfg.steps_decoder}/{cfg.steps_finetune}, device {cfg.device or ('cuda' if cuda else 'cpu')}")
    res = run_recipe(cfg, resume=args.resume, progress=not args.no_progress, log=print,
                     overwrite=args.overwrite, overrides=args.override)
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
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    predict = lambda m, im: predict_3d(m, im, None, device, amp)  # noqa: E731
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
    return 0
