"""Intensity normalisation: CT windowing, z-score or percentile scaling (MRI).

Each maps the useful intensity range to [0, 1] (float32). The default
(:meth:`IntensityConfig.for_modality`) is the CT window for CT and the z-score
for everything else (MRI, unknown), as nnU-Net does:

* ``"ct"``: clip to a Hounsfield window ``[lo, hi]`` (default the paper's
  ``[-125, 225]`` HU, a soft-tissue/liver window) and scale linearly.
* ``"percentile"``: clip to the ``[lower, upper]`` percentiles of the image
  (default 0.5 and 99.5) and scale linearly. With ``nonzero=True`` (default)
  the percentiles are taken over a foreground mask only, so the large
  background of a skull-stripped MRI does not pull the lower percentile down.
  The mask does not depend on exact zeros or on the storage type: a voxel is
  foreground when it lies above ``min + fg_threshold * (p99.9 - min)`` (default
  1% of the image's robust range). So the same scan stored as float32 with a
  background of tiny non-zero values (0 .. 0.001 after resampling) and as int16
  with a scale slope (background exactly 0) gets the same statistics.
* ``"zscore"``: the z-score of the foreground (as nnU-Net normalises MRI): subtract
  the mean and divide by the standard deviation of the :func:`foreground_mask`
  voxels (taken with the voxels beyond the ``percentiles`` clipped to them, so a
  few bright artefacts do not inflate the spread), clip to +- ``ZSCORE_CLIP`` (3)
  standard deviations and map that range linearly to [0, 1] (``(z + 3) / 6``),
  so a skull-stripped background and the zero padding of patches and windows
  stay at 0, as in the other modes. Mean and spread move less with what a
  partial view holds than the tails the percentiles come from: on the MNI task
  (one subject, trained on one half of the head, tested on the other) the same
  trained weights score 0.008-0.016 higher on the held-out half when it is
  mapped by the z-score instead of by its own percentiles, and 20-minute runs
  trained with it reach 0.911 / 0.882 on the two splits against 0.901-0.908 /
  0.879-0.889 (bench/results/unet_budget.md).
* ``"window"``: clip to a fixed ``[lo, hi]`` in the image's own units and scale
  linearly, the same for every case. Training writes it for ``percentile`` with
  ``stats="training"``: the percentiles of the training cases' foreground, pooled
  (:func:`training_window`), then applied unchanged to every case it trains,
  validates and segments. Per-case percentiles depend on what the image holds
  (a crop with less of the darkest tissue gets a higher ``lo``, and every tissue
  in it maps lower); one subject or one scanner protocol has consistent
  intensities, and a window from the training data keeps them consistent.
* ``"none"``: leave values as they are (must already be finite).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ahnet_fast.data.errors import DataError

__all__ = ["IntensityConfig", "normalise", "normalise_with_stats", "ct_window", "percentile_normalise",
           "foreground_mask", "describe_stats", "training_window", "ZSCORE_CLIP", "STATISTICS_MODES"]

_MODES = ("ct", "percentile", "zscore", "window", "none")
#: the modes that scale by statistics of the image (per case, or pooled over the training cases)
STATISTICS_MODES = ("percentile", "zscore")

#: ``"zscore"`` clips at this many standard deviations either side of the foreground mean
ZSCORE_CLIP = 3.0
_STATS = ("case", "training")


@dataclass(frozen=True)
class IntensityConfig:
    """How to normalise intensities (see module docstring).

    Attributes:
        mode: ``"ct"``, ``"percentile"``, ``"zscore"``, ``"window"`` or ``"none"``.
        window: ``(lo, hi)`` for ``"ct"`` (HU) and ``"window"`` (the image's units), lo < hi.
        percentiles: ``(lower, upper)`` in [0, 100], lower < upper: the range ``"percentile"``
            maps to [0, 1]; for ``"zscore"`` the range the foreground is clipped to before its mean
            and standard deviation are taken.
        nonzero: percentiles (``"percentile"``) or mean and standard deviation (``"zscore"``)
            over the foreground mask only (:func:`foreground_mask`).
        fg_threshold: the mask's threshold as a fraction of the image's robust range
            (``min`` to the 99.9th percentile), in [0, 0.5).
        stats: for ``"percentile"`` and ``"zscore"``: ``"case"``, each image's own statistics,
            or ``"training"``, the training cases' pooled ones as a fixed window (resolved by
            :func:`training_window` into mode ``"window"`` before use).
    """

    mode: str = "ct"
    window: tuple[float, float] = (-125.0, 225.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    nonzero: bool = True
    fg_threshold: float = 0.01
    stats: str = "case"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"intensity mode must be one of {_MODES}, got {self.mode!r}")
        lo, hi = self.window
        if not lo < hi:
            raise ValueError(f"CT window must have lo < hi, got {self.window}")
        plo, phi = self.percentiles
        if not (0 <= plo < phi <= 100):
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")
        if not 0 <= self.fg_threshold < 0.5:
            raise ValueError(f"fg_threshold must be in [0, 0.5), got {self.fg_threshold}")
        if self.stats not in _STATS:
            raise ValueError(f"intensity stats must be one of {_STATS}, got {self.stats!r}")
        if self.stats == "training" and self.mode not in STATISTICS_MODES:
            raise ValueError("intensity stats 'training' applies to percentile and zscore scaling only, "
                             f"not to mode {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityConfig":
        return cls(
            mode=d.get("mode", "ct"),
            window=tuple(d.get("window", (-125.0, 225.0))),  # type: ignore[arg-type]
            percentiles=tuple(d.get("percentiles", (0.5, 99.5))),  # type: ignore[arg-type]
            nonzero=bool(d.get("nonzero", True)),
            fg_threshold=float(d.get("fg_threshold", 0.01)),
            stats=str(d.get("stats", "case")),  # records written before the setting: per-case statistics
        )

    @classmethod
    def for_modality(cls, modality: str | None) -> "IntensityConfig":
        """CT window for CT, the foreground z-score for everything else (MRI, unknown; module docstring).

        Percentile scaling was the default for non-CT data before the z-score; checkpoints record the
        mode they were trained with, so `segment` keeps applying theirs."""
        return cls(mode="ct") if (modality or "").strip().upper() == "CT" else cls(mode="zscore")


def ct_window(x: np.ndarray, lo: float = -125.0, hi: float = 225.0) -> np.ndarray:
    """Clip to ``[lo, hi]`` and scale to [0, 1]. Any shape; returns float32."""
    if not lo < hi:
        raise ValueError(f"CT window must have lo < hi, got ({lo}, {hi})")
    x = np.asarray(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32, copy=False)


def foreground_mask(x: np.ndarray, fg_threshold: float = 0.01) -> tuple[np.ndarray, float]:
    """Voxels above ``min + fg_threshold * (p99.9 - min)``, and that threshold.

    Independent of exact zeros and of the storage type: a near-zero float background and an
    exactly-zero integer background fall below it alike. ``fg_threshold = 0`` is the old rule
    (every voxel above the minimum). Falls back to ``x > min`` when the robust range is empty
    (a few bright voxels on a constant background).
    """
    x = np.asarray(x, dtype=np.float32)
    lo = float(x.min())
    top = float(np.percentile(x, 99.9))
    if not top > lo:
        top = float(x.max())
    thr = lo + fg_threshold * (top - lo)
    fg = x > thr
    if not fg.any():
        thr = lo
        fg = x > lo
    return fg, thr


def _percentile_stats(x: np.ndarray, lower: float, upper: float, nonzero: bool,
                      fg_threshold: float) -> dict[str, Any]:
    stats: dict[str, Any] = {"mode": "percentile", "percentiles": [lower, upper]}
    vals = _foreground_values(x, nonzero, fg_threshold, stats)
    plo, phi = (float(v) for v in np.percentile(vals, [lower, upper]))
    stats.update(lo=plo, hi=phi)
    return stats


def percentile_normalise(
    x: np.ndarray, lower: float = 0.5, upper: float = 99.5, nonzero: bool = True, fg_threshold: float = 0.01
) -> np.ndarray:
    """Clip to the ``[lower, upper]`` percentiles (of the foreground, :func:`foreground_mask`, when
    ``nonzero``) and scale to [0, 1]. Returns float32.

    A constant image (or constant foreground) maps to all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    st = _percentile_stats(x, lower, upper, nonzero, fg_threshold)
    return _scale(x, st["lo"], st["hi"])


