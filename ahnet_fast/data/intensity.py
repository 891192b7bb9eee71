"""Intensity normalisation: CT windowing or percentile scaling (MRI).

Both map the useful intensity range to [0, 1] (float32):

* ``"ct"``: clip to a Hounsfield window ``[lo, hi]`` (default the paper's
  ``[-125, 225]`` HU, a soft-tissue/liver window) and scale linearly.
* ``"percentile"``: clip to the ``[lower, upper]`` percentiles of the image
  (default 0.5 and 99.5) and scale linearly. With ``nonzero=True`` (default)
  the percentiles are taken over voxels above the image minimum only, so the
  large zero background of a skull-stripped MRI does not pull the lower
  percentile to 0.
* ``"none"``: leave values as they are (must already be finite).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ahnet_fast.data.errors import DataError

__all__ = ["IntensityConfig", "normalise", "ct_window", "percentile_normalise"]

_MODES = ("ct", "percentile", "none")


@dataclass(frozen=True)
class IntensityConfig:
    """How to normalise intensities (see module docstring).

    Attributes:
        mode: ``"ct"``, ``"percentile"`` or ``"none"``.
        window: ``(lo, hi)`` for ``"ct"``, lo < hi.
        percentiles: ``(lower, upper)`` in [0, 100] for ``"percentile"``, lower < upper.
        nonzero: percentiles over voxels above the minimum only.
    """

    mode: str = "ct"
    window: tuple[float, float] = (-125.0, 225.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    nonzero: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"intensity mode must be one of {_MODES}, got {self.mode!r}")
        lo, hi = self.window
        if not lo < hi:
            raise ValueError(f"CT window must have lo < hi, got {self.window}")
        plo, phi = self.percentiles
        if not (0 <= plo < phi <= 100):
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")

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
        )

    @classmethod
    def for_modality(cls, modality: str | None) -> "IntensityConfig":
        """CT window for CT, percentile scaling for everything else (MRI, unknown)."""
        return cls(mode="ct") if (modality or "").strip().upper() == "CT" else cls(mode="percentile")


def ct_window(x: np.ndarray, lo: float = -125.0, hi: float = 225.0) -> np.ndarray:
    """Clip to ``[lo, hi]`` and scale to [0, 1]. Any shape; returns float32."""
    if not lo < hi:
        raise ValueError(f"CT window must have lo < hi, got ({lo}, {hi})")
    x = np.asarray(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32, copy=False)


def percentile_normalise(
    x: np.ndarray, lower: float = 0.5, upper: float = 99.5, nonzero: bool = True
) -> np.ndarray:
    """Clip to the ``[lower, upper]`` percentiles and scale to [0, 1]. Returns float32.

    A constant image (or constant foreground) maps to all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    vals = x
    if nonzero:
        fg = x > x.min()
        if fg.any():
            vals = x[fg]
    plo, phi = np.percentile(vals, [lower, upper])
    if not phi > plo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, plo, phi) - plo) / (phi - plo)).astype(np.float32, copy=False)


def normalise(x: np.ndarray, cfg: IntensityConfig, where: str | None = None) -> np.ndarray:
    """Apply ``cfg`` to image ``x``; refuses NaN/Inf (naming ``where``)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        n = int((~np.isfinite(x)).sum())
        raise DataError(where, f"{n} NaN/Inf voxels in the image")
    if cfg.mode == "ct":
        return ct_window(x, *cfg.window)
    if cfg.mode == "percentile":
        return percentile_normalise(x, *cfg.percentiles, nonzero=cfg.nonzero)
    return x
