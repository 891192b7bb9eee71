"""Evaluate a folder of predicted label maps against a folder of ground-truth label maps.

Cases are matched by file name (``case.nii.gz`` / ``case.nii``). Each pair must
share shape and affine; spacing (mm) comes from the ground truth. Metrics and
their empty-mask conventions: :mod:`ahnet_fast.infer.metrics`.

Class names come from a ``dataset.json`` (``"labels"``: MSD ``{"0": "background", ...}`` or
nnU-Net v2 ``{"background": 0, ...}``) or from a training checkpoint
(``preprocessing.class_names``): :func:`class_names_from`, :func:`find_class_names`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ahnet_fast._atomic import atomic_path
from ahnet_fast.data.nifti import VolumeError, is_nifti_path, load_label, load_volume

from .metrics import CaseMetrics, evaluate_case, global_dice

__all__ = ["ClassSummary", "match_cases", "evaluate_folders", "summarise", "write_csv", "format_table",
           "class_names_from", "find_class_names", "order_problem"]


def _labels_to_names(labels: Any) -> dict[int, str]:
    out: dict[int, str] = {}
    if not isinstance(labels, dict):
        return out
    for k, v in labels.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # nnU-Net v2: name -> value
            out[int(v)] = str(k)
        elif isinstance(v, str):
            try:
                out[int(k)] = v  # MSD: "value" -> name
            except ValueError:
                continue
        # nnU-Net region lists ({"name": [1, 2]}) name no single label: left out
    return out


def class_names_from(path: str | os.PathLike) -> dict[int, str]:
    """Label value -> class name from a ``dataset.json`` or a training checkpoint (``.pt``).

    Raises:
        ValueError: unreadable, or it declares no class names (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a dataset.json or a model.pt)")
    if path.suffix.lower() == ".json":
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read it as JSON ({exc})") from exc
        names = _labels_to_names(meta.get("labels") if isinstance(meta, dict) else None)
    else:
        import torch

        try:
            ck = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a dataset.json and not a readable checkpoint ({type(exc).__name__})") from exc
        pre = ck.get("preprocessing") if isinstance(ck, dict) else None
        cn = pre.get("class_names") if isinstance(pre, dict) else None
        names = {i: str(n) for i, n in enumerate(cn)} if isinstance(cn, (list, tuple)) else {}
    if not names:
        raise ValueError(f"{path}: declares no class names (dataset.json \"labels\" or a checkpoint's "
                         "preprocessing.class_names)")
    return names


def find_class_names(*near: str | os.PathLike) -> tuple[dict[int, str], Path | None]:
    """Class names from the first ``dataset.json`` in the folders of ``near`` or their parents
    (``({}, None)`` when there is none or it names no classes)."""
    seen: set[Path] = set()
    for p in near:
        p = Path(p).resolve()
        start = p if p.is_dir() else p.parent
        for folder in (start, start.parent):
            cand = folder / "dataset.json"
            if cand in seen:
                continue
            seen.add(cand)
            if cand.is_file():
                try:
                    return class_names_from(cand), cand
                except (OSError, ValueError):
                    continue
    return {}, None


_GT_NAME = re.compile(r"^(labels(tr|ts|va)?|gt|ground[_-]?truth|reference|manual|truth)([_-].*)?$|.*[_-](gt|labels)$",
                      re.I)
_PRED_NAME = re.compile(r"^(pred(s|ictions?)?|seg(s|mentations?)?|outputs?|results?|infer(ence)?)([_-].*)?$"
                        r"|.*[_-](preds?|predictions?|segs?|segmentations?|outputs?)$", re.I)


