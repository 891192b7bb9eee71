"""Segmentation metrics as the field reports them: Dice (per class, per case, global),
Hausdorff 95 and average symmetric surface distance in millimetres.

Conventions (chosen to match MONAI's ``compute_dice`` / ``compute_hausdorff_distance``
/ ``compute_average_surface_distance`` with ``symmetric=True``):

* Dice of one class = 2|P & G| / (|P| + |G|). When both masks are empty it is
  undefined and returned as ``nan`` (excluded from means by ``nanmean``);
  ``empty_dice=1.0`` counts such a case as perfect (LiTS per-case practice).
  One empty, the other not: 0.
* Global Dice (LiTS "Dice global") of a class over cases =
  2 * sum_i |P_i & G_i| / sum_i (|P_i| + |G_i|); ``nan`` if every case is empty.
* Surfaces are the mask voxels with at least one 6-neighbour outside the mask
  (voxels on the volume border count as surface). Distances are Euclidean,
  in mm, using the voxel spacing, from voxel centre to voxel centre.
* HD95 = max(95th percentile of distances from P's surface to G's surface,
  95th percentile of distances from G's surface to P's surface).
* ASD (average symmetric surface distance) = mean of both sets of distances together.
* Both masks empty: HD95 and ASD are ``nan`` (undefined). Exactly one empty: ``inf``
  (the prediction missed the structure or invented one); summaries report the
  mean over finite values and the count of infinite ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "dice",
    "dice_per_class",
    "confusion_counts",
    "global_dice",
    "surface_distances",
    "hd95",
    "average_surface_distance",
    "CaseMetrics",
    "evaluate_case",
]


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")


def dice(pred: np.ndarray, gt: np.ndarray, empty_dice: float = float("nan")) -> float:
    """Dice of two boolean masks (any equal shape); ``empty_dice`` when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    _check_pair(pred, gt)
    inter = int(np.count_nonzero(pred & gt))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return float(empty_dice) if total == 0 else 2.0 * inter / total


def confusion_counts(pred: np.ndarray, gt: np.ndarray, labels: Iterable[int]) -> dict[int, tuple[int, int, int]]:
    """Per label: ``(|P & G|, |P|, |G|)`` for integer label maps ``pred`` and ``gt``."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_pair(pred, gt)
    out = {}
    for c in labels:
        p, g = pred == c, gt == c
        out[int(c)] = (int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g)))
    return out


def dice_per_class(
    pred: np.ndarray, gt: np.ndarray, labels: Iterable[int], empty_dice: float = float("nan")
) -> dict[int, float]:
    """Dice of each label of two integer label maps."""
    return {
        c: (float(empty_dice) if p + g == 0 else 2.0 * i / (p + g))
        for c, (i, p, g) in confusion_counts(pred, gt, labels).items()
    }


def global_dice(counts: Sequence[dict[int, tuple[int, int, int]]]) -> dict[int, float]:
    """LiTS "Dice global" per label from each case's :func:`confusion_counts`."""
    labels = sorted({c for case in counts for c in case})
    out = {}
    for c in labels:
        inter = sum(case[c][0] for case in counts if c in case)
        total = sum(case[c][1] + case[c][2] for case in counts if c in case)
        out[c] = float("nan") if total == 0 else 2.0 * inter / total
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # 6-connectivity erosion; border_value=0 makes voxels on the volume border surface voxels
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances in mm: (P's surface -> G's surface, G's -> P's).

    Returns None when either mask is empty. Works on the bounding box of both
    masks (plus one voxel) so that small structures in big volumes are cheap.
    """
    from scipy import ndimage

    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    _check_pair(pred, gt)
    if len(spacing) != pred.ndim or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be {pred.ndim} positive sizes in mm, got {tuple(spacing)}")
    if not pred.any() or not gt.any():
        return None
    union = pred | gt
    box = []
    for ax in range(pred.ndim):
        other = tuple(a for a in range(pred.ndim) if a != ax)
        nz = np.flatnonzero(union.any(axis=other))
        # one voxel of context beyond the masks' bounding box (where the volume has it): then the
        # erosion sees every mask voxel's real neighbours, and a mask voxel on the crop border is on
        # the volume border, which counts as surface in both the crop and the whole volume
        box.append(slice(max(0, int(nz[0]) - 1), min(pred.shape[ax], int(nz[-1]) + 2)))
    box_t = tuple(box)
    ps, gs = _surface(pred[box_t]), _surface(gt[box_t])
    dist_to_g = ndimage.distance_transform_edt(~gs, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~ps, sampling=spacing)
    return dist_to_g[ps], dist_to_p[gs]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (conventions: module docstring)."""
    d = surface_distances(pred, gt, spacing)
    if d is None:
        return float("nan") if not (np.any(pred) or np.any(gt)) else float("inf")
    return float(max(np.percentile(d[0], 95), np.percentile(d[1], 95)))


def average_surface_distance(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (conventions: module docstring)."""
    d = surface_distances(pred, gt, spacing)
    if d is None:
        return float("nan") if not (np.any(pred) or np.any(gt)) else float("inf")
    return float(np.concatenate(d).mean())


@dataclass
class CaseMetrics:
    """Metrics of one case, per label."""

    case: str
    counts: dict[int, tuple[int, int, int]]
    dice: dict[int, float]
    hd95: dict[int, float]
    asd: dict[int, float]


def evaluate_case(
    case: str,
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int],
    surface: bool = True,
    empty_dice: float = float("nan"),
) -> CaseMetrics:
    """All metrics of one case for each foreground label (``surface=False`` skips HD95/ASD)."""
    labels = [int(c) for c in labels]
    counts = confusion_counts(pred, gt, labels)
    d = {c: (float(empty_dice) if p + g == 0 else 2.0 * i / (p + g)) for c, (i, p, g) in counts.items()}
    h, a = {}, {}
    for c in labels:
        if surface:
            pm, gm = pred == c, gt == c
            dist = surface_distances(pm, gm, spacing)
            if dist is None:
                empty = float("nan") if counts[c][1] + counts[c][2] == 0 else float("inf")
                h[c] = a[c] = empty
            else:
                h[c] = float(max(np.percentile(dist[0], 95), np.percentile(dist[1], 95)))
                a[c] = float(np.concatenate(dist).mean())
        else:
            h[c] = a[c] = float("nan")
    return CaseMetrics(case, counts, d, h, a)
