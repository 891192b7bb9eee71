"""Data pipeline: normalisation, dataset readers, bad input, sampling ratio, augmentation geometry, loaders."""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ahnet_fast.data import (
    AugmentConfig,
    CaseRef,
    DataError,
    ForegroundIndex,
    IntensityConfig,
    PatchDataset,
    ct_window,
    load_case,
    make_loader,
    percentile_normalise,
    read_dataset,
    sample_patch,
)
from ahnet_fast.data.nifti import VolumeError
from ahnet_fast.data.sampling import adjust_intensity

AFF = np.diag([0.8, 0.8, 3.0, 1.0])


def _save(path: Path, arr: np.ndarray, affine: np.ndarray = AFF) -> str:
    nib.Nifti1Image(arr, affine).to_filename(str(path))
    return str(path)


def _pair(tmp: Path, name: str = "a", shape=(24, 20, 8), labels=3, seed=0) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 100, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[5:12, 4:10, 2:6] = 1
    if labels > 2:
        lab[14:20, 10:16, 3:7] = 2
    (tmp / "imagesTr").mkdir(exist_ok=True)
    (tmp / "labelsTr").mkdir(exist_ok=True)
    return (_save(tmp / "imagesTr" / f"{name}.nii.gz", img), _save(tmp / "labelsTr" / f"{name}.nii.gz", lab))


def _json(tmp: Path, items, labels=3) -> Path:
    meta = {"labels": {str(i): f"c{i}" for i in range(labels)}, "modality": {"0": "CT"},
            "training": [{"image": i, "label": l} for i, l in items]}
    p = tmp / "dataset.json"
    p.write_text(json.dumps(meta))
    return p


