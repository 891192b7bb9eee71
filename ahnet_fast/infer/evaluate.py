"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Cases are matched by file name (``case.nii.gz`` / ``case.nii``). Each pair must
share shape and affine; spacing (mm) comes from the ground truth. Metrics and
their empty-mask conventions: :mod:`ahnet_fast.infer.metrics`.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ahnet_fast._atomic import atomic_path
from ahnet_fast.data.nifti import VolumeError, is_nifti_path, load_label, load_volume

from .metrics import CaseMetrics, evaluate_case, global_dice

__all__ = ["ClassSummary", "match_cases", "evaluate_folders", "summarise", "write_csv", "format_table"]


def _stem(name: str) -> str:
    low = name.lower()
    return name[: -len(".nii.gz")] if low.endswith(".nii.gz") else name[: -len(".nii")]


def match_cases(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(case, prediction, ground truth)`` for every ground-truth file; a missing prediction is an error."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d in (pred_dir, gt_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a folder")
    gts = {_stem(p.name): p for p in sorted(gt_dir.iterdir()) if p.is_file() and is_nifti_path(p)}
    preds = {_stem(p.name): p for p in sorted(pred_dir.iterdir()) if p.is_file() and is_nifti_path(p)}
    if not gts:
        raise VolumeError(f"{gt_dir}: no .nii/.nii.gz ground-truth files")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise VolumeError(
            f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s): "
            + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        )
    return [(c, preds[c], gts[c]) for c in sorted(gts)]


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    labels: Sequence[int] | None = None,
    surface: bool = True,
) -> list[CaseMetrics]:
    """Metrics of every case; ``labels`` default: every non-zero label in any ground truth or prediction."""
    pairs = match_cases(pred_dir, gt_dir)
    loaded = []
    for case, pp, gp in pairs:
        ref = load_volume(gp)
        gt = load_label(gp, ref)
        pred = load_label(pp, ref)  # checks shape and affine against the ground truth
        ref.array = np.empty((0, 0, 0), np.float32)
        loaded.append((case, pred, gt, ref.spacing))
    if labels is None:
        found: set[int] = set()
        for _, pred, gt, _ in loaded:
            found |= set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())
        labels = sorted(c for c in found if c != 0)
        if not labels:
            raise VolumeError(f"{gt_dir}: no foreground label in any ground truth or prediction")
    return [evaluate_case(case, pred, gt, sp, labels, surface=surface) for case, pred, gt, sp in loaded]


@dataclass
class ClassSummary:
    """Per-label summary over cases (NaN cases excluded from means; infinite distances counted)."""

    label: int
    mean_dice: float
    global_dice: float
    mean_hd95: float
    mean_asd: float
    infinite: int
    cases: int


def _finite_mean(values: list[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def summarise(results: list[CaseMetrics]) -> list[ClassSummary]:
    g = global_dice([r.counts for r in results])
    out = []
    for c in sorted(g):
        dices = [r.dice[c] for r in results]
        hds = [r.hd95[c] for r in results]
        out.append(ClassSummary(
            c, _finite_mean(dices), g[c], _finite_mean(hds), _finite_mean([r.asd[c] for r in results]),
            sum(1 for h in hds if math.isinf(h)), len(results),
        ))
    return out


def write_csv(results: list[CaseMetrics], path: str | os.PathLike) -> Path:
    """One row per case and label, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "label", "dice", "hd95_mm", "asd_mm", "pred_voxels", "gt_voxels", "intersection"])
        for r in results:
            for c in sorted(r.dice):
                inter, np_, ng = r.counts[c]
                w.writerow([r.case, c, f"{r.dice[c]:.6f}", f"{r.hd95[c]:.4f}", f"{r.asd[c]:.4f}", np_, ng, inter])
    return path


def format_table(summary: list[ClassSummary], names: dict[int, str] | None = None) -> str:
    """A plain-text table: one row per label plus the mean over labels."""
    names = names or {}
    head = f"{'label':<16}{'Dice/case':>10}{'Dice glob':>10}{'HD95 mm':>10}{'ASD mm':>10}{'inf':>5}{'cases':>6}"
    lines = [head, "-" * len(head)]
    for s in summary:
        name = f"{s.label} {names.get(s.label, '')}".strip()[:15]
        lines.append(f"{name:<16}{s.mean_dice:>10.4f}{s.global_dice:>10.4f}{s.mean_hd95:>10.2f}"
                     f"{s.mean_asd:>10.2f}{s.infinite:>5}{s.cases:>6}")
    if len(summary) > 1:
        m = lambda xs: _finite_mean(list(xs))  # noqa: E731
        lines.append(f"{'mean':<16}{m(s.mean_dice for s in summary):>10.4f}{m(s.global_dice for s in summary):>10.4f}"
                     f"{m(s.mean_hd95 for s in summary):>10.2f}{m(s.mean_asd for s in summary):>10.2f}"
                     f"{sum(s.infinite for s in summary):>5}{summary[0].cases:>6}")
    return "\n".join(lines)
