"""Voxel spacing: what a model was trained at, and resampling inputs to it.

A network learns structures in voxel units, so a model trained on 1 x 1 x 4 mm volumes that is
shown a 2 x 2 x 5 mm volume sees every structure at the wrong size. Training therefore records
its spacing in the checkpoint (:func:`describe_preprocessing`, the checkpoint's
``"preprocessing"`` entry), and inference resamples each input to it and the result back onto the
input's grid (:func:`plan_resampling`, :func:`resample_image`, :func:`resample_probabilities`).

Every spacing here is in the network layout of :mod:`ahnet_fast.data.nifti`: closest canonical
(RAS+) orientation, coarsest axis last, in mm along ``(H, W, D)``. That convention is recorded
beside the spacing (:data:`LAYOUT`) so a checkpoint says which axis is which.

Interpolation (all in torch, on the CPU): the image is resampled trilinearly, after a Gaussian
blur along any axis that gets coarser (anti-aliasing, sigma = (factor - 1) / 2 voxels); class
probabilities are resampled trilinearly back to the input's grid and the labels are their
argmax there (never nearest-neighbour labels). Both directions map the same field of view
(voxel centres, ``align_corners=False``), so the result lies exactly on the input.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ahnet_fast.data.errors import DataError

__all__ = [
    "LAYOUT",
    "FAR_FACTOR",
    "MISMATCH_TOLERANCE",
    "ResamplePlan",
    "THICK_SLICE_FACTOR",
    "AUTO_MAX_VOXELS",
    "auto_training_spacing",
    "case_geometry",
    "check_target_spacing",
    "describe_preprocessing",
    "plan_resampling",
    "resample_case",
    "resample_image",
    "resample_labels",
    "resample_probabilities",
    "training_spacing_from_meta",
]

#: the orientation convention of every recorded spacing
LAYOUT = "closest canonical (RAS+) orientation, coarsest axis last; spacing in mm along (H, W, D)"

#: an input whose spacing differs from the training spacing by this factor or more on some axis
#: is "far" from it: resampling cannot restore detail the scan never had (or drops detail it had)
FAR_FACTOR = 2.0

#: relative spacing difference below which no resampling is done (header rounding, 0.98 vs 1 mm)
MISMATCH_TOLERANCE = 0.05

#: ``--spacing auto``: slices this many times the in-plane spacing apart, or more, are thick
THICK_SLICE_FACTOR = 2.0

#: ``--spacing auto`` halves the in-plane spacing only while the largest training case, resampled,
#: stays within this many voxels (256**3: 64 MB per float32 copy; validation and `segment` run on
#: the whole grid, and halving in-plane means 4x the voxels)
AUTO_MAX_VOXELS = 256 ** 3


def _mm(values: Any) -> list[float]:
    """Voxel sizes as plain floats rounded to 1e-6 mm (JSON-friendly, stable across header noise)."""
    return [round(float(v), 6) for v in values]


def case_geometry(path: str | os.PathLike) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Voxel spacing (mm) and shape of a NIfTI file in network layout, from its header alone (no
    voxels read): what :func:`~ahnet_fast.data.nifti.load_volume` would give as ``spacing`` and
    ``array.shape``."""
    import nibabel as nib

    from ahnet_fast.data.nifti import _layout

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types
        raise DataError(path, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = tuple(int(s) for s in img.shape[:3])
    ornt, perm, _, spacing = _layout(np.asarray(img.affine, dtype=np.float64), shape)  # type: ignore[arg-type]
    canonical = [0, 0, 0]
    for axis, (to, _flip) in enumerate(ornt):  # input axis -> its canonical axis
        canonical[int(to)] = shape[axis]
    return tuple(_mm(spacing)), tuple(canonical[a] for a in perm)  # type: ignore[return-value]


def describe_preprocessing(spec: Any, intensity: Any, num_classes: int,
                           target_spacing: Sequence[float] | str | None = None) -> dict[str, Any]:
    """The checkpoint's ``"preprocessing"`` entry for a training run on ``spec``.

    Args:
        spec: the :class:`~ahnet_fast.data.dataset.DatasetSpec` trained on.
        intensity: the :class:`~ahnet_fast.data.intensity.IntensityConfig` used.
        num_classes: number of classes (background included).
        target_spacing: the spacing every case is resampled to for training (``--spacing``: 3 sizes
            in mm, or ``"auto"``: :func:`auto_training_spacing` of the cases' median spacing and
            their fields of view), or None when the cases are used on their own grids.

    Returns:
        ``{"intensity", "num_classes", "class_names", "spacing", "spacing_min", "spacing_max",
        "layout"}`` (+ ``"resampled_from"`` with a target spacing): ``spacing`` is what the model
        saw, the target spacing or else the per-axis median of the training cases' spacings
        (headers only); ``spacing_min``/``spacing_max`` the range of the cases' own spacings;
        ``resampled_from`` their median; ``layout`` :data:`LAYOUT`.
    """
    geometry = [case_geometry(r.image) for r in spec.training]
    spacings = np.array([sp for sp, _ in geometry], dtype=np.float64)
    out: dict[str, Any] = {
        "intensity": intensity.to_dict(),
        "num_classes": int(num_classes),
        "class_names": spec.class_names,
    }
    if len(spacings):
        median = _mm(np.median(spacings, axis=0))
        if target_spacing == "auto":
            extents = [[n * v for n, v in zip(shape, sp)] for sp, shape in geometry]
            target_spacing = auto_training_spacing(median, extents)
        out["spacing"] = median if target_spacing is None else _mm(target_spacing)
        if target_spacing is not None:
            out["resampled_from"] = median
        out["spacing_min"] = _mm(spacings.min(axis=0))
        out["spacing_max"] = _mm(spacings.max(axis=0))
        out["layout"] = LAYOUT
    return out


def check_target_spacing(spacing: Sequence[float] | None, where: str = "--spacing") -> tuple[float, float, float] | None:
    """``spacing`` as 3 floats, or None; ``ValueError`` saying what is accepted otherwise."""
    if spacing is None:
        return None
    try:
        vals = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{where} {spacing!r}: expected 3 positive voxel sizes in mm (H W D, e.g. 1 1 2)")
    return vals  # type: ignore[return-value]


def auto_training_spacing(
    spacing: Sequence[float],
    extents_mm: Sequence[Sequence[float]] = (),
    max_voxels: int = AUTO_MAX_VOXELS,
) -> tuple[float, float, float] | None:
    """The spacing ``--spacing auto`` trains AH-Net at for cases of ``spacing`` (mm along H, W, D), or
    None for their own.

    AH-Net predicts on a grid twice as coarse as its input on every axis (conv1 stride 2 in-plane,
    pool1 2 along D, the final x2 upsampling), so a thin structure one voxel wide in the scan is
    scored on a grid of two: its boundary errors are a voxel of the scan. ``auto`` therefore
    resamples

    * thick slices (D at least :data:`THICK_SLICE_FACTOR` times the in-plane spacing) to half their
      spacing, never finer than in-plane: the prediction gets the scan's slice resolution back;
    * the in-plane spacing to half, so the prediction lies on the scan's own in-plane grid, when
      the largest training case (``extents_mm``: each case's field of view, shape x spacing, in mm
      along H, W, D) still has at most ``max_voxels`` voxels at the new spacing. Without extents
      the in-plane spacing is kept.

    The cost per training step is unchanged (same patch in voxels, a smaller field of view); what
    grows is the grid that validation and `segment` run on. On the 1 x 1 x 4 mm MNI task
    (bench/results/unet_budget.md), under the same 20-minute budget: 0.849 (own spacing) -> 0.891-0.901
    (1 x 1 x 2) -> 0.905-0.908 (0.5 x 0.5 x 2) held-out mean foreground Dice on one split, 0.837 ->
    0.861-0.874 -> 0.884-0.889 on the other.

    Returns:
        ``(h, w, d)`` in mm, or None when neither rule applies (the cases are kept on their own grids).
    """
    h, w, d = (float(v) for v in spacing)
    thick = d >= THICK_SLICE_FACTOR * max(h, w) * (1 - MISMATCH_TOLERANCE)
    target = (h, w, max(d / 2, h, w) if thick else d)
    if extents_mm:
        halved = (h / 2, w / 2, target[2])
        largest = max(math.prod(math.ceil(e / t - 1e-6) for e, t in zip(ext, halved)) for ext in extents_mm)
        if largest <= max_voxels:
            target = halved
    if target == (h, w, d):
        return None
    return tuple(round(v, 6) for v in target)  # type: ignore[return-value]


def training_spacing_from_meta(meta: dict[str, Any], key: str = "spacing") -> tuple[float, float, float] | None:
    """The training spacing a checkpoint records (``meta["preprocessing"]["spacing"]``), or None.

    ``key="resampled_from"``: the training cases' own spacing when they were resampled to it.

    Raises:
        ValueError: the entry exists but is not 3 positive finite numbers.
    """
    holder = meta.get("preprocessing") if isinstance(meta, dict) else None
    sp = holder.get(key) if isinstance(holder, dict) else None
    if sp is None:
        return None
    try:
        return check_target_spacing(sp)
    except ValueError:
        raise ValueError(f"the checkpoint's preprocessing {key} {sp!r} is not 3 positive numbers (mm)") from None


def _fmt(sp: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in sp) + " mm"


@dataclass
class ResamplePlan:
    """What inference does about spacing for one input.

    Attributes:
        active: resample to ``target_shape`` and back.
        input_spacing / input_shape: the input in network layout.
        training_spacing: what the model was trained at (None: not recorded).
        target_shape: the grid the model runs on (``input_shape`` when not active).
        target_spacing: the exact spacing of that grid (same field of view as the input).
        message: one line saying what is done and why.
        warnings: lines for spacings far from the training spacing, or a missing record.
    """

    active: bool
    input_spacing: tuple[float, float, float]
    input_shape: tuple[int, int, int]
    training_spacing: tuple[float, float, float] | None
    target_shape: tuple[int, int, int]
    target_spacing: tuple[float, float, float]
    message: str
    warnings: list[str] = field(default_factory=list)


def plan_resampling(
    input_spacing: Sequence[float],
    input_shape: Sequence[int],
    training_spacing: Sequence[float] | None,
    resample: bool = True,
    source_spacing: Sequence[float] | None = None,
) -> ResamplePlan:
    """Decide whether (and to which grid) an input is resampled before inference.

    No resampling when ``resample`` is False, when the training spacing is unknown, or when every
    axis is within :data:`MISMATCH_TOLERANCE` of it. A factor of :data:`FAR_FACTOR` or more on
    some axis adds a warning (with resampling: detail is lost or invented; without: the model sees
    structures at the wrong size), unless that axis is near ``source_spacing``: the spacing the
    training cases had before they were resampled to the training spacing (``--spacing``), so the
    input holds the detail the training data held.
    """
    sp = tuple(float(v) for v in input_spacing)
    shape = tuple(int(v) for v in input_shape)
    if training_spacing is None:
        warn = ("the checkpoint records no training spacing (trained before spacing was recorded); the input "
                f"({_fmt(sp)}) is segmented on its own grid; pass --train-spacing H W D to resample it")
        return ResamplePlan(False, sp, shape, None, shape, sp,  # type: ignore[arg-type]
                            f"spacing {_fmt(sp)}; training spacing unknown: not resampled", [warn])
    tr = tuple(float(v) for v in training_spacing)
    ratios = [a / b for a, b in zip(sp, tr)]
    src = tuple(float(v) for v in source_spacing) if source_spacing is not None else tr
    src_ratios = [a / b for a, b in zip(sp, src)]
    far = [i for i, (r, q) in enumerate(zip(ratios, src_ratios))
           if max(r, 1 / r) >= FAR_FACTOR - 1e-9 and max(q, 1 / q) >= FAR_FACTOR - 1e-9]
    close = all(abs(r - 1.0) <= MISMATCH_TOLERANCE for r in ratios)
    warns = []
    axes = "HWD"
    if far:
        which = ", ".join(f"{axes[i]} {sp[i]:.3g} vs {tr[i]:.3g} mm" for i in far)
        if resample:
            warns.append(f"input spacing {_fmt(sp)} is far from the training spacing {_fmt(tr)} ({which}): it is "
                         "resampled, but detail the scan does not hold cannot be restored; expect lower accuracy "
                         "than on scans near the training spacing")
        else:
            warns.append(f"input spacing {_fmt(sp)} is far from the training spacing {_fmt(tr)} ({which}) and "
                         "--no-resample is set: the model sees structures at the wrong size; expect much lower "
                         "accuracy")
    elif not resample and not close:
        warns.append(f"input spacing {_fmt(sp)} differs from the training spacing {_fmt(tr)} and --no-resample is "
                     "set: the model sees structures at a different size than in training")
    if not resample:
        return ResamplePlan(False, sp, shape, tr, shape, sp,  # type: ignore[arg-type]
                            f"spacing {_fmt(sp)} (training {_fmt(tr)}): not resampled (--no-resample)", warns)
    if close:
        return ResamplePlan(False, sp, shape, tr, shape, sp,  # type: ignore[arg-type]
                            f"spacing {_fmt(sp)} matches the training spacing {_fmt(tr)}: not resampled", warns)
    target = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, sp, tr))
    exact = tuple(n * s / m for n, s, m in zip(shape, sp, target))
    msg = (f"resampled {'x'.join(map(str, shape))} at {_fmt(sp)} to {'x'.join(map(str, target))} at "
           f"{_fmt(exact)} (training spacing {_fmt(tr)}), labels and probabilities back onto the input grid")
    return ResamplePlan(True, sp, shape, tr, target, exact, msg, warns)  # type: ignore[arg-type]


