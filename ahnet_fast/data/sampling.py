"""Patch sampling with foreground oversampling and in-plane augmentation.

One call of :func:`sample_patch` draws one training patch from a volume:

1. **Where**: with probability ``fg_ratio`` (paper: 0.7) the patch is centred
   near a random foreground voxel (label > 0; optionally the class is drawn
   first, uniformly over the classes present, so rare classes are seen), with a
   jitter of at most a quarter patch so the voxel is not always in the middle
   but always inside the patch; otherwise the patch position is uniform over
   the volume.
2. **Augmentation** (the paper's, all in-plane, so slices stay slices and the
   coarse D axis is never interpolated): rotation by an angle in
   ``[-rotation, +rotation]`` degrees about the D axis, scaling by a factor in
   ``[1 - scale, 1 + scale]`` (factor > 1 zooms in), and mirroring of each
   in-plane axis with probability 1/2. Image and label go through the same
   coordinate map; the image is interpolated linearly, the label with nearest
   neighbour, so they stay aligned voxel for voxel. Optionally (off by
   default, nnU-Net style) the image patch alone then goes through intensity
   changes, each with probability ``intensity_prob``: brightness (a
   multiplicative factor), contrast (scaled about the patch mean, clipped to the
   patch's own range) and gamma (on the patch rescaled to [0, 1], then mean and
   standard deviation restored): the usual remedy when scans differ in contrast
   (measured on the single-subject MNI task it does not help: see
   bench/results/unet_budget.md, "Intensity augmentation").
3. **Outside the volume** (rotated corners, a patch larger than the volume):
   image voxels take ``pad_value`` (the volume minimum by default), labels 0.
   A patch larger than the volume along an axis is therefore padded, with a
   warning (once per volume and size) that names the file; the fix is a smaller
   ``patch_size`` or accepting the padding.

Coordinate convention: output voxel ``u = (i, j)`` of a patch with centre
``pc = (p - 1) / 2`` reads the source at ``c + M @ (u - pc)`` with
``M = R(angle) @ diag(flip) / scale``; the D axis reads integer slices
``z0 .. z0 + d - 1``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["AugmentConfig", "PatchInfo", "ForegroundIndex", "adjust_intensity", "sample_patch", "check_patch_size"]


@dataclass(frozen=True)
class AugmentConfig:
    """Patch augmentation: in-plane geometry (paper defaults) and, optionally, intensity.

    Attributes:
        rotation: max |angle| in degrees (rotation about the D axis).
        scale: max |factor - 1|; 0 disables scaling.
        flip_axes: in-plane axes (0 = H, 1 = W) each mirrored with probability 1/2.
        prob: probability that the rotation/scaling is applied to a patch
            (flips are drawn independently).
        brightness: max |factor - 1| of a multiplicative intensity factor; 0: none.
        contrast: max |factor - 1| of a contrast change about the patch mean (the
            result is clipped to the patch's range before it); 0: none.
        gamma: gamma drawn log-uniformly in ``[1 / (1 + gamma), 1 + gamma]`` and
            applied to the patch rescaled to [0, 1] (mean and std restored); 0: none.
        intensity_prob: probability of each of brightness, contrast and gamma,
            drawn independently per patch.
        enabled: False turns all augmentation off (validation, tests).
    """

    rotation: float = 20.0
    scale: float = 0.2
    flip_axes: tuple[int, ...] = (0, 1)
    prob: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    intensity_prob: float = 0.3
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {self.rotation}")
        if not 0 <= self.scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {self.scale}")
        if any(a not in (0, 1) for a in self.flip_axes):
            raise ValueError(f"flip_axes may only hold the in-plane axes 0 and 1, got {self.flip_axes}")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {self.prob}")
        for name in ("brightness", "contrast"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1) (largest |factor - 1|), got {getattr(self, name)}")
        if not 0 <= self.gamma <= 4:
            raise ValueError(f"gamma must be in [0, 4] (gammas from 1/(1+g) to 1+g), got {self.gamma}")
        if not 0 <= self.intensity_prob <= 1:
            raise ValueError(f"intensity_prob must be in [0, 1], got {self.intensity_prob}")

    @property
    def intensity(self) -> bool:
        """Whether patches go through intensity changes at all."""
        return self.enabled and self.intensity_prob > 0 and bool(self.brightness or self.contrast or self.gamma)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flip_axes"] = list(self.flip_axes)
        return d


@dataclass
class PatchInfo:
    """How a patch was drawn (for tests and debugging)."""

    center: tuple[float, float]  # in-plane source coordinates of the patch centre
    z0: int  # first source slice (may be negative: padded)
    angle: float  # degrees
    scale: float
    flips: tuple[bool, bool]
    foreground: bool  # centred on a foreground voxel
    # intensity changes applied (1.0 each: none): brightness factor, contrast factor, gamma
    intensity: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def matrix(self) -> np.ndarray:
        """The 2x2 map ``M`` from output offsets to source offsets (module docstring)."""
        t = math.radians(self.angle)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        flip = np.diag([-1.0 if self.flips[0] else 1.0, -1.0 if self.flips[1] else 1.0])
        return rot @ flip / self.scale


class ForegroundIndex:
    """Flat indices of foreground voxels, per class, for fast centre draws.

    Args:
        label: ``(H, W, D)`` integer label map.
        max_per_class: keep at most this many voxels per class (an evenly
            strided subset) to bound memory on large volumes.
    """

    def __init__(self, label: np.ndarray, max_per_class: int = 2_000_000) -> None:
        self.shape = tuple(label.shape)
        flat = label.reshape(-1)
        self.by_class: dict[int, np.ndarray] = {}
        for c in np.unique(flat):
            if c == 0:
                continue
            idx = np.flatnonzero(flat == c)
            if idx.size > max_per_class:
                idx = idx[:: int(math.ceil(idx.size / max_per_class))]
            self.by_class[int(c)] = idx
        self.all = np.sort(np.concatenate(list(self.by_class.values()))) if self.by_class else np.empty(0, np.int64)

    @property
    def empty(self) -> bool:
        return self.all.size == 0

    def draw(self, rng: np.random.Generator, class_balanced: bool) -> tuple[int, int, int]:
        if class_balanced:
            classes = sorted(self.by_class)
            idx = self.by_class[classes[int(rng.integers(len(classes)))]]
        else:
            idx = self.all
        flat = int(idx[int(rng.integers(idx.size))])
        return tuple(int(v) for v in np.unravel_index(flat, self.shape))  # type: ignore[return-value]


_warned: set[tuple[str, tuple[int, ...], tuple[int, ...]]] = set()


def check_patch_size(
    patch_size: Sequence[int], volume_shape: Sequence[int], where: str | None = None, warn: bool = True
) -> list[int]:
    """Validate ``patch_size`` against a volume; returns the axes where the patch is larger.

    Raises ``ValueError`` for a malformed patch size. For a patch larger than
    the volume the patch is padded (image: ``pad_value``, label: 0); a warning
    names the file once per (file, patch, volume) combination.
    """
    ps = tuple(int(p) for p in patch_size)
    if len(ps) != 3 or any(p < 1 for p in ps):
        raise ValueError(f"patch_size must be 3 positive ints (H, W, D), got {tuple(patch_size)}")
    vs = tuple(int(s) for s in volume_shape)
    big = [a for a in range(3) if ps[a] > vs[a]]
    if big and warn:
        key = (str(where), ps, vs)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"{where or 'volume'}: patch {ps} is larger than the volume {vs} along axis "
                f"{', '.join('HWD'[a] for a in big)}; the patch is padded (image with the volume "
                "minimum, label with background). Use a smaller patch size to avoid this.",
                stacklevel=3,
            )
    return big


def _crop_padded(arr: np.ndarray, lo: Sequence[int], hi: Sequence[int], cval: float) -> np.ndarray:
    """``arr[lo0:hi0, lo1:hi1, lo2:hi2]`` where out-of-range parts are filled with ``cval``."""
    shape = arr.shape
    src = tuple(slice(max(l, 0), min(h, s)) for l, h, s in zip(lo, hi, shape))
    out_shape = tuple(h - l for l, h in zip(lo, hi))
    if all(l >= 0 and h <= s for l, h, s in zip(lo, hi, shape)):
        return arr[src]
    out = np.full(out_shape, cval, dtype=arr.dtype)
    dst = tuple(slice(max(l, 0) - l, max(l, 0) - l + (sl.stop - sl.start)) for l, sl in zip(lo, src))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = arr[src]
    return out


def sample_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    patch_size: Sequence[int],
    rng: np.random.Generator,
    fg_ratio: float = 0.7,
    augment: AugmentConfig | None = None,
    fg_index: ForegroundIndex | None = None,
    class_balanced: bool = False,
    pad_value: float | None = None,
    where: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, PatchInfo]:
    """Draw one patch (see the module docstring).

    Args:
        image: ``(H, W, D)`` or ``(C, H, W, D)`` float volume.
        label: ``(H, W, D)`` integer labels or None.
        patch_size: ``(h, w, d)``.
        rng: the random generator (callers derive it from (seed, sample index)
            so runs are reproducible independently of worker count).
        fg_ratio: share of patches centred on foreground, in [0, 1].
        augment: augmentation, or None for none.
        fg_index: precomputed :class:`ForegroundIndex` of ``label`` (built here if None).
        class_balanced: draw the foreground class uniformly first.
        pad_value: image value outside the volume (default: image minimum).
        where: file name for the patch-larger-than-volume warning.

    Returns:
        ``(image_patch, label_patch, info)``: image ``(h, w, d)`` or
        ``(C, h, w, d)`` float32, label ``(h, w, d)`` uint8 (or None).
    """
    if not 0 <= fg_ratio <= 1:
        raise ValueError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
    chan = image.ndim == 4
    vshape = image.shape[1:] if chan else image.shape
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (H, W, D) or (C, H, W, D), got shape {image.shape}")
    if label is not None and tuple(label.shape) != tuple(vshape):
        raise ValueError(f"label shape {label.shape} differs from image shape {tuple(vshape)}")
    ps = tuple(int(p) for p in patch_size)
    check_patch_size(ps, vshape, where)
    if pad_value is None:
        pad_value = float(image.min())

    # ---- where
    foreground = False
    if label is not None and fg_ratio > 0 and rng.random() < fg_ratio:
        if fg_index is None:
            fg_index = ForegroundIndex(label)
        if not fg_index.empty:
            foreground = True
            v = fg_index.draw(rng, class_balanced)
            jit = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in ps]
            center = (v[0] + jit[0], v[1] + jit[1])
            # integer slices along D; the fg slice stays inside [z0, z0 + d)
            z0 = v[2] + jit[2] - (ps[2] - 1) // 2
            if vshape[2] >= ps[2]:
                z0 = min(max(z0, 0), vshape[2] - ps[2])
                z0 = min(max(z0, v[2] - ps[2] + 1), v[2])
    if not foreground:
        starts = [int(rng.integers(0, s - p + 1)) if s >= p else -((p - s) // 2) for s, p in zip(vshape, ps)]
        center = (starts[0] + (ps[0] - 1) / 2, starts[1] + (ps[1] - 1) / 2)
        z0 = starts[2]

    # ---- augmentation parameters (always drawn in the same order: reproducible)
    angle, scale, flips = 0.0, 1.0, (False, False)
    if augment is not None and augment.enabled:
        u = rng.random(4)
        if u[0] < augment.prob:
            angle = (2 * u[1] - 1) * augment.rotation
            scale = 1.0 + (2 * u[2] - 1) * augment.scale
        f = rng.random(2)
        flips = (bool(0 in augment.flip_axes and f[0] < 0.5), bool(1 in augment.flip_axes and f[1] < 0.5))
    intensity = (1.0, 1.0, 1.0)
    if augment is not None and augment.intensity:
        # drawn after the geometry (and only when on), so runs without it draw exactly as before
        coin, val = rng.random(3), rng.random(3)
        p = augment.intensity_prob
        intensity = (1.0 + (2 * val[0] - 1) * augment.brightness if coin[0] < p else 1.0,
                     1.0 + (2 * val[1] - 1) * augment.contrast if coin[1] < p else 1.0,
                     math.exp((2 * val[2] - 1) * math.log1p(augment.gamma)) if coin[2] < p else 1.0)
    info = PatchInfo((float(center[0]), float(center[1])), int(z0), float(angle), float(scale), flips, foreground,
                     tuple(float(v) for v in intensity))

    zlo, zhi = int(z0), int(z0) + ps[2]
    identity = angle == 0.0 and scale == 1.0
    if identity:
        # exact slicing (+ flips): no interpolation at all
        lo = [int(round(center[a] - (ps[a] - 1) / 2)) for a in range(2)]
        box_lo, box_hi = (lo[0], lo[1], zlo), (lo[0] + ps[0], lo[1] + ps[1], zhi)
        img = _crop_chan(image, box_lo, box_hi, pad_value, chan)
        lab = None if label is None else _crop_padded(label, box_lo, box_hi, 0)
        for a in range(2):
            if flips[a]:
                img = np.flip(img, axis=a + 1 if chan else a)
                lab = None if lab is None else np.flip(lab, axis=a)
        img = adjust_intensity(np.ascontiguousarray(img, dtype=np.float32), info.intensity, chan)
        lab = None if lab is None else np.ascontiguousarray(lab, dtype=np.uint8)
        return img, lab, info

    from scipy.ndimage import map_coordinates

    m = info.matrix()
    ii, jj = np.meshgrid(np.arange(ps[0]) - (ps[0] - 1) / 2, np.arange(ps[1]) - (ps[1] - 1) / 2, indexing="ij")
    src_i = center[0] + m[0, 0] * ii + m[0, 1] * jj
    src_j = center[1] + m[1, 0] * ii + m[1, 1] * jj
    # crop the source bounding box first so interpolation touches only what it needs
    lo = (int(math.floor(src_i.min())) - 1, int(math.floor(src_j.min())) - 1, zlo)
    hi = (int(math.ceil(src_i.max())) + 2, int(math.ceil(src_j.max())) + 2, zhi)
    ci = np.broadcast_to((src_i - lo[0])[:, :, None], ps)
    cj = np.broadcast_to((src_j - lo[1])[:, :, None], ps)
    ck = np.broadcast_to(np.arange(ps[2], dtype=np.float64)[None, None, :], ps)
    coords = np.stack([ci, cj, ck])
    sub = _crop_chan(image, lo, hi, pad_value, chan)
    if chan:
        img = np.stack([
            map_coordinates(s.astype(np.float32, copy=False), coords, order=1, mode="constant", cval=pad_value)
            for s in sub
        ])
    else:
        img = map_coordinates(sub.astype(np.float32, copy=False), coords, order=1, mode="constant", cval=pad_value)
    lab = None
    if label is not None:
        lsub = _crop_padded(label, lo, hi, 0)
        lab = map_coordinates(lsub, coords, order=0, mode="constant", cval=0).astype(np.uint8)
    return adjust_intensity(np.ascontiguousarray(img, dtype=np.float32), info.intensity, chan), lab, info


def adjust_intensity(patch: np.ndarray, factors: tuple[float, float, float], chan: bool = False) -> np.ndarray:
    """Brightness, contrast and gamma (:attr:`PatchInfo.intensity`) applied to one image patch.

    Args:
        patch: ``(h, w, d)`` or, with ``chan``, ``(C, h, w, d)`` float32; each channel is
            changed on its own statistics.
        factors: ``(brightness, contrast, gamma)``; 1.0 leaves that step out.

    Returns:
        The patch (the same array when every factor is 1.0), float32.
    """
    brightness, contrast, gamma = factors
    if brightness == 1.0 and contrast == 1.0 and gamma == 1.0:
        return patch
    if chan:
        return np.stack([adjust_intensity(c, factors) for c in patch])
    x = patch.astype(np.float64)
    if brightness != 1.0:
        x = x * brightness
    if contrast != 1.0:
        # about the mean, then back inside the patch's own range (no new extremes)
        lo, hi, mean = x.min(), x.max(), x.mean()
        x = np.clip((x - mean) * contrast + mean, lo, hi)
    if gamma != 1.0:
        lo, hi = x.min(), x.max()
        if hi > lo:
            mean, std = x.mean(), x.std()
            x = ((x - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
            new_std = x.std()
            # keep the first two moments: the model sees the shape of the change, not a shift
            x = (x - x.mean()) * (std / new_std if new_std > 0 else 1.0) + mean
    return x.astype(np.float32)


def _crop_chan(image: np.ndarray, lo, hi, cval: float, chan: bool) -> np.ndarray:
    if not chan:
        return _crop_padded(image, lo, hi, cval)
    return np.stack([_crop_padded(c, lo, hi, cval) for c in image])