def _foreground_values(x: np.ndarray, nonzero: bool, fg_threshold: float,
                       stats: dict[str, Any] | None = None) -> np.ndarray:
    """The voxels statistics are taken over (the foreground when ``nonzero``); records the mask in
    ``stats`` when given."""
    if stats is None:
        stats = {}
    if not nonzero:
        stats.update(mask="all voxels", foreground_fraction=1.0)
        return x
    fg, thr = foreground_mask(x, fg_threshold)
    stats.update(mask=f"voxels > {thr:.6g} (min + {fg_threshold:g} x robust range)",
                 threshold=thr, foreground_fraction=float(fg.mean()))
    return x[fg] if fg.any() else x


def _robust_mean_std(vals: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Mean and standard deviation of ``vals`` with the values beyond ``percentiles`` clipped to them
    (one bright artefact among a million voxels would otherwise set the spread)."""
    lo, hi = np.percentile(vals, list(percentiles))
    v = np.clip(vals, lo, hi)
    # float64 sums: a float32 mean over tens of millions of voxels loses digits
    return float(v.mean(dtype=np.float64)), float(v.std(dtype=np.float64))


def _zscore_stats(x: np.ndarray, percentiles: tuple[float, float], nonzero: bool,
                  fg_threshold: float) -> dict[str, Any]:
    stats: dict[str, Any] = {"mode": "zscore", "percentiles": list(percentiles)}
    mean, std = _robust_mean_std(_foreground_values(x, nonzero, fg_threshold, stats), percentiles)
    stats.update(mean=mean, std=std, lo=mean - ZSCORE_CLIP * std, hi=mean + ZSCORE_CLIP * std)
    return stats


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32, copy=False)


def normalise_with_stats(
    x: np.ndarray, cfg: IntensityConfig, where: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`normalise`, plus what was done: ``{"mode", "lo", "hi", ...}`` (the values mapped to 0
    and 1; for percentile mode also the foreground mask rule, its threshold and the foreground
    fraction). :func:`describe_stats` turns it into one line for a log."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        n = int((~np.isfinite(x)).sum())
        raise DataError(where, f"{n} NaN/Inf voxels in the image")
    if cfg.mode == "ct":
        lo, hi = cfg.window
        return ct_window(x, lo, hi), {"mode": "ct", "lo": float(lo), "hi": float(hi)}
    if cfg.mode == "window":
        lo, hi = cfg.window
        return _scale(x, lo, hi), {"mode": "window", "lo": float(lo), "hi": float(hi)}
    if cfg.mode in STATISTICS_MODES and cfg.stats != "case":
        raise ValueError("intensity stats 'training' must be resolved into a fixed window first "
                         "(ahnet_fast.data.intensity.training_window)")
    if cfg.mode == "percentile":
        st = _percentile_stats(x, *cfg.percentiles, nonzero=cfg.nonzero, fg_threshold=cfg.fg_threshold)
        return _scale(x, st["lo"], st["hi"]), st
    if cfg.mode == "zscore":
        st = _zscore_stats(x, cfg.percentiles, cfg.nonzero, cfg.fg_threshold)
        return _scale(x, st["lo"], st["hi"]), st
    return x, {"mode": "none", "lo": float(x.min()), "hi": float(x.max())}


def describe_stats(stats: dict[str, Any]) -> str:
    """One line for a log: the mode and the statistics :func:`normalise_with_stats` used."""
    mode = stats.get("mode")
    if mode == "ct":
        return f"intensity: CT window [{stats['lo']:g}, {stats['hi']:g}] HU -> [0, 1]"
    if mode == "window":
        return f"intensity: fixed window [{stats['lo']:.6g}, {stats['hi']:.6g}] -> [0, 1]"
    if mode == "percentile":
        plo, phi = stats["percentiles"]
        line = (f"intensity: percentiles {plo:g}-{phi:g} of {stats['mask']}: [{stats['lo']:.6g}, {stats['hi']:.6g}] "
                f"-> [0, 1]")
        return line + f", foreground {100 * stats['foreground_fraction']:.1f}% of the voxels"
    if mode == "zscore":
        return (f"intensity: z-score of {stats['mask']}: mean {stats['mean']:.6g}, sd {stats['std']:.6g}; "
                f"[{stats['lo']:.6g}, {stats['hi']:.6g}] (+-{ZSCORE_CLIP:g} sd) -> [0, 1], "
                f"foreground {100 * stats['foreground_fraction']:.1f}% of the voxels")
    return f"intensity: not normalised (values {stats.get('lo', 0):.6g} .. {stats.get('hi', 0):.6g})"


def normalise(x: np.ndarray, cfg: IntensityConfig, where: str | None = None) -> np.ndarray:
    """Apply ``cfg`` to image ``x``; refuses NaN/Inf (naming ``where``)."""
    return normalise_with_stats(x, cfg, where)[0]


#: foreground voxels per image that :func:`training_window` pools at most (an even subsample beyond)
_POOL_PER_IMAGE = 2_000_000


def training_window(images: "list[np.ndarray]", cfg: IntensityConfig) -> IntensityConfig:
    """Resolve ``cfg`` (percentile or zscore, ``stats="training"``) into a fixed window from the training
    images' foreground voxels pooled (each image's own :func:`foreground_mask`; at most
    ``_POOL_PER_IMAGE`` evenly spaced voxels of each, so a large image does not cost its size in
    memory): their percentiles, or their mean +- ``ZSCORE_CLIP`` standard deviations. Returns
    ``IntensityConfig(mode="window", window=(lo, hi), ...)``; ``cfg`` itself when it asks for per-case
    statistics.

    Raises ``ValueError`` when there is no image or the pooled range is empty (a constant foreground).
    """
    if cfg.mode not in STATISTICS_MODES or cfg.stats != "training":
        return cfg
    if not images:
        raise ValueError("intensity stats 'training' needs at least one training image")
    pooled = []
    for x in images:
        x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"a training image holds {int((~np.isfinite(x)).sum())} NaN/Inf voxels")
        v = _foreground_values(x, cfg.nonzero, cfg.fg_threshold).ravel()
        step = max(1, -(-v.size // _POOL_PER_IMAGE))
        pooled.append(v[::step])
    values = np.concatenate(pooled)
    if cfg.mode == "zscore":
        mean, std = _robust_mean_std(values, cfg.percentiles)
        lo, hi = mean - ZSCORE_CLIP * std, mean + ZSCORE_CLIP * std
        what = f"the training images' foreground is constant ({mean:g})"
    else:
        lo, hi = (float(t) for t in np.percentile(values, list(cfg.percentiles)))
        what = (f"the training images' percentiles {cfg.percentiles[0]:g} and {cfg.percentiles[1]:g} are equal "
                f"({lo:g})")
    if not hi > lo:
        raise ValueError(f"{what}: no intensity range to scale; use --intensity none or per-case statistics")
    return IntensityConfig(mode="window", window=(lo, hi), percentiles=cfg.percentiles, nonzero=cfg.nonzero,
                           fg_threshold=cfg.fg_threshold)
