"""Metrics against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ahnet_fast.infer.metrics import (
    average_surface_distance,
    confusion_counts,
    dice,
    dice_per_class,
    evaluate_case,
    global_dice,
    hd95,
    surface_distances,
)


def test_dice_hand_computed():
    p = np.zeros((4, 4, 4), bool)
    g = np.zeros((4, 4, 4), bool)
    p[0, 0, :3] = True  # 3 voxels
    g[0, 0, 1:] = True  # 3 voxels, 2 shared
    assert dice(p, g) == pytest.approx(2 * 2 / 6)
    assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))
    assert dice(np.zeros(3, bool), np.zeros(3, bool), empty_dice=1.0) == 1.0
    assert dice(p, np.zeros_like(g)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(p, g[:2])


def test_dice_per_class_and_global_lits():
    pred = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    gt = np.array([0, 1, 2, 2, 2, 0, 0, 1])
    d = dice_per_class(pred, gt, [1, 2])
    assert d[1] == pytest.approx(2 * 1 / (2 + 2))
    assert d[2] == pytest.approx(2 * 2 / (3 + 3))
    c1 = confusion_counts(pred, gt, [1, 2])
    assert c1 == {1: (1, 2, 2), 2: (2, 3, 3)}
    # second case: class 2 absent in both, class 1 tiny miss
    c2 = confusion_counts(np.array([0, 0, 1]), np.array([0, 1, 1]), [1, 2])
    assert c2 == {1: (1, 1, 2), 2: (0, 0, 0)}
    g = global_dice([c1, c2])
    assert g[1] == pytest.approx(2 * (1 + 1) / ((2 + 2) + (1 + 2)))  # 4/7, not the mean of per-case 0.5, 2/3
    assert g[2] == pytest.approx(2 * 2 / 6)
    assert math.isnan(global_dice([c2])[2])


def test_surface_distances_two_cubes_hand_computed():
    # two 1-voxel "masks" 3 voxels apart along x with spacing (2, 1, 1): every distance is 6 mm
    p = np.zeros((10, 5, 5), bool)
    g = np.zeros((10, 5, 5), bool)
    p[2, 2, 2] = True
    g[5, 2, 2] = True
    assert hd95(p, g, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert average_surface_distance(p, g, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    # spacing along an axis that does not separate them does not matter
    assert hd95(p, g, (2.0, 7.0, 7.0)) == pytest.approx(6.0)


def test_hd95_and_asd_slab_shift():
    """GT slab x in [2, 6) and pred slab x in [3, 7), full in y/z (2x2 cross-section, spacing 1.5 mm
    along x). Every voxel touches the volume border along y/z, so every voxel is a surface voxel.
    From each pred voxel x=3..6 to the nearest GT voxel: 0,0,0,1.5 mm; from GT x=2..5 to pred: 1.5,0,0,0."""
    p = np.zeros((10, 2, 2), bool)
    g = np.zeros((10, 2, 2), bool)
    g[2:6] = True
    p[3:7] = True
    sp = (1.5, 1.0, 1.0)
    d_pg, d_gp = surface_distances(p, g, sp)
    assert sorted(set(np.round(d_pg, 6))) == [0.0, 1.5]
    assert len(d_pg) == len(d_gp) == 16
    assert np.count_nonzero(d_pg) == 4 and np.count_nonzero(d_gp) == 4
    # 16 distances each side, 4 of them 1.5 mm: the 95th percentile is 1.5, the mean 0.375
    assert hd95(p, g, sp) == pytest.approx(1.5)
    assert average_surface_distance(p, g, sp) == pytest.approx(2 * 4 * 1.5 / 32)


def test_hd95_ignores_5_percent_outliers_and_crop_is_exact():
    # a 20x20 plane of GT, the prediction equals it plus one far-away voxel: 1 of 401 pred surface
    # voxels is far, so the directed 95th percentile stays 0 while the max would not
    g = np.zeros((40, 22, 22), bool)
    g[5, 1:21, 1:21] = True
    p = g.copy()
    p[35, 10, 10] = True
    assert hd95(p, g, (1.0, 1.0, 1.0)) == pytest.approx(0.0)
    d_pg, _ = surface_distances(p, g, (1.0, 1.0, 1.0))
    assert d_pg.max() == pytest.approx(30.0)
    # interior voxels are not surface: a solid 5x5x5 cube has 125 - 27 surface voxels
    cube = np.zeros((9, 9, 9), bool)
    cube[2:7, 2:7, 2:7] = True
    d1, d2 = surface_distances(cube, cube, (1, 1, 1))
    assert len(d1) == len(d2) == 125 - 27 and not d1.any()


def test_empty_conventions():
    z = np.zeros((4, 4, 4), bool)
    o = z.copy()
    o[1, 1, 1] = True
    assert math.isnan(hd95(z, z, (1, 1, 1))) and math.isnan(average_surface_distance(z, z, (1, 1, 1)))
    assert hd95(o, z, (1, 1, 1)) == math.inf and average_surface_distance(z, o, (1, 1, 1)) == math.inf
    with pytest.raises(ValueError, match="spacing"):
        hd95(o, o, (1, 1))


def test_evaluate_case_combines():
    gt = np.zeros((8, 8, 4), np.int16)
    gt[2:5, 2:5, 1:3] = 1
    pred = gt.copy()
    pred[2, 2:5, 1:3] = 0  # remove one face: 6 of 18 voxels
    m = evaluate_case("c", pred, gt, (1.0, 1.0, 3.0), [1, 2])
    assert m.dice[1] == pytest.approx(2 * 12 / (12 + 18))
    assert m.hd95[1] == pytest.approx(1.0)
    assert math.isnan(m.dice[2]) and math.isnan(m.hd95[2])
    assert m.counts[1] == (12, 12, 18)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside get_mask_edges
def test_matches_monai_on_random_blobs():
    metrics = pytest.importorskip("monai.metrics")
    import torch
    from scipy import ndimage

    rng = np.random.default_rng(0)
    g = ndimage.binary_dilation(rng.random((20, 18, 10)) > 0.97, iterations=2)
    p = ndimage.binary_dilation(rng.random((20, 18, 10)) > 0.97, iterations=2) | g & (rng.random(g.shape) > 0.3)
    sp = (0.8, 0.8, 3.0)

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m]))[None].float()

    ref_hd = float(metrics.compute_hausdorff_distance(onehot(p), onehot(g), percentile=95, spacing=sp)[0, 0])
    ref_asd = float(metrics.compute_average_surface_distance(onehot(p), onehot(g), symmetric=True, spacing=sp)[0, 0])
    assert hd95(p, g, sp) == pytest.approx(ref_hd, rel=1e-5)
    assert average_surface_distance(p, g, sp) == pytest.approx(ref_asd, rel=1e-5)