def order_problem(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> str | None:
    """Why PRED_DIR GT_DIR look given the other way round (nnU-Net's order is GT PRED), or None.

    Only clear cases count: the prediction folder is named like ground truth (labelsTs, gt, ...) while
    the ground-truth folder is not, or the ground-truth folder is named like predictions while the
    prediction folder is not. Dice is symmetric, but cases are listed, matched and spaced from the
    ground truth, so the order matters.
    """
    pn, gn = Path(pred_dir).resolve().name, Path(gt_dir).resolve().name
    if Path(pred_dir).resolve() == Path(gt_dir).resolve():
        return None
    pred_gt, gt_gt = bool(_GT_NAME.match(pn)), bool(_GT_NAME.match(gn))
    pred_pred, gt_pred = bool(_PRED_NAME.match(pn)), bool(_PRED_NAME.match(gn))
    if (pred_gt and not gt_gt) or (gt_pred and not pred_pred):
        return (f"PRED_DIR {pn!r} looks like ground truth and GT_DIR {gn!r} like predictions (this command takes "
                "PRED_DIR GT_DIR; nnU-Net takes GT then PRED); say which is which with --pred DIR --gt DIR")
    return None


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
        pred_shape = _header_shape(pp)
        if pred_shape != tuple(ref.original_shape):
            raise VolumeError(f"{pp}: prediction shape {pred_shape} differs from the ground truth {gp} shape "
                              f"{tuple(ref.original_shape)}; predictions must be on the ground truth's grid")
        try:
            pred = load_label(pp, ref)  # checks the affine against the ground truth
        except VolumeError as exc:
            raise VolumeError(str(exc).replace(f"label {pp}", f"prediction {pp}")
                              .replace(f"image {ref.path}", f"ground truth {gp}")
                              .replace("\nimage:", "\nground truth:").replace("\nlabel:", "\nprediction:")) from exc
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


def _header_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read the prediction ({type(exc).__name__}: {exc})") from exc
    return tuple(int(v) for v in shape[:3])


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


def write_csv(results: list[CaseMetrics], path: str | os.PathLike, names: dict[int, str] | None = None,
              surface: bool = True) -> Path:
    """One row per case and label (its class name in a last column when ``names`` is given), written atomically;
    ``surface=False`` leaves out the HD95 and ASD columns."""
    path = Path(path)
    names = names or {}
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "label", "dice", *(["hd95_mm", "asd_mm"] if surface else []), "pred_voxels",
                    "gt_voxels", "intersection", *(["class"] if names else [])])
        for r in results:
            for c in sorted(r.dice):
                inter, np_, ng = r.counts[c]
                w.writerow([r.case, c, f"{r.dice[c]:.6f}", *([f"{r.hd95[c]:.4f}", f"{r.asd[c]:.4f}"] if surface else []),
                            np_, ng, inter, *([names.get(c, "")] if names else [])])
    return path


def format_table(summary: list[ClassSummary], names: dict[int, str] | None = None, surface: bool = True) -> str:
    """A plain-text table: one row per label (``"1 liver"`` when ``names`` has it) plus the mean over
    labels; ``surface=False`` leaves out the HD95, ASD and infinite-distance columns."""
    names = names or {}
    width = max([16] + [len(f"{s.label} {names.get(s.label, '')}".strip()) + 2 for s in summary])
    width = min(width, 32)
    surf_head = f"{'HD95 mm':>10}{'ASD mm':>10}{'inf':>5}" if surface else ""
    head = f"{'label':<{width}}{'Dice/case':>10}{'Dice glob':>10}{surf_head}{'cases':>6}"
    lines = [head, "-" * len(head)]
    for s in summary:
        name = f"{s.label} {names.get(s.label, '')}".strip()[:width - 1]
        surf = f"{s.mean_hd95:>10.2f}{s.mean_asd:>10.2f}{s.infinite:>5}" if surface else ""
        lines.append(f"{name:<{width}}{s.mean_dice:>10.4f}{s.global_dice:>10.4f}{surf}{s.cases:>6}")
    if len(summary) > 1:
        m = lambda xs: _finite_mean(list(xs))  # noqa: E731
        surf = (f"{m(s.mean_hd95 for s in summary):>10.2f}{m(s.mean_asd for s in summary):>10.2f}"
                f"{sum(s.infinite for s in summary):>5}") if surface else ""
        lines.append(f"{'mean':<{width}}{m(s.mean_dice for s in summary):>10.4f}"
                     f"{m(s.global_dice for s in summary):>10.4f}{surf}{summary[0].cases:>6}")
    return "\n".join(lines)