# ----------------------------------------------------------------------------- normalisation
def test_ct_window_maps_window_to_unit_interval():
    x = np.array([-1000.0, -125.0, 50.0, 225.0, 3000.0])
    np.testing.assert_allclose(ct_window(x), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    with pytest.raises(ValueError, match="lo < hi"):
        ct_window(x, 10, 10)


def test_percentile_normalise_ignores_zero_background():
    rng = np.random.default_rng(1)
    x = np.zeros((40, 40, 10), np.float32)
    x[10:30, 10:30] = rng.uniform(100, 200, (20, 20, 10))
    y = percentile_normalise(x, 1, 99, nonzero=True)
    fg = y[10:30, 10:30]
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
    # with the zeros excluded the foreground spans ~[0, 1]; including them it would be squeezed up
    assert np.percentile(fg, 50) == pytest.approx(0.5, abs=0.08)
    assert np.all(y[0] == 0.0)
    assert np.all(percentile_normalise(np.full((4, 4, 4), 7.0)) == 0)


# ----------------------------------------------------------------------------- readers
def test_read_msd_json_folder_csv(tmp_path):
    a = _pair(tmp_path, "a")
    b = _pair(tmp_path, "b", seed=1)
    _json(tmp_path, [("./imagesTr/a.nii.gz", "./labelsTr/a.nii.gz"), ("./imagesTr/b.nii.gz", "./labelsTr/b.nii.gz")])
    spec = read_dataset(tmp_path)
    assert [r.name for r in spec.training] == ["a", "b"]
    assert spec.num_classes == 3 and spec.modality == "CT"
    assert spec.training[0].image == str(tmp_path / "imagesTr" / "a.nii.gz")
    # the json itself
    assert read_dataset(tmp_path / "dataset.json").training == spec.training
    # a folder without json: paired by file name
    (tmp_path / "dataset.json").unlink()
    spec2 = read_dataset(tmp_path)
    assert [(r.image, r.label) for r in spec2.training] == [a, b]
    assert spec2.num_classes is None
    # CSV with relative paths
    csvp = tmp_path / "list.csv"
    csvp.write_text("image,label\nimagesTr/a.nii.gz,labelsTr/a.nii.gz\n")
    spec3 = read_dataset(csvp)
    assert spec3.training[0].image == a[0] and spec3.training[0].label == a[1]


def test_load_case_layout_and_normalisation(tmp_path):
    img_p, lab_p = _pair(tmp_path, shape=(24, 20, 8))
    case = load_case(CaseRef(img_p, lab_p, "a"), 3, IntensityConfig("ct"))
    assert case.image.shape == (24, 20, 8) and case.label.shape == (24, 20, 8)
    assert np.allclose(case.spacing, (0.8, 0.8, 3.0))
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert set(np.unique(case.label)) == {0, 1, 2}


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_file(tmp_path):
    img_p, lab_p = _pair(tmp_path)
    ct = IntensityConfig("ct")
    # missing file
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_case(CaseRef(str(tmp_path / "nope.nii.gz"), lab_p, "x"), 3, ct)
    # unreadable file
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a nifti file")
    with pytest.raises(VolumeError, match="junk.nii.gz"):
        load_case(CaseRef(str(junk), lab_p, "x"), 3, ct)
    # shape mismatch
    other = _save(tmp_path / "small.nii.gz", np.zeros((10, 10, 8), np.uint8))
    with pytest.raises(VolumeError, match="small.nii.gz.*shape"):
        load_case(CaseRef(img_p, other, "x"), 3, ct)
    # affine mismatch
    shifted = AFF.copy()
    shifted[0, 3] = 5.0
    moved = _save(tmp_path / "moved.nii.gz", np.zeros((24, 20, 8), np.uint8), shifted)
    with pytest.raises(VolumeError, match="moved.nii.gz.*affine"):
        load_case(CaseRef(img_p, moved, "x"), 3, ct)
    # NaN voxels
    bad = np.zeros((24, 20, 8), np.float32)
    bad[3, 3, 3] = np.nan
    nanp = _save(tmp_path / "nan.nii.gz", bad)
    with pytest.raises(VolumeError, match="nan.nii.gz.*NaN"):
        load_case(CaseRef(nanp, lab_p, "x"), 3, ct)
    # 4D image
    four = _save(tmp_path / "four.nii.gz", np.zeros((24, 20, 8, 2), np.float32))
    with pytest.raises(VolumeError, match="four.nii.gz.*3D"):
        load_case(CaseRef(four, lab_p, "x"), 3, ct)
    # labels outside the declared classes
    with pytest.raises(DataError, match=r"labelsTr/a.nii.gz.*\[2\] outside the declared classes 0..1"):
        load_case(CaseRef(img_p, lab_p, "x"), 2, ct)
    # empty dataset
    p = tmp_path / "empty.json"
    p.write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="empty.json.*no training cases"):
        read_dataset(p)
    # malformed json / csv without header
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="broken.json.*JSON"):
        read_dataset(tmp_path / "broken.json")
    (tmp_path / "x.csv").write_text("a.nii.gz,b.nii.gz\n")
    with pytest.raises(DataError, match="x.csv.*header"):
        read_dataset(tmp_path / "x.csv")


def test_patch_larger_than_volume_pads_with_warning():
    img = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4) + 1
    lab = np.ones((6, 5, 4), np.uint8)
    with pytest.warns(UserWarning, match=r"vol_x.nii.gz.*larger than the volume.*padded"):
        p, l, info = sample_patch(img, lab, (8, 5, 6), np.random.default_rng(0), fg_ratio=0.0, where="vol_x.nii.gz")
    assert p.shape == (8, 5, 6) and l.shape == (8, 5, 6)
    # the whole volume is inside, centred; the rest is padding (image min / background)
    assert l.sum() == lab.sum()
    assert np.isclose(p[l == 0], img.min()).all()
    with pytest.raises(ValueError, match="patch_size"):
        sample_patch(img, lab, (0, 4, 4), np.random.default_rng(0))