def _gaussian_blur(x: Any, sigmas: Sequence[float]) -> Any:
    """Separable Gaussian blur of a ``(1, C, H, W, D)`` tensor; sigma in voxels per axis (0: none)."""
    import torch
    import torch.nn.functional as F

    for axis, s in enumerate(sigmas):
        if s <= 0.05:
            continue
        r = max(1, int(math.ceil(3 * s)))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = (k / k.sum()).to(x.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        c = x.shape[1]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        xp = F.pad(x, pad, mode="replicate")
        x = F.conv3d(xp, k.view(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return x


def resample_image(image: np.ndarray, plan: ResamplePlan) -> np.ndarray:
    """The ``(H, W, D)`` image on ``plan.target_shape``: trilinear, Gaussian anti-aliasing on axes that
    get coarser. Returns ``image`` itself when the plan is not active."""
    import torch
    import torch.nn.functional as F

    if not plan.active:
        return image
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    factors = [t / s for s, t in zip(plan.input_spacing, plan.target_spacing)]  # > 1: coarser
    x = _gaussian_blur(x, [(f - 1) / 2 if f > 1 + MISMATCH_TOLERANCE else 0.0 for f in factors])
    y = F.interpolate(x, size=plan.target_shape, mode="trilinear", align_corners=False)
    return y[0, 0].numpy()


def resample_labels(label: np.ndarray, plan: ResamplePlan) -> np.ndarray:
    """An ``(H, W, D)`` label map on ``plan.target_shape``: each class's indicator resampled trilinearly
    (the same interpolation as the probabilities in :func:`resample_probabilities`), the label the class
    whose indicator is highest. Unlike nearest-neighbour labels this keeps a structure's boundary
    where it was when the grid gets finer. Class by class (peak memory about three target-sized
    float32 arrays, whatever the number of classes); ``label`` itself when the plan is not active."""
    import torch
    import torch.nn.functional as F

    if not plan.active:
        return label
    lab = torch.from_numpy(np.ascontiguousarray(label))
    best = best_idx = None
    for c in (int(v) for v in torch.unique(lab)):
        x = (lab == c).to(torch.float32)[None, None]
        y = F.interpolate(x, size=plan.target_shape, mode="trilinear", align_corners=False)[0, 0]
        if best is None:
            best, best_idx = y, torch.full(y.shape, c, dtype=torch.int64)
        else:
            take = y > best
            best = torch.where(take, y, best)
            best_idx[take] = c
    assert best_idx is not None
    return best_idx.numpy().astype(label.dtype)


def resample_case(case: Any, spacing: Sequence[float] | None) -> Any:
    """A loaded :class:`~ahnet_fast.data.dataset.Case` on a grid of ``spacing`` (mm along H, W, D):
    the same field of view, image as :func:`resample_image`, label as :func:`resample_labels`.

    The case itself when ``spacing`` is None or within :data:`MISMATCH_TOLERANCE` of the case's own
    spacing on every axis (the rule inference applies, so training and ``segment`` agree on which
    inputs are resampled).
    """
    import dataclasses

    if spacing is None:
        return case
    plan = plan_resampling(case.spacing, case.image.shape, spacing)
    if not plan.active:
        return case
    label = None if case.label is None else resample_labels(case.label, plan)
    return dataclasses.replace(case, image=resample_image(case.image, plan), label=label,
                               spacing=tuple(float(v) for v in plan.target_spacing))


def resample_probabilities(prob: np.ndarray, plan: ResamplePlan) -> np.ndarray:
    """Class probabilities ``(h, w, d, K)`` on the model's grid -> ``plan.input_shape + (K,)`` (trilinear;
    each voxel's probabilities still sum to 1). Returns ``prob`` itself when the plan is not active."""
    import torch
    import torch.nn.functional as F

    if not plan.active:
        return prob
    if tuple(prob.shape[:3]) != tuple(plan.target_shape):
        raise ValueError(f"probabilities of shape {tuple(prob.shape)} do not lie on the planned grid "
                         f"{plan.target_shape}")
    x = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    y = F.interpolate(x, size=plan.input_shape, mode="trilinear", align_corners=False)
    return y[0].permute(1, 2, 3, 0).contiguous().numpy()
