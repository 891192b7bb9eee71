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

from ahnet_fast.data.dataset import read_dataset
from ahnet_fast.data.intensity import IntensityConfig
from ahnet_fast.data.nifti import load_label, load_volume
from ahnet_fast.data.spacing import (
    LAYOUT,
    _gaussian_blur,
    describe_preprocessing,
    plan_resampling,
    resample_image,
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
    assert training_spacing_from_meta({"preprocessing": {"intensity": {}}}) is None
    with pytest.raises(ValueError, match="not 3 positive numbers"):
        training_spacing_from_meta({"preprocessing": {"spacing": [1, 0, 4]}})
