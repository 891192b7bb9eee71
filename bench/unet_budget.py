"""AH-Net (`ahnet-fast train --time-budget`) against a small MONAI 3D UNet trained for the same wall time.

The question of issue 17: with a fixed time budget on a small machine (e.g. 20 minutes on 2 CPU
cores), which gets the better Dice on unseen data? Both methods see the same training cases with
the same intensity normalisation, are given the same wall time (AH-Net: its whole recipe,
warm-up measurement included; UNet: its training loop), and are scored on the same held-out cases.

* AH-Net: ``ahnet-fast train DATA --time-budget B --preset cpu-small`` in a child process, then
  the held-out cases segmented with ``model.pt`` as ``ahnet-fast segment`` does it (windows of the
  training patch, mirrored along the trained in-plane flips), and in one pass without mirroring.
* UNet: ``monai.networks.nets.UNet`` (channels 16-32-64, strides 2-2, two residual units), Dice +
  cross-entropy loss, Adam 1e-3, random 64 x 64 x 16 patches (batch 2; half of them centred on
  foreground; weights and draws seeded by ``--unet-seed``), trained until the budget is spent, then
  MONAI's sliding-window inference (64 x 64 x 16 windows, overlap 0.25), alone and averaged over
  the same in-plane mirroring.

Data: a dataset.json (``--data``; held-out cases = its "test" list with labels, else "validation"),
or by default the MNI152 tissue task of :mod:`ahnet_fast.data.mni` with a chosen split
(``--split``: ``0`` trains on the posterior part and tests on the anterior part; ``1`` the other way
round, so a tuning run never rests on one split).

Results: ``OUT/unet_budget.json`` and ``OUT/unet_budget.md`` (side by side: steps, seconds, Dice per
class, mean foreground Dice), written atomically, with the machine and versions.

Usage::

    python -m bench.unet_budget --budget 20m --threads 2 --out bench_results/unet_budget
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _dice(pred: np.ndarray, gt: np.ndarray, k: int) -> list[float]:
    out = []
    for c in range(k):
        p, g = pred == c, gt == c
        den = int(p.sum()) + int(g.sum())
        out.append(float("nan") if den == 0 else 2.0 * int((p & g).sum()) / den)
    return out


def _mean_fg(dice: Sequence[float]) -> float:
    fg = [d for d in dice[1:] if d == d]
    return float(np.mean(fg)) if fg else float("nan")


def build_data(out: Path, split: int) -> Path:
    """The MNI tissue task, split ``split`` (0: train posterior / test anterior; 1: swapped)."""
    from ahnet_fast.data.mni import build_mni_dataset

    js = build_mni_dataset(out / f"mni_split{split}")
    if split == 1:
        spec = json.loads(js.read_text())
        spec["training"], spec["test"] = ([{"image": t["image"], "label": t["label"]} for t in spec["test"]
                                           if isinstance(t, dict) and t.get("label")] or spec["training"],
                                          spec["training"])
        spec.pop("validation", None)  # the validation part is from the other (now test) region
        js2 = js.parent / "dataset_split1.json"
        js2.write_text(json.dumps(spec, indent=2))
        return js2
    return js


def held_out(spec: Any) -> list[Any]:
    cases = [r for r in spec.test if r.label] or [r for r in spec.validation if r.label]
    if not cases:
        raise SystemExit(f"{spec.source}: no labelled test or validation case to score on")
    return cases


def score_ahnet(data: Path, model_pt: Path) -> list[dict[str, Any]]:
    """Held-out Dice of ``model_pt`` as ``ahnet-fast segment`` runs it (the checkpoint's training
    patch as the window, mirrored along its trained flips), and in one pass without mirroring."""
    from ahnet_fast.data.dataset import load_case, read_dataset
    from ahnet_fast.data.intensity import IntensityConfig
    from ahnet_fast.infer.segment import SegmentOptions, predict_at_training_spacing
    from ahnet_fast.train.checkpoint import load_checkpoint
    from ahnet_fast.train.models import build_ahnet

    ck = load_checkpoint(model_pt)
    model = build_ahnet(ck["model_config"], fast=False)
    model.load_state_dict(ck["model"])
    model.eval()
    intensity = IntensityConfig.from_dict(ck["preprocessing"]["intensity"])
    spec = read_dataset(data)
    k = int(ck["model_config"]["out_channels"])
    cases = [load_case(r, k, intensity) for r in held_out(spec)]
    rows = []
    for tta in (None, False):
        opts = SegmentOptions.from_checkpoint(ck, tta=tta, device="cpu")
        counts = [_dice(predict_at_training_spacing(c.image, c.spacing, model, opts).labels, c.label, k)
                  for c in cases]
        dice = [float(np.nanmean([c[i] for c in counts])) for i in range(k)]
        mirror = ",".join("HWD"[a] for a in opts.mirror_axes) or "none"
        rows.append({"inference": f"{'x'.join(map(str, opts.window))} windows, mirroring {mirror}",
                     "dice": dice, "mean_fg_dice": _mean_fg(dice)})
    return rows


def run_ahnet(data: Path, out: Path, budget_s: float, threads: int, extra: Sequence[str],
              train: bool = True) -> list[dict[str, Any]]:
    """Train with the recipe under the budget (child process; ``train=False`` keeps an earlier run's
    model.pt), score model.pt on the held-out cases (:func:`score_ahnet`)."""
    run = out / "ahnet"
    seconds = float("nan")
    if train:
        cmd = [sys.executable, "-m", "ahnet_fast.cli", "train", str(data), "--out", str(run), "--time-budget",
               f"{budget_s:g}", "--threads", str(threads), "--device", "cpu", "--no-progress", "--overwrite", *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.time() - t0
        (out / "ahnet_train.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"ahnet-fast train failed (exit {proc.returncode}); see {out / 'ahnet_train.log'}")
    elif not (run / "model.pt").is_file():
        raise SystemExit(f"--score-only: {run / 'model.pt'} does not exist; train first (without --score-only)")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    steps = {s: v.get("steps") for s, v in summary.get("stages", {}).items()}
    if not train:
        seconds = float(summary.get("seconds_this_invocation", float("nan")))
    method = "AH-Net (ahnet-fast train --time-budget, " + " ".join(extra or ["--preset cpu-small"]) + ")"
    if not train:
        method = f"AH-Net ({run / 'model.pt'}, scored again)"
    rows = score_ahnet(data, run / "model.pt")
    return [{"method": method, "seconds": seconds, "steps": steps, **row} for row in rows]


def run_unet(data: Path, budget_s: float, threads: int, seed: int = 0,
             intensity_stats: str = "case", intensity_mode: str | None = None) -> list[dict[str, Any]]:
    """The small MONAI UNet, trained for ``budget_s`` seconds of wall time (module docstring), its
    images normalised as AH-Net's are: ``intensity_mode`` as ``train --intensity`` (None: the modality's
    default), with ``intensity_stats`` as ``train --intensity-stats`` (``"training"``: the training cases'
    pooled statistics for every case)."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from ahnet_fast.data.dataset import load_case, read_dataset, training_intensity
    from ahnet_fast.data.intensity import IntensityConfig
    from ahnet_fast.data.loader import PatchDataset, make_loader
    from ahnet_fast.data.sampling import AugmentConfig

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = read_dataset(data)
    k = spec.num_classes
    if k is None:
        raise SystemExit(f"{data}: declare \"labels\" in dataset.json")
    base = IntensityConfig(intensity_mode) if intensity_mode else IntensityConfig.for_modality(spec.modality)
    intensity = training_intensity(spec, dataclasses.replace(base, stats=intensity_stats))
    t0 = time.time()
    train = [load_case(r, k, intensity) for r in spec.training]
    patch = (64, 64, 16)
    ds = PatchDataset([], k, intensity, patch, fg_ratio=0.5, augment=AugmentConfig(enabled=False), seed=seed,
                      mode="3d", cases=train)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=k, channels=(16, 32, 64), strides=(2, 2),
               num_res_units=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    steps = 0
    for batch in make_loader(ds, 2, 10**9, num_workers=0):
        if time.time() - t0 >= budget_s:
            break
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch["image"]), batch["label"][:, None])
        loss.backward()
        opt.step()
        steps += 1
    seconds = time.time() - t0
    net.eval()
    cases = [load_case(r, k, intensity) for r in held_out(spec)]
    rows = []
    # as a MONAI user runs it, and with the same in-plane mirroring `segment` gives AH-Net (the
    # UNet is trained without flips, so this is what test-time mirroring alone buys it)
    for flips in ([()], [(), (2,), (3,), (2, 3)]):
        counts = []
        with torch.no_grad():
            for case in cases:
                x = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))[None, None]
                logits = torch.zeros(())
                for d in flips:
                    y = sliding_window_inference(x.flip(d) if d else x, patch, 2, net, overlap=0.25)
                    logits = logits + (y.flip(d) if d else y)
                counts.append(_dice(logits.argmax(1)[0].numpy(), case.label, k))
        dice = [float(np.nanmean([c[i] for c in counts])) for i in range(k)]
        method = "MONAI UNet 16-32-64, DiceCE, 64x64x16 patches" + (
            f", intensity {intensity_mode}" if intensity_mode else "") + (
            f", intensity stats {intensity_stats}" if intensity_stats != "case" else "") + (
            f", seed {seed}" if seed else "")
        rows.append({"method": method, "seconds": seconds,
                     "steps": {"train": steps}, "inference": "64x64x16 windows, mirroring "
                     + ("H,W" if len(flips) > 1 else "none"), "dice": dice, "mean_fg_dice": _mean_fg(dice)})
    return rows


