"""Percentile normalisation that does not depend on exact zeros or on how a scan is stored.

The same 2 x 2 x 5 mm MNI152 volume is written twice: as float32 whose background holds tiny
non-zero values (as resampling leaves them, 0 .. 0.001), and as int16 with a scale slope (background
exactly 0). Both must normalise alike and give the same labels.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from ahnet_fast.data.intensity import (
    IntensityConfig,
    describe_stats,
    foreground_mask,
    normalise,
    normalise_with_stats,
)
from ahnet_fast.data.nifti import load_volume
from ahnet_fast.data.spacing import plan_resampling, resample_image
from ahnet_fast.infer.segment import SegmentOptions, segment_file


class Pointwise(nn.Module):
    """Tissue classes from the normalised intensity alone (any change of normalisation shows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor([0.0, 0.35, 0.6, 0.85]).view(1, 4, 1, 1, 1)
        return -200 * (x - centres) ** 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from ahnet_fast.data.mni import template_paths

    root = tmp_path_factory.mktemp("norm")
    t1 = nib.load(str(template_paths()["t1"]))
    data = np.asarray(t1.dataobj[20:180, 20:216, 10:170], dtype=np.float32)
    plan = plan_resampling((1.0, 1.0, 1.0), data.shape, (2.0, 2.0, 5.0))
    img = resample_image(data, plan)
    rng = np.random.default_rng(0)
    bg = img < 1e-3
    img[bg] = rng.uniform(0, 1e-3, int(bg.sum())).astype(np.float32)  # what resampling leaves behind
    aff = t1.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag(plan.target_spacing)
    f32 = nib.Nifti1Image(img, aff)
    f32.set_data_dtype(np.float32)
    f32.to_filename(str(root / "f32.nii.gz"))
    i16 = nib.Nifti1Image(img, aff)
    i16.set_data_dtype(np.int16)  # nibabel stores int16 with a scale slope
    i16.to_filename(str(root / "i16.nii.gz"))
    return root, int(bg.sum())


def test_float32_and_int16_with_slope_give_the_same_labels(pair, tmp_path):
    root, n_bg = pair
    stored = nib.load(str(root / "i16.nii.gz"))
    assert stored.get_data_dtype() == np.int16 and float(stored.dataobj.slope) != 1.0
    a, b = load_volume(root / "f32.nii.gz").array, load_volume(root / "i16.nii.gz").array
    assert int(((a > a.min()) & (a < 1e-3)).sum()) > 10000 and int(((b > b.min()) & (b < 1e-3)).sum()) == 0

    cfg = IntensityConfig(mode="percentile")
    na, sa = normalise_with_stats(a, cfg)
    nb, sb = normalise_with_stats(b, cfg)
    assert abs(sa["lo"] - sb["lo"]) < 0.05 and abs(sa["hi"] - sb["hi"]) < 0.05, (sa, sb)
    assert abs(sa["foreground_fraction"] - sb["foreground_fraction"]) < 1e-3
    assert float(np.abs(na - nb).max()) < 2e-3

    # the z-score's foreground statistics come from the same mask: equal too
    za, zb = normalise(a, IntensityConfig(mode="zscore")), normalise(b, IntensityConfig(mode="zscore"))
    assert float(np.abs(za - zb).max()) < 2e-3

    # the old rule (every voxel above the minimum) is what made them differ
    old = IntensityConfig(mode="percentile", fg_threshold=0.0)
    assert float(np.abs(normalise(a, old) - normalise(b, old)).max()) > 0.005

    opts = SegmentOptions(window=None, resample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = segment_file(root / "f32.nii.gz", tmp_path / "a.nii.gz", Pointwise(), cfg, opts, warn=False)
        lb = segment_file(root / "i16.nii.gz", tmp_path / "b.nii.gz", Pointwise(), cfg, opts, warn=False)
        la_old = segment_file(root / "f32.nii.gz", tmp_path / "c.nii.gz", Pointwise(), old, opts, warn=False)
        lb_old = segment_file(root / "i16.nii.gz", tmp_path / "d.nii.gz", Pointwise(), old, opts, warn=False)
    same = float((la.labels == lb.labels).mean())
    same_old = float((la_old.labels == lb_old.labels).mean())
    print(f"labels equal: robust mask {100 * same:.3f}% of voxels, old rule {100 * same_old:.3f}%")
    assert same > 0.9999 and same_old < 0.995
    # what was used is reported
    line = describe_stats(la.stats["intensity"])
    assert line.startswith("intensity: percentiles 0.5-99.5 of voxels > ") and "foreground" in line


def test_loaded_cases_carry_their_normalisation_statistics(pair):
    from ahnet_fast.data.dataset import CaseRef, load_case

    root, _ = pair
    case = load_case(CaseRef(str(root / "i16.nii.gz"), None, "i16"), None, IntensityConfig(mode="percentile"))
    st = case.intensity_stats
    assert st["mode"] == "percentile" and st["hi"] > st["lo"] > 0 and 0 < st["foreground_fraction"] < 1
    assert float(case.image.min()) == 0.0 and float(case.image.max()) == 1.0


def test_foreground_mask_rule_and_edge_cases():
    x = np.zeros((20, 20, 20), np.float32)
    x[5:15, 5:15, 5:15] = 100.0
    x[0, 0, :] = 0.5  # near-zero, but above the minimum: background all the same
    fg, thr = foreground_mask(x)
    assert thr == pytest.approx(1.0) and int(fg.sum()) == 1000
    # negative backgrounds (CT-like air) and offsets: the rule is relative to the minimum
    fg2, _ = foreground_mask(x - 1000.0)
    assert np.array_equal(fg, fg2)
    # a few bright voxels on a constant background: the robust range is empty, fall back to > min
    y = np.zeros((10, 10, 10), np.float32)
    y[0, 0, 0] = 5.0
    fg3, thr3 = foreground_mask(y)
    assert int(fg3.sum()) == 1 and thr3 >= 0
    assert np.all(normalise(np.full((4, 4, 4), 7.0), IntensityConfig(mode="percentile")) == 0)
    with pytest.raises(ValueError, match="fg_threshold"):
        IntensityConfig(mode="percentile", fg_threshold=0.7)
    # old checkpoints (no fg_threshold) get the robust rule; the setting round-trips
    assert IntensityConfig.from_dict({"mode": "percentile"}).fg_threshold == 0.01
    cfg = IntensityConfig(mode="percentile", fg_threshold=0.05)
    assert IntensityConfig.from_dict(cfg.to_dict()) == cfg
    _, st = normalise_with_stats(x, IntensityConfig(mode="ct"))
    assert describe_stats(st) == "intensity: CT window [-125, 225] HU -> [0, 1]"


def test_zscore_of_the_foreground():
    """mode "zscore": (x - mean) / sd over the foreground mask, clipped at +-3 sd and mapped to [0, 1]; the
    same for any gain and offset of the scan; background and padding stay at 0."""
    from ahnet_fast.data.intensity import ZSCORE_CLIP

    rng = np.random.default_rng(0)
    x = np.zeros((30, 30, 12), np.float32)
    x[5:25, 5:25] = rng.normal(150.0, 30.0, (20, 20, 12)).clip(20, None)
    x[6, 6, 6] = 5000.0  # one bright outlier: clipped at +3 sd
    cfg = IntensityConfig(mode="zscore")
    y, st = normalise_with_stats(x, cfg)
    fg = foreground_mask(x)[0]
    w = np.clip(x[fg], *np.percentile(x[fg], [0.5, 99.5]))  # the outlier does not set the spread
    m, sd = float(w.mean(dtype=np.float64)), float(w.std(dtype=np.float64))
    assert sd < 40
    assert st["mean"] == pytest.approx(m) and st["std"] == pytest.approx(sd)
    assert (st["lo"], st["hi"]) == pytest.approx((m - ZSCORE_CLIP * sd, m + ZSCORE_CLIP * sd))
    np.testing.assert_allclose(y, np.clip((x - m) / (2 * ZSCORE_CLIP * sd) + 0.5, 0, 1), atol=1e-6)
    assert y.dtype == np.float32 and y[0, 0, 0] == 0.0 and y[6, 6, 6] == pytest.approx(1.0)
    assert 0.4 < float(np.median(y[fg])) < 0.6
    # gain and offset (another scanner setting, another storage scale) change nothing
    np.testing.assert_allclose(normalise(2.5 * x + 40.0, cfg), y, atol=1e-5)
    # statistics over every voxel when asked; a constant image maps to zeros
    every = np.clip(x, *np.percentile(x, [0.5, 99.5]))
    assert normalise_with_stats(x, IntensityConfig(mode="zscore", nonzero=False))[1]["mean"] == pytest.approx(
        float(every.mean(dtype=np.float64)))
    assert np.all(normalise(np.full((4, 4, 4), 7.0), cfg) == 0)
    line = describe_stats(st)
    assert line.startswith("intensity: z-score of voxels > ") and "(+-3 sd) -> [0, 1]" in line
    assert IntensityConfig.from_dict(cfg.to_dict()) == cfg
    # stats="training": the training foreground's pooled mean and sd as one fixed window; with one image
    # that image's own z-score
    from ahnet_fast.data.intensity import training_window

    one = training_window([x], IntensityConfig(mode="zscore", stats="training"))
    assert one.mode == "window" and one.window == pytest.approx((st["lo"], st["hi"]))
    np.testing.assert_allclose(normalise(x, one), y, atol=1e-6)
    flat = np.zeros((8, 8, 4), np.float32)
    flat[2:6, 2:6] = 7.0
    with pytest.raises(ValueError, match="foreground is constant"):
        training_window([flat], IntensityConfig(mode="zscore", stats="training"))


def test_training_window_pools_the_training_foreground():
    """stats="training": one fixed window from the training images' pooled foreground percentiles; with
    one image it is that image's own percentile scaling, and every other image is scaled by it."""
    from ahnet_fast.data.intensity import IntensityConfig, normalise, normalise_with_stats, training_window

    rng = np.random.default_rng(0)
    a = np.zeros((20, 20, 8), np.float32)
    a[4:16, 4:16] = rng.uniform(50, 150, (12, 12, 8))
    b = np.zeros((20, 20, 8), np.float32)
    b[2:18, 2:18] = rng.uniform(80, 300, (16, 16, 8))
    req = IntensityConfig(mode="percentile", percentiles=(1.0, 99.0), stats="training")
    one = training_window([a], req)
    assert one.mode == "window" and one.stats == "case" and one.percentiles == (1.0, 99.0)
    np.testing.assert_allclose(normalise(a, one), normalise(a, IntensityConfig(mode="percentile",
                                                                               percentiles=(1.0, 99.0))))
    both = training_window([a, b], req)
    fg = np.concatenate([a[a > 0], b[b > 0]])
    np.testing.assert_allclose(both.window, np.percentile(fg, [1.0, 99.0]), rtol=1e-6)
    y, st = normalise_with_stats(b, both)
    lo, hi = both.window
    np.testing.assert_allclose(y, np.clip((b - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert st == {"mode": "window", "lo": lo, "hi": hi}
    assert "fixed window" in describe_stats(st)
    # per-case requests pass through; recorded windows survive a round trip; old records are per-case
    per_case = IntensityConfig(mode="percentile")
    assert training_window([a], per_case) is per_case
    assert IntensityConfig.from_dict(both.to_dict()) == both
    assert IntensityConfig.from_dict({"mode": "percentile"}).stats == "case"


def test_training_window_refuses_what_it_cannot_do():
    from ahnet_fast.data.intensity import IntensityConfig, normalise, training_window

    with pytest.raises(ValueError, match="applies to percentile and zscore scaling only, not to mode 'ct'"):
        IntensityConfig(mode="ct", stats="training")
    with pytest.raises(ValueError, match="intensity stats must be one of"):
        IntensityConfig(mode="percentile", stats="dataset")
    req = IntensityConfig(mode="percentile", stats="training")
    with pytest.raises(ValueError, match="must be resolved into a fixed window first"):
        normalise(np.ones((4, 4, 4), np.float32), req)
    with pytest.raises(ValueError, match="needs at least one training image"):
        training_window([], req)
    flat = np.zeros((8, 8, 4), np.float32)
    flat[2:6, 2:6] = 7.0
    with pytest.raises(ValueError, match="no intensity range to scale"):
        training_window([flat], req)
    with pytest.raises(ValueError, match="NaN/Inf"):
        training_window([np.full((4, 4, 4), np.nan, np.float32)], req)