# ----------------------------------------------------------------------------- sampling ratio
@pytest.mark.parametrize("ratio", [0.7, 0.3])
def test_foreground_share_matches_ratio(ratio):
    shape = (96, 96, 24)
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[70:74, 10:14, 18:21] = 1  # a small blob: random patches rarely touch it
    fgi = ForegroundIndex(lab)
    rng = np.random.default_rng(123)
    n = 600
    hits = fg_draws = 0
    for _ in range(n):
        _, l, info = sample_patch(img, lab, (16, 16, 8), rng, fg_ratio=ratio, augment=AugmentConfig(), fg_index=fgi)
        hits += bool(l.any())
        fg_draws += info.foreground
        if info.foreground:
            assert l.any(), "a foreground-centred patch must contain foreground"
    # random patches contain the blob with probability ~ (19*19*10)/(81*81*17) ~ 3 %
    p_random = 0.035
    expected = ratio + (1 - ratio) * p_random
    sd = math.sqrt(expected * (1 - expected) / n)
    assert abs(hits / n - expected) < 4 * sd + 0.01
    assert abs(fg_draws / n - ratio) < 4 * math.sqrt(ratio * (1 - ratio) / n)


def test_class_balanced_draws_rare_class():
    lab = np.zeros((40, 40, 8), np.uint8)
    lab[:30] = 1
    lab[35:37, 35:37, 3] = 2  # 4 voxels of a rare class
    fgi = ForegroundIndex(lab)
    rng = np.random.default_rng(0)
    draws = [lab[fgi.draw(rng, class_balanced=True)] for _ in range(400)]
    assert 0.4 < np.mean(np.array(draws) == 2) < 0.6
    draws = [lab[fgi.draw(rng, class_balanced=False)] for _ in range(400)]
    assert np.mean(np.array(draws) == 2) < 0.02


# ----------------------------------------------------------------------------- augmentation geometry
def test_augmentation_linear_image_is_mapped_exactly():
    """A linear image is reproduced exactly by linear interpolation: check the coordinate map."""
    shape = (80, 70, 12)
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    img = (3.0 * i + 0.5 * j + 100.0 * k).astype(np.float32)
    aug = AugmentConfig(rotation=20, scale=0.2, prob=1.0)
    rng = np.random.default_rng(5)
    seen_rot = 0
    for _ in range(20):
        p, _, info = sample_patch(img, None, (24, 20, 6), rng, fg_ratio=0.0, augment=aug)
        m = info.matrix()
        u, v = np.meshgrid(np.arange(24) - 11.5, np.arange(20) - 9.5, indexing="ij")
        si = info.center[0] + m[0, 0] * u + m[0, 1] * v
        sj = info.center[1] + m[1, 0] * u + m[1, 1] * v
        inside = (si >= 0) & (si <= shape[0] - 1) & (sj >= 0) & (sj <= shape[1] - 1)
        for kk in range(6):
            z = info.z0 + kk
            if not 0 <= z < shape[2]:
                continue
            expect = 3.0 * si + 0.5 * sj + 100.0 * z
            np.testing.assert_allclose(p[:, :, kk][inside], expect[inside], rtol=0, atol=2e-3)
        assert abs(info.angle) <= 20 and 0.8 <= info.scale <= 1.2
        seen_rot += abs(info.angle) > 1
    assert seen_rot > 10


