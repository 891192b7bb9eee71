"""Lesion detection as in AH-Net's tomosynthesis experiment: heatmap targets, NMS, FROC.

Conventions
-----------
* Volumes are ``(H, W, D)`` in network layout (slice axis last); ``spacing`` is the
  voxel size in mm along ``(H, W, D)``.
* A box is 6 numbers ``(h0, w0, d0, h1, w1, d1)`` in voxel indices, half-open:
  it holds voxels ``h0 <= h < h1`` (etc.). Its centre is ``(start + end - 1) / 2``
  and its size ``end - start`` voxels, i.e. ``(end - start) * spacing`` mm.
  Its physical extent is ``[start - 0.5, end - 0.5]`` in voxel coordinates.
* Heatmap target (:func:`gaussian_heatmap`): one anisotropic Gaussian per box,
  peak 1 at the box centre, diagonal covariance from the box size,
  ``sigma_mm = size_mm / (2 * k)`` per axis (default ``k = 2``: the box edges sit
  at 2 sigma, so the box holds about 95% of the Gaussian along each axis),
  floored at ``min_sigma_mm`` (useful when a lesion spans one thick slice),
  evaluated in mm and cut to 0 beyond ``truncate`` sigmas. Overlapping boxes
  combine by maximum, so every peak stays 1.
* NMS (:func:`heatmap_nms`): local maxima (``max_pool3d`` 3x3x3) above a
  threshold, then greedy suppression in decreasing score of any peak closer than
  ``min_distance_mm`` (Euclidean, in mm) to a kept one.
* FROC (:func:`froc`): a detection is a *hit* for a lesion if its centre lies
  inside the lesion's box (physical extent above), or, when ``hit_radius_mm`` is
  given, within that distance (mm) of the box centre. Pooling all volumes and
  lowering the score threshold: sensitivity = lesions hit by at least one
  detection at or above the threshold / all lesions; false positives =
  detections at or above the threshold that hit no lesion (extra detections of an
  already-hit lesion are neither TP nor FP, the usual convention), divided by the
  number of volumes (volumes with no lesion and no detection count). The
  sensitivity at ``f`` false positives per volume is the highest sensitivity of an
  operating point with at most ``f`` FP/volume (a step function, no
  interpolation); standard points 0.01, 0.02, 0.05, 0.1, 0.2, 0.25.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ahnet_fast._atomic import atomic_path

__all__ = [
    "FROC_POINTS",
    "FROCResult",
    "box_centres",
    "gaussian_heatmap",
    "heatmap_nms",
    "froc",
    "plot_froc",
]

FROC_POINTS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25)


def _spacing3(spacing, name: str = "spacing") -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.size != 3 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{name} must be 3 positive finite voxel sizes (mm) along (H, W, D), got {spacing!r}")
    return s


def _boxes(boxes, name: str = "boxes") -> np.ndarray:
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 6))
    if b.ndim == 1 and b.size == 6:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 6:
        raise ValueError(f"{name} must be (N, 6) as (h0, w0, d0, h1, w1, d1), got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{name} hold non-finite values")
    if np.any(b[:, 3:] <= b[:, :3]):
        bad = int(np.nonzero(np.any(b[:, 3:] <= b[:, :3], axis=1))[0][0])
        raise ValueError(f"{name}[{bad}] = {b[bad].tolist()} is empty: every end must be > its start (half-open boxes)")
    return b


def box_centres(boxes) -> np.ndarray:
    """Centres ``(N, 3)`` in voxel coordinates of half-open boxes ``(N, 6)``."""
    b = _boxes(boxes)
    return (b[:, :3] + b[:, 3:] - 1.0) / 2.0


# --------------------------------------------------------------------------- heatmaps
def gaussian_heatmap(
    shape: Sequence[int],
    boxes,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    k: float = 2.0,
    min_sigma_mm: float = 0.0,
    truncate: float = 3.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Target heatmap with one Gaussian per 3D box.

    Args:
        shape: ``(H, W, D)`` of the volume.
        boxes: ``(N, 6)`` half-open voxel boxes ``(h0, w0, d0, h1, w1, d1)`` (N may be 0).
            Boxes may extend past the volume; the Gaussian is clipped.
        spacing: voxel size in mm along ``(H, W, D)`` (one number for isotropic).
        k: ``sigma_mm = size_mm / (2 k)`` per axis (k = 2: box edge at 2 sigma).
        min_sigma_mm: floor on every sigma, in mm.
        truncate: values beyond this many sigmas (per axis) are set to 0.
        dtype: output floating dtype.

    Returns:
        ``(H, W, D)`` tensor in [0, 1], 1 at every box centre that falls on a voxel
        (the maximum over boxes where they overlap).
    """
    if len(tuple(shape)) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be (H, W, D) with positive sizes, got {tuple(shape)}")
    if not (k > 0 and math.isfinite(k)) or not (truncate > 0) or not (min_sigma_mm >= 0):
        raise ValueError(f"need k > 0, truncate > 0, min_sigma_mm >= 0; got {k}, {truncate}, {min_sigma_mm}")
    shape = tuple(int(n) for n in shape)
    sp = _spacing3(spacing)
    b = _boxes(boxes)
    heat = np.zeros(shape, dtype=np.float64)
    for box in b:
        size_mm = (box[3:] - box[:3]) * sp
        sigma_mm = np.maximum(size_mm / (2.0 * k), min_sigma_mm)
        sigma_vox = sigma_mm / sp
        c = (box[:3] + box[3:] - 1.0) / 2.0
        lo = np.maximum(np.floor(c - truncate * sigma_vox), 0).astype(int)
        hi = np.minimum(np.ceil(c + truncate * sigma_vox) + 1, shape).astype(int)
        if np.any(hi <= lo):
            continue  # entirely outside the volume
        # separable: product of 1D Gaussians, each axis measured in its own sigmas
        g = []
        for ax in range(3):
            u = (np.arange(lo[ax], hi[ax]) - c[ax]) / sigma_vox[ax]
            g.append(np.where(np.abs(u) <= truncate, np.exp(-0.5 * u * u), 0.0))
        block = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        view = heat[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(view, block, out=view)
    return torch.from_numpy(heat).to(dtype)


# --------------------------------------------------------------------------- NMS
def heatmap_nms(
    heatmap: torch.Tensor,
    threshold: float = 0.5,
    min_distance_mm: float = 0.0,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    max_detections: int = 100,
    max_candidates: int = 10000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaks of a 3D heatmap.

    Args:
        heatmap: ``(H, W, D)``, ``(1, H, W, D)`` or ``(1, 1, H, W, D)`` scores.
        threshold: keep local maxima with score ``> threshold``.
        min_distance_mm: a peak closer than this (Euclidean, mm) to a kept,
            higher-scoring peak is suppressed; 0 keeps every local maximum. A
            plateau of equal maxima (neighbours within one voxel) gives one peak.
        spacing: voxel size in mm along ``(H, W, D)``.
        max_detections: at most this many peaks are returned.
        max_candidates: local maxima considered for suppression (highest first),
            which bounds the cost on noisy maps.

    Returns:
        ``(centres, scores)``: ``(N, 3)`` int64 voxel indices and ``(N,)`` scores
        (heatmap dtype, float32 for fp16/bf16 maps; on the CPU), in decreasing score order.
    """
    if not isinstance(heatmap, torch.Tensor) or not heatmap.is_floating_point():
        raise ValueError("heatmap must be a floating-point tensor")
    h = heatmap
    while h.dim() > 3 and h.shape[0] == 1:
        h = h[0]
    if h.dim() != 3:
        raise ValueError(f"heatmap must be (H, W, D), (1, H, W, D) or (1, 1, H, W, D); got {tuple(heatmap.shape)}")
    if max_detections < 1 or max_candidates < 1 or min_distance_mm < 0:
        raise ValueError("need max_detections >= 1, max_candidates >= 1, min_distance_mm >= 0")
    sp = _spacing3(spacing)
    h = h.detach()
    if h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()  # CPU pooling kernels are not guaranteed for half types; exact upcast
    # NaN never equals its pooled max, so NaN voxels are never peaks
    pooled = F.max_pool3d(h[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
    is_peak = (h == pooled) & (h > threshold)
    idx = torch.nonzero(is_peak, as_tuple=False)
    scores = h[is_peak]
    order = torch.argsort(scores, descending=True, stable=True)[:max_candidates]
    idx, scores = idx[order].cpu(), scores[order].cpu()
    # Two local maxima within one voxel of each other must have equal scores (a plateau, e.g. a
    # saturated sigmoid): such a candidate is merged into the earlier one, kept or not, so a
    # whole plateau yields one peak. Then the min_distance rule applies to kept peaks.
    vox = idx.numpy()
    pos_mm = vox * sp
    keep: list[int] = []
    for i in range(len(idx)):
        if i:
            if np.abs(vox[:i] - vox[i]).max(axis=1).min() <= 1:  # 26-neighbour of an earlier one
                continue
            if keep and min_distance_mm > 0:
                if np.sqrt(((pos_mm[keep] - pos_mm[i]) ** 2).sum(axis=1)).min() < min_distance_mm:
                    continue
        keep.append(i)
        if len(keep) == max_detections:
            break
    k_idx = torch.as_tensor(keep, dtype=torch.long)
    return idx[k_idx].long(), scores[k_idx]


# --------------------------------------------------------------------------- FROC
@dataclass
class FROCResult:
    """FROC curve and the sensitivities at requested false-positive rates.

    Attributes:
        fp_points: requested FP-per-volume rates.
        sensitivity: sensitivity at each of ``fp_points``.
        fps_per_volume, sensitivities, thresholds: the full curve, one operating
            point per distinct score (plus the start point at threshold +inf).
        n_lesions, n_volumes, n_detections: the counts behind the rates.
    """

    fp_points: np.ndarray
    sensitivity: np.ndarray
    fps_per_volume: np.ndarray
    sensitivities: np.ndarray
    thresholds: np.ndarray
    n_lesions: int
    n_volumes: int
    n_detections: int

    @property
    def mean_sensitivity(self) -> float:
        """Mean of ``sensitivity`` over ``fp_points`` (the usual FROC score)."""
        return float(np.mean(self.sensitivity))

    def table(self) -> str:
        """Markdown table of the sensitivities at the requested points."""
        head = "| FP / volume | " + " | ".join(f"{f:g}" for f in self.fp_points) + " | mean |"
        sep = "|---" * (len(self.fp_points) + 2) + "|"
        row = "| sensitivity | " + " | ".join(f"{s:.3f}" for s in self.sensitivity) + f" | {self.mean_sensitivity:.3f} |"
        return "\n".join([head, sep, row])


def _as_np(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def froc(
    detections: Sequence[tuple],
    gt_boxes: Sequence,
    spacing: Sequence[float] | float | Sequence[Sequence[float]] = (1.0, 1.0, 1.0),
    hit_radius_mm: float | None = None,
    fp_points: Sequence[float] = FROC_POINTS,
) -> FROCResult:
    """Free-response ROC over a set of volumes (see the module docstring for the rules).

    Args:
        detections: one ``(centres (N, 3), scores (N,))`` pair per volume, centres in
            voxel coordinates (as returned by :func:`heatmap_nms`); N may be 0.
        gt_boxes: one ``(M, 6)`` array of half-open voxel boxes per volume (M may be 0).
        spacing: voxel size (mm) along ``(H, W, D)``, shared, or one triple per volume.
        hit_radius_mm: also count a detection within this distance of a box centre.
        fp_points: FP-per-volume rates at which to report sensitivity.

    Returns:
        :class:`FROCResult`.

    Raises:
        ValueError: different numbers of volumes, malformed arrays, or no lesion at all.
    """
    if len(detections) != len(gt_boxes):
        raise ValueError(f"{len(detections)} detection sets but {len(gt_boxes)} ground-truth sets: one per volume")
    n_vol = len(detections)
    if n_vol == 0:
        raise ValueError("froc needs at least one volume")
    sp_arr = np.asarray(spacing, dtype=np.float64)
    per_volume_spacing = sp_arr.ndim == 2
    if per_volume_spacing and sp_arr.shape[0] != n_vol:
        raise ValueError(f"spacing has {sp_arr.shape[0]} rows for {n_vol} volumes")
    if hit_radius_mm is not None and not hit_radius_mm >= 0:
        raise ValueError(f"hit_radius_mm must be >= 0, got {hit_radius_mm!r}")
    pts = np.asarray(fp_points, dtype=np.float64).reshape(-1)
    if pts.size == 0 or np.any(pts < 0):
        raise ValueError(f"fp_points must be non-negative rates, got {fp_points!r}")

    all_scores: list[np.ndarray] = []
    all_hits: list[list[np.ndarray]] = []  # per detection: global lesion ids it hits
    lesion_offset = 0
    for v, (det, boxes) in enumerate(zip(detections, gt_boxes)):
        if not isinstance(det, (tuple, list)) or len(det) != 2:
            raise ValueError(f"detections[{v}] must be a (centres, scores) pair")
        c = _as_np(det[0]).reshape(-1, 3) if _as_np(det[0]).size else np.zeros((0, 3))
        s = _as_np(det[1]).reshape(-1)
        if c.shape[0] != s.shape[0]:
            raise ValueError(f"detections[{v}]: {c.shape[0]} centres but {s.shape[0]} scores")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"detections[{v}] has non-finite scores")
        b = _boxes(boxes, name=f"gt_boxes[{v}]")
        sp = _spacing3(sp_arr[v] if per_volume_spacing else sp_arr)
        inside = np.all((c[:, None, :] >= b[None, :, :3] - 0.5) & (c[:, None, :] <= b[None, :, 3:] - 0.5), axis=2)
        if hit_radius_mm is not None and len(b):
            centres = (b[:, :3] + b[:, 3:] - 1.0) / 2.0
            dist = np.sqrt((((c[:, None, :] - centres[None]) * sp) ** 2).sum(axis=2))
            inside |= dist <= hit_radius_mm
        all_scores.append(s)
        all_hits.extend(np.nonzero(row)[0] + lesion_offset for row in inside)
        lesion_offset += len(b)

    n_les = lesion_offset
    if n_les == 0:
        raise ValueError("no ground-truth lesion in any volume: sensitivity is undefined")
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    detected = np.zeros(n_les, dtype=bool)
    fp = 0
    fps, sens, thr = [0.0], [0.0], [np.inf]
    for rank, i in enumerate(order):
        hits = all_hits[i]
        if len(hits):
            detected[hits] = True
        else:
            fp += 1
        # one operating point per distinct score: ties are accepted together
        last_of_group = rank + 1 == len(order) or scores[order[rank + 1]] != scores[i]
        if last_of_group:
            fps.append(fp / n_vol)
            sens.append(detected.sum() / n_les)
            thr.append(float(scores[i]))
    fps_a, sens_a = np.asarray(fps), np.asarray(sens)
    at = np.array([sens_a[fps_a <= f + 1e-12].max() for f in pts])
    return FROCResult(
        fp_points=pts,
        sensitivity=at,
        fps_per_volume=fps_a,
        sensitivities=sens_a,
        thresholds=np.asarray(thr),
        n_lesions=n_les,
        n_volumes=n_vol,
        n_detections=int(scores.size),
    )


def plot_froc(
    results: FROCResult | Sequence[FROCResult],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str = "FROC",
    dpi: int = 120,
) -> str:
    """Draw FROC curves (log FP/volume axis, requested points marked) to a PNG, atomically.

    Args:
        results: one or more :class:`FROCResult`.
        path: output ``.png`` path; its folder must exist.
        labels: one legend label per result (default: ``"mean sens. X"``).
        title: figure title.
        dpi: resolution.

    Returns:
        The path written, as a string.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    res = [results] if isinstance(results, FROCResult) else list(results)
    if not res:
        raise ValueError("plot_froc needs at least one FROCResult")
    if labels is not None and len(labels) != len(res):
        raise ValueError(f"{len(labels)} labels for {len(res)} results")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder}")

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo = min(min(r.fp_points.min() for r in res), 0.01) / 2
    hi = max(max(r.fp_points.max() for r in res), 0.25) * 2
    for j, r in enumerate(res):
        label = labels[j] if labels is not None else f"mean sens. {r.mean_sensitivity:.3f}"
        # the curve is a step function; the start point at 0 FP is drawn at the left edge of the log axis
        x = np.clip(r.fps_per_volume, lo, None)
        line = ax.step(x, r.sensitivities, where="post", label=label)[0]
        ax.plot(r.fp_points, r.sensitivity, "o", color=line.get_color())
    for f in res[0].fp_points:
        ax.axvline(f, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per volume")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{title} ({res[0].n_lesions} lesions, {res[0].n_volumes} volumes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
