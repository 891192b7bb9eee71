"""Training spacing recorded in checkpoints, and inputs resampled to it at inference.

A network learns sizes in voxels. The model here is a fixed size detector tuned ("trained") on a
1 x 1 x 4 mm volume: it tells small spheres from large ones by a blur and a max-pool of fixed
voxel sizes, so it fails on a 2 x 2 x 5 mm scan of the same objects unless that scan is resampled
to the training spacing first. A pointwise model on a real 2 x 2 x 5 mm MNI152 volume checks that
resampling there and back keeps labels on the input's grid, aligned.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahnet_fast.data.dataset import Case, read_dataset
from ahnet_fast.data.intensity import IntensityConfig
from ahnet_fast.data.nifti import load_label, load_volume
from ahnet_fast.data.spacing import (
    LAYOUT,
    _gaussian_blur,
    AUTO_MAX_VOXELS,
    auto_training_spacing,
    case_geometry,
    check_target_spacing,
    describe_preprocessing,
    plan_resampling,
    resample_case,
    resample_image,
    resample_labels,
    resample_probabilities,
    training_spacing_from_meta,
)
from ahnet_fast.infer.segment import SegmentOptions, segment_file

# (centre mm, radius mm, class): 1 small, 2 large; far enough apart that the detector's
# neighbourhood never reaches a second sphere
SPHERES = [((32, 32, 48), 8.0, 1), ((92, 92, 48), 18.0, 2), ((32, 92, 48), 18.0, 2), ((96, 30, 44), 8.0, 1)]
EXTENT_MM = (128, 128, 96)


def _sphere_case(folder: Path, name: str, spacing: tuple[float, float, float]) -> tuple[Path, Path]:
    shape = tuple(int(round(e / s)) for e, s in zip(EXTENT_MM, spacing))
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for c, r, k in SPHERES:
        lab[sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r] = k
    img = (lab > 0).astype(np.float32)
    aff = np.diag([*spacing, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    ip, lp = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    nib.Nifti1Image(img, aff).to_filename(str(ip))
    nib.Nifti1Image(lab, aff).to_filename(str(lp))
    return ip, lp


class SizeDetector(nn.Module):
    """Background / small sphere / large sphere by sizes in voxels (a blur of sigma 6 x 6 x 1.5 voxels,
    then the largest blurred value within 4 x 4 x 1 voxels), as a network trained at one spacing."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def size_score(self, x: torch.Tensor) -> torch.Tensor:
        s = _gaussian_blur(x, (6.0, 6.0, 1.5))
        return F.max_pool3d(s, (9, 9, 3), stride=1, padding=(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside, big = 20 * (x - 0.5), 20 * (self.size_score(x) - self.threshold)
        return torch.cat([-inside, inside - big, inside + big], dim=1)


def _dice(pred: np.ndarray, gt: np.ndarray, classes) -> float:
    return float(np.mean([2 * ((pred == c) & (gt == c)).sum() / max(1, (pred == c).sum() + (gt == c).sum())
                          for c in classes]))


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    root = tmp_path_factory.mktemp("spheres")
    train = _sphere_case(root, "train_1x1x4", (1.0, 1.0, 4.0))
    test = _sphere_case(root, "test_2x2x5", (2.0, 2.0, 5.0))
    # "training": the threshold halfway between the mean size score inside small and large spheres
    vol = load_volume(train[0])
    lab = load_label(train[1], vol)
    det = SizeDetector(0.0)
    with torch.no_grad():
        score = det.size_score(torch.from_numpy(vol.array)[None, None])[0, 0].numpy()
    det.threshold = float((score[lab == 1].mean() + score[lab == 2].mean()) / 2)
    return root, train, test, det


def _segment(img: Path, out: Path, model: nn.Module, **kw) -> tuple[np.ndarray, dict]:
    opts = SegmentOptions(window=None, training_spacing=(1.0, 1.0, 4.0), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = segment_file(img, out, model, IntensityConfig(mode="none"), opts, warn=False)
    return res.labels, res.stats


def test_two_by_two_by_five_is_resampled_to_the_training_spacing(spheres, tmp_path):
    root, train, test, det = spheres
    lab_train = load_label(train[1], load_volume(train[0]))
    matched, st = _segment(train[0], tmp_path / "m.nii.gz", det)
    d_matched = _dice(matched, lab_train, (1, 2))
    assert not st["resampled"] and "matches the training spacing" in st["spacing"]

    lab_test = load_label(test[1], load_volume(test[0]))
    resampled, st = _segment(test[0], tmp_path / "r.nii.gz", det)
    assert resampled.shape == lab_test.shape == (64, 64, 19)  # back on the input's grid
    d_resampled = _dice(resampled, lab_test, (1, 2))
    assert st["resampled"] and st["model_grid"] == (128, 128, 24)
    assert st["spacing"].startswith("resampled 64x64x19 at 2 x 2 x 5 mm to 128x128x24 at 1 x 1 x 3.96 mm")
    assert any("far from the training spacing" in w for w in st["warnings"])  # 2x in-plane

    raw, st = _segment(test[0], tmp_path / "n.nii.gz", det, resample=False)
    d_raw = _dice(raw, lab_test, (1, 2))
    assert not st["resampled"] and "--no-resample" in st["spacing"]
    assert any("wrong size" in w for w in st["warnings"])
    # the detector works at its training spacing, and on the 2x2x5 scan only after resampling
    assert d_matched > 0.9
    assert d_resampled > d_matched - 0.05, (d_matched, d_resampled)
    assert d_raw < d_resampled - 0.2, (d_raw, d_resampled)
    print(f"sphere Dice: matched {d_matched:.3f}, 2x2x5 resampled {d_resampled:.3f}, not resampled {d_raw:.3f}")
    # the written file holds the labels on the input's grid and affine
    out = nib.load(str(tmp_path / "r.nii.gz"))
    assert out.shape == (64, 64, 19) and np.allclose(out.affine, np.diag([2.0, 2.0, 5.0, 1.0]))
    assert np.array_equal(np.asarray(out.dataobj), resampled)


def test_real_mni_volume_round_trip_stays_aligned(tmp_path):
    """A pointwise (intensity-only) model: resampling 2x2x5 -> 1x1x4 -> 2x2x5 must not move labels."""
    from ahnet_fast.data.mni import build_mni_dataset

    js = build_mni_dataset(tmp_path / "mni", z_step=5, inplane_step=2, val_offset=None)
    ref = read_dataset(js).test[0]

    class Pointwise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            centres = torch.tensor([0.0, 0.35, 0.6, 0.85]).view(1, 4, 1, 1, 1)
            return -200 * (x - centres) ** 2

    gt = load_label(ref.label, load_volume(ref.image))
    intensity = IntensityConfig(mode="percentile")
    opts = dict(window=None, training_spacing=(1.0, 1.0, 4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = segment_file(ref.image, tmp_path / "r.nii.gz", Pointwise(), intensity, SegmentOptions(**opts))
        raw = segment_file(ref.image, tmp_path / "n.nii.gz", Pointwise(), intensity,
                           SegmentOptions(**opts, resample=False))
    assert res.stats["resampled"] and res.labels.shape == gt.shape
    assert res.probabilities.shape == gt.shape + (4,)
    assert np.allclose(res.probabilities.sum(-1), 1.0, atol=1e-4)
    d_res, d_raw = _dice(res.labels, gt, (1, 2, 3)), _dice(raw.labels, gt, (1, 2, 3))
    assert d_raw > 0.7 and abs(d_res - d_raw) < 0.03, (d_res, d_raw)
    print(f"MNI 2x2x5 pointwise Dice: resampled {d_res:.3f}, not resampled {d_raw:.3f}")


def test_plans_and_warnings():
    same = plan_resampling((1.0, 1.0, 4.02), (10, 10, 5), (1.0, 1.0, 4.0))
    assert not same.active and not same.warnings and "matches" in same.message
    near = plan_resampling((0.8, 0.8, 3.0), (100, 100, 20), (1.0, 1.0, 4.0))
    assert near.active and near.target_shape == (80, 80, 15) and not near.warnings
    assert near.target_spacing == (1.0, 1.0, 4.0)
    near_off = plan_resampling((0.8, 0.8, 3.0), (100, 100, 20), (1.0, 1.0, 4.0), resample=False)
    assert not near_off.active and "different size" in near_off.warnings[0]
    unknown = plan_resampling((2.0, 2.0, 5.0), (8, 8, 4), None)
    assert not unknown.active and "records no training spacing" in unknown.warnings[0]
    assert "--train-spacing" in unknown.warnings[0]
    # trained at 1 x 1 x 2 mm on 1 x 1 x 4 mm cases (--spacing): a 4 mm input is resampled like them, unwarned
    src = plan_resampling((1.0, 1.0, 4.0), (10, 10, 5), (1.0, 1.0, 2.0), source_spacing=(1.0, 1.0, 4.0))
    assert src.active and src.target_shape == (10, 10, 10) and not src.warnings
    assert plan_resampling((1.0, 1.0, 4.0), (10, 10, 5), (1.0, 1.0, 2.0)).warnings  # without the record: far
    # finer than training by 2x: resampled down (with anti-aliasing), and warned
    fine = plan_resampling((0.5, 0.5, 2.0), (64, 64, 16), (1.0, 1.0, 4.0))
    assert fine.active and fine.target_shape == (32, 32, 8) and "far from" in fine.warnings[0]
    img = np.random.default_rng(0).random((64, 64, 16)).astype(np.float32)
    small = resample_image(img, fine)
    assert small.shape == (32, 32, 8) and abs(float(small.mean()) - float(img.mean())) < 0.01
    assert small.std() < 0.5 * img.std()  # blurred before decimation, not picked
    prob = np.full((32, 32, 8, 3), 1 / 3, np.float32)
    assert resample_probabilities(prob, fine).shape == (64, 64, 16, 3)
    with pytest.raises(ValueError, match="do not lie on the planned grid"):
        resample_probabilities(prob[:4], fine)


def test_checkpoint_records_training_spacing_and_layout(spheres, tmp_path):
    root, train, _, _ = spheres
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    # stored slices-first and flipped: the recorded spacing is in network layout (coarsest axis last)
    img = nib.load(str(train[0]))
    data = np.asarray(img.dataobj)[::-1].transpose(2, 0, 1)
    aff = np.array([[0, -1.0, 0, 0], [0, 0, 1.0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])
    nib.Nifti1Image(data, aff).to_filename(str(tmp_path / "imagesTr" / "a.nii.gz"))
    nib.Nifti1Image(data.astype(np.uint8), aff).to_filename(str(tmp_path / "labelsTr" / "a.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "small", "2": "large"},
        "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]}))
    spec = read_dataset(tmp_path / "dataset.json")
    pre = describe_preprocessing(spec, IntensityConfig(mode="none"), 3)
    assert pre["spacing"] == [1.0, 1.0, 4.0] and pre["layout"] == LAYOUT
    assert pre["spacing_min"] == pre["spacing_max"] == [1.0, 1.0, 4.0]
    assert pre["class_names"] == ["background", "small", "large"] and pre["intensity"]["mode"] == "none"
    assert training_spacing_from_meta({"preprocessing": pre}) == (1.0, 1.0, 4.0)
    # trained on cases resampled to 1 x 1 x 2 mm (--spacing): that is the training spacing, the
    # cases' own is kept beside it
    fine = describe_preprocessing(spec, IntensityConfig(mode="none"), 3, (1.0, 1.0, 2.0))
    assert fine["spacing"] == [1.0, 1.0, 2.0] and fine["resampled_from"] == [1.0, 1.0, 4.0]
    assert fine["spacing_min"] == [1.0, 1.0, 4.0] and "resampled_from" not in pre
    assert training_spacing_from_meta({"preprocessing": fine}) == (1.0, 1.0, 2.0)
    assert training_spacing_from_meta({"preprocessing": {"intensity": {}}}) is None
    with pytest.raises(ValueError, match="not 3 positive numbers"):
        training_spacing_from_meta({"preprocessing": {"spacing": [1, 0, 4]}})


def test_labels_and_cases_resampled_for_training():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 4, (12, 10, 7)).astype(np.uint8)
    # twice as fine along D: each slice becomes two (interpolated indicators, not a class average),
    # and back to the original grid it is the original exactly
    up = plan_resampling((1.0, 1.0, 4.0), lab.shape, (1.0, 1.0, 2.0))
    fine = resample_labels(lab, up)
    assert fine.shape == (12, 10, 14) and fine.dtype == np.uint8
    assert np.array_equal(fine[:, :, 0::2], lab) and np.array_equal(fine[:, :, 1::2], lab)
    assert np.array_equal(resample_labels(fine, plan_resampling((1.0, 1.0, 2.0), fine.shape, (1.0, 1.0, 4.0))), lab)
    # coarser: a ball keeps its place and about its volume (classes absent from the map cost nothing)
    g = np.stack(np.meshgrid(*[np.arange(40) + 0.5] * 3, indexing="ij"))
    ball = (((g - 20) ** 2).sum(0) <= 12 ** 2).astype(np.uint8) * 3
    half = resample_labels(ball, plan_resampling((1.0, 1.0, 1.0), ball.shape, (2.0, 2.0, 2.0)))
    assert half.shape == (20, 20, 20) and set(np.unique(half)) == {0, 3}
    assert abs(8 * int((half == 3).sum()) / int((ball == 3).sum()) - 1) < 0.05
    assert np.array_equal(half, half[::-1]) and np.array_equal(half, half[:, :, ::-1])  # centred

    img = rng.random((12, 10, 7)).astype(np.float32)
    case = Case(img, lab, (1.0, 1.0, 4.0), "c", "c.nii.gz", "c_label.nii.gz")
    r = resample_case(case, (1.0, 1.0, 2.0))
    assert r.image.shape == r.label.shape == (12, 10, 14) and r.spacing == (1.0, 1.0, 2.0)
    assert np.array_equal(r.label, fine) and r.name == "c" and case.image.shape == (12, 10, 7)
    # the image linearly between slices (slice 4 lies at 1.75 of the old grid): no blur when finer
    assert np.allclose(r.image[:, :, 4], 0.25 * img[:, :, 1] + 0.75 * img[:, :, 2], atol=1e-6)
    # no resampling at the case's own spacing (within the tolerance inference uses), or without one
    assert resample_case(case, (1.0, 1.0, 4.1)) is case and resample_case(case, None) is case
    unlabelled = resample_case(Case(img, None, (1.0, 1.0, 4.0), "u", "u.nii.gz", None), (2.0, 2.0, 4.0))
    assert unlabelled.label is None and unlabelled.image.shape == (6, 5, 7)


def test_target_spacing_checked():
    assert check_target_spacing(None) is None
    assert check_target_spacing([1, 1, 2]) == (1.0, 1.0, 2.0)
    for bad in ((1, 0, 2), (1, 2), ("a", 1, 1), (1, 1, float("nan")), (1, 1, -2)):
        with pytest.raises(ValueError, match="expected 3 positive voxel sizes in mm"):
            check_target_spacing(bad)


def test_auto_spacing_halves_thick_slices_and_in_plane_within_the_voxel_cap():
    # without fields of view only thick slices are halved, never below the in-plane spacing
    assert auto_training_spacing((1.0, 1.0, 4.0)) == (1.0, 1.0, 2.0)
    assert auto_training_spacing((0.8, 0.7, 5.0)) == (0.8, 0.7, 2.5)
    assert auto_training_spacing((1.0, 1.0, 1.95)) == (1.0, 1.0, 1.0)
    assert auto_training_spacing((1.0, 1.0, 1.5)) is None and auto_training_spacing((1.0, 1.0, 1.0)) is None
    # with them, the in-plane spacing is halved too while the largest case stays within the cap:
    # the 91 x 217 x 46 (x 1 x 1 x 4 mm) MNI task becomes 182 x 434 x 92 voxels (7.3 M)
    mni = [(91.0, 217.0, 184.0)]
    assert auto_training_spacing((1.0, 1.0, 4.0), mni) == (0.5, 0.5, 2.0)
    assert auto_training_spacing((1.0, 1.0, 1.0), [(64.0, 64.0, 64.0)]) == (0.5, 0.5, 1.0)
    # the largest case decides: a 300 x 300 x 200 mm case at 0.5 x 0.5 x 2 mm is 36 M voxels
    assert auto_training_spacing((1.0, 1.0, 4.0), [*mni, (300.0, 300.0, 200.0)]) == (1.0, 1.0, 2.0)
    # a 1 mm isotropic head (182 x 218 x 182) would be 28.9 M voxels halved in-plane: kept as it is
    assert auto_training_spacing((1.0, 1.0, 1.0), [(182.0, 218.0, 182.0)]) is None
    # exactly at the cap is allowed, one voxel over is not
    assert AUTO_MAX_VOXELS == 256 * 256 * 256
    assert auto_training_spacing((1.0, 1.0, 1.0), [(128.0, 128.0, 256.0)]) == (0.5, 0.5, 1.0)
    assert auto_training_spacing((1.0, 1.0, 1.0), [(128.0, 128.0, 257.0)]) is None
    assert auto_training_spacing((1.0, 1.0, 1.0), [(64.0, 64.0, 64.0)], max_voxels=128 * 128 * 64 - 1) is None


def test_case_geometry_matches_the_loaded_volume(tmp_path):
    # an LPS-like affine with the thick axis first: the header-only shape and spacing are the ones
    # load_volume gives in network layout (coarsest axis last)
    data = np.zeros((9, 20, 13), np.float32)
    # stored axes: 0 = 9 slices of 5 mm (world z), 1 = 20 x 0.8 mm (world -x), 2 = 13 x 0.7 mm (world -y)
    aff = np.array([[0.0, -0.8, 0.0, 10.0], [0.0, 0.0, -0.7, 5.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    path = tmp_path / "x.nii.gz"
    nib.Nifti1Image(data, aff).to_filename(str(path))
    vol = load_volume(path)
    spacing, shape = case_geometry(path)
    assert shape == vol.array.shape == (20, 13, 9)
    assert spacing == pytest.approx(vol.spacing) and spacing == pytest.approx((0.8, 0.7, 5.0))