def test_augmentation_moves_image_and_label_together():
    rng0 = np.random.default_rng(2)
    shape = (64, 64, 10)
    # piecewise-constant label of 6x6 blocks; image = label value, so they must agree wherever
    # the 4 in-plane neighbours of the source position share one label
    lab = rng0.integers(0, 4, (11, 11, 10)).repeat(6, 0).repeat(6, 1)[:64, :64].astype(np.uint8)
    img = lab.astype(np.float32)
    aug = AugmentConfig(rotation=20, scale=0.2, prob=1.0)
    rng = np.random.default_rng(9)
    checked = 0
    for _ in range(15):
        p, l, info = sample_patch(img, lab, (32, 32, 4), rng, fg_ratio=0.5, augment=aug)
        m = info.matrix()
        u, v = np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5, indexing="ij")
        si = info.center[0] + m[0, 0] * u + m[0, 1] * v
        sj = info.center[1] + m[1, 0] * u + m[1, 1] * v
        i0, j0 = np.floor(si).astype(int), np.floor(sj).astype(int)
        ok = (i0 >= 0) & (i0 < shape[0] - 1) & (j0 >= 0) & (j0 < shape[1] - 1)
        for kk in range(4):
            z = info.z0 + kk
            if not 0 <= z < shape[2]:
                continue
            sl = lab[:, :, z]
            a = sl[np.clip(i0, 0, 62), np.clip(j0, 0, 62)]
            same = ok & (a == sl[np.clip(i0 + 1, 0, 63), np.clip(j0, 0, 63)]) \
                & (a == sl[np.clip(i0, 0, 63), np.clip(j0 + 1, 0, 63)]) & (a == sl[np.clip(i0 + 1, 0, 63), np.clip(j0 + 1, 0, 63)])
            assert np.array_equal(l[:, :, kk][same], a[same])
            np.testing.assert_allclose(p[:, :, kk][same], a[same].astype(np.float32), atol=1e-5)
            checked += int(same.sum())
    assert checked > 5000


def test_flip_only_is_exact_mirroring():
    img = np.random.default_rng(0).random((20, 18, 6), dtype=np.float32)
    lab = (img > 0.5).astype(np.uint8)
    aug = AugmentConfig(rotation=0, scale=0, flip_axes=(0, 1), prob=1.0)
    rng = np.random.default_rng(3)
    flips_seen = set()
    for _ in range(12):
        p, l, info = sample_patch(img, lab, (20, 18, 6), rng, fg_ratio=0.0, augment=aug)
        ref = img
        for a in range(2):
            if info.flips[a]:
                ref = np.flip(ref, a)
        np.testing.assert_array_equal(p, ref)
        np.testing.assert_array_equal(l, (ref > 0.5).astype(np.uint8))
        flips_seen.add(info.flips)
    assert len(flips_seen) >= 3


def test_intensity_augmentation_changes_the_image_only():
    """Brightness/contrast/gamma touch the image patch alone: the label and the geometry are those of
    the same draw without them, each factor stays within its range, and each is applied with about
    intensity_prob."""
    img = np.random.default_rng(0).normal(size=(30, 28, 6)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    geo = AugmentConfig(rotation=15, scale=0.1, prob=0.5)
    inten = AugmentConfig(rotation=15, scale=0.1, prob=0.5, brightness=0.25, contrast=0.2, gamma=0.5,
                          intensity_prob=0.5)
    applied = np.zeros(3)
    n = 200
    for k in range(n):
        p0, l0, i0 = sample_patch(img, lab, (16, 16, 4), np.random.default_rng([7, k]), augment=geo)
        p1, l1, i1 = sample_patch(img, lab, (16, 16, 4), np.random.default_rng([7, k]), augment=inten)
        assert (i0.center, i0.z0, i0.angle, i0.scale, i0.flips) == (i1.center, i1.z0, i1.angle, i1.scale, i1.flips)
        np.testing.assert_array_equal(l0, l1)
        assert i0.intensity == (1.0, 1.0, 1.0) and p1.dtype == np.float32
        b, c, g = i1.intensity
        assert 0.75 <= b <= 1.25 and 0.8 <= c <= 1.2 and 1 / 1.5 <= g <= 1.5
        applied += [b != 1.0, c != 1.0, g != 1.0]
        np.testing.assert_allclose(p1, adjust_intensity(p0, i1.intensity), rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(applied / n - 0.5) < 0.12), applied


def test_adjust_intensity_each_step():
    x = np.random.default_rng(1).normal(2.0, 1.5, size=(12, 10, 3)).astype(np.float32)
    assert adjust_intensity(x, (1.0, 1.0, 1.0)) is x
    np.testing.assert_allclose(adjust_intensity(x, (1.2, 1.0, 1.0)), x * 1.2, rtol=1e-6)
    c = adjust_intensity(x, (1.0, 1.5, 1.0))  # stretched about the mean, clipped to the old range
    assert c.min() >= x.min() and c.max() <= x.max() and c.std() > x.std()
    np.testing.assert_allclose(adjust_intensity(x, (1.0, 0.5, 1.0)), (x - x.mean()) * 0.5 + x.mean(), atol=1e-5)
    g = adjust_intensity(x, (1.0, 1.0, 0.7))  # new shape, same first two moments
    assert abs(g.mean() - x.mean()) < 1e-4 and abs(g.std() - x.std()) < 1e-4
    assert np.abs(g - x).max() > 0.05
    np.testing.assert_allclose(adjust_intensity(np.full((4, 4, 2), 3.0, np.float32), (1.0, 1.0, 1.4)), 3.0)
    two = np.stack([x, 2 * x])  # channels on their own statistics
    np.testing.assert_allclose(adjust_intensity(two, (1.0, 1.0, 0.7), chan=True)[1], 2 * g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, text", [({"brightness": 1.0}, "brightness must be in [0, 1)"),
                                       ({"contrast": -0.1}, "contrast must be in [0, 1)"),
                                       ({"gamma": 5}, "gamma must be in [0, 4]"),
                                       ({"intensity_prob": 1.5}, "intensity_prob must be in [0, 1]")])