def _table(results: list[dict[str, Any]], names: Sequence[str]) -> str:
    head = "| method | inference | seconds | steps | " + " | ".join(names[1:]) + " | mean fg Dice |"
    lines = [head, "|" + "---|" * (5 + len(names) - 1)]
    for r in results:
        steps = ", ".join(f"{k} {v}" for k, v in r["steps"].items())
        lines.append(f"| {r['method']} | {r['inference']} | {r['seconds']:.0f} | {steps} | "
                     + " | ".join(f"{d:.3f}" for d in r["dice"][1:]) + f" | **{r['mean_fg_dice']:.3f}** |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ahnet_fast._atomic import atomic_write_text
    from ahnet_fast.data.dataset import read_dataset
    from ahnet_fast.train.budget import parse_duration

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="20m", help="wall time per method, e.g. 20m (default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all)")
    p.add_argument("--data", default=None, help="dataset.json (default: the MNI tissue task, --split)")
    p.add_argument("--split", type=int, choices=(0, 1), default=0, help="MNI split (0 or 1; see module docstring)")
    p.add_argument("--out", default="bench_results/unet_budget", help="output folder")
    p.add_argument("--which", choices=("both", "ahnet", "unet"), default="both")
    p.add_argument("--ahnet-args", default="", help="extra `ahnet-fast train` options, e.g. '--preset cpu-small'")
    p.add_argument("--score-only", action="store_true",
                   help="AH-Net: score the model.pt of an earlier run in --out instead of training")
    p.add_argument("--intensity-stats", choices=("case", "training"), default="case",
                   help="both methods: each case scaled by its own statistics (default), or by the training "
                        "cases' pooled ones (AH-Net: `train --intensity-stats training`)")
    p.add_argument("--intensity", choices=("percentile", "zscore"), default=None,
                   help="both methods: this normalisation instead of the modality's default "
                        "(AH-Net: `train --intensity`)")
    p.add_argument("--unet-seed", type=int, default=0,
                   help="UNet: seed of its weights and patch draws (AH-Net takes `--seed` in --ahnet-args)")
    args = p.parse_args(argv)
    budget = parse_duration(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else build_data(out, args.split)
    spec = read_dataset(data)
    names = spec.class_names or [str(i) for i in range(spec.num_classes or 0)]
    results = []
    if args.which in ("both", "ahnet"):
        extra = args.ahnet_args.split()
        if args.intensity_stats != "case" and "--intensity-stats" not in extra:
            extra += ["--intensity-stats", args.intensity_stats]
        if args.intensity and "--intensity" not in extra:
            extra += ["--intensity", args.intensity]
        results += run_ahnet(data, out, budget, args.threads, extra, train=not args.score_only)
    if args.which in ("both", "unet"):
        results += run_unet(data, budget, args.threads, seed=args.unet_seed, intensity_stats=args.intensity_stats,
                            intensity_mode=args.intensity)
    import torch

    record = {"budget_s": budget, "threads": args.threads, "data": str(data), "split": args.split,
              "unet_seed": args.unet_seed,
              "intensity_stats": args.intensity_stats, "intensity": args.intensity,
              "class_names": names, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime()),
              "results": results}
    atomic_write_text(out / "unet_budget.json", json.dumps(record, indent=2))
    text = (f"# AH-Net vs a small UNet, {args.budget} each, {args.threads} threads\n\n"
            f"data: {data} (held-out: {len(held_out(spec))} case(s))\n\n" + _table(results, names) + "\n")
    atomic_write_text(out / "unet_budget.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