def test_intensity_augmentation_bad_settings(bad, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        AugmentConfig(**bad)


# ----------------------------------------------------------------------------- loaders
def test_loader_stream_independent_of_workers_and_start(tmp_path):
    refs = [CaseRef(*_pair(tmp_path, n, shape=(40, 36, 8), seed=s), n) for s, n in enumerate("ab")]
    ds = PatchDataset(refs, 3, IntensityConfig("ct"), (16, 16, 4), fg_ratio=0.7, augment=AugmentConfig(), seed=11)
    a = [b["image"] for b in make_loader(ds, 2, 4, num_workers=0)]
    b = [b["image"] for b in make_loader(ds, 2, 4, num_workers=2)]
    c = [b["image"] for b in make_loader(ds, 2, 2, start_step=2, num_workers=0)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a[2], c[0]) and torch.equal(a[3], c[1])
    assert not torch.equal(a[0], a[1])
    assert a[0].shape == (2, 1, 16, 16, 4)
    ds2 = PatchDataset(refs, 3, IntensityConfig("ct"), (16, 16, 3), seed=1, mode="2.5d")
    item = ds2[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (16, 16)


def test_mni_dataset_is_a_valid_anisotropic_split(tmp_path):
    from ahnet_fast.data.mni import CLASS_NAMES, build_mni_dataset

    js = build_mni_dataset(tmp_path / "mni", inplane_step=3)
    spec = read_dataset(js.parent)
    assert spec.class_names == CLASS_NAMES and len(spec.training) == 1 and len(spec.test) == 1
    tr = nib.load(spec.training[0].image)
    te = nib.load(spec.test[0].image)
    assert np.allclose(tr.header.get_zooms(), (3, 3, 4))
    # test is anterior of (and disjoint from) training, at another slice offset (z by 2 mm)
    tr_y_max = (tr.affine @ [0, tr.shape[1] - 1, 0, 1])[1]
    te_y_min = (te.affine @ [0, 0, 0, 1])[1]
    assert te_y_min > tr_y_max
    assert (te.affine[2, 3] - tr.affine[2, 3]) % 4 == 2
    lab = np.asarray(nib.load(spec.training[0].label).dataobj)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert build_mni_dataset(tmp_path / "mni", inplane_step=3) == js  # reused
    with pytest.raises(FileExistsError):
        build_mni_dataset(tmp_path / "mni", inplane_step=2)
