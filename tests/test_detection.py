"""Lesion detection utilities: Gaussian heatmap targets, NMS, FROC (hand-computed cases), plot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ahnet_fast.infer.detection import FROC_POINTS, box_centres, froc, gaussian_heatmap, heatmap_nms, plot_froc


# --------------------------------------------------------------------------- heatmap
def test_heatmap_peak_at_box_centre_with_expected_widths():
    # box of 11 x 11 x 3 voxels, spacing 1 x 1 x 4 mm: centre (15, 25, 4)
    box = [10, 20, 3, 21, 31, 6]
    heat = gaussian_heatmap((32, 40, 9), [box], spacing=(1.0, 1.0, 4.0), k=2.0, dtype=torch.float64)
    assert heat.shape == (32, 40, 9)
    assert tuple(np.argwhere(heat.numpy() == heat.max().item())[0]) == (15, 25, 4)
    assert heat[15, 25, 4].item() == 1.0
    # sigma = size / (2k): 11/4 = 2.75 voxels in-plane; 12 mm / 4 = 3 mm = 0.75 slice along z
    for j in range(1, 6):
        assert heat[15 + j, 25, 4].item() == pytest.approx(math.exp(-0.5 * (j / 2.75) ** 2), rel=1e-12)
        assert heat[15, 25 - j, 4].item() == pytest.approx(math.exp(-0.5 * (j / 2.75) ** 2), rel=1e-12)
    for j in (1, 2):
        assert heat[15, 25, 4 + j].item() == pytest.approx(math.exp(-0.5 * (j / 0.75) ** 2), rel=1e-12)
    # separable: off-axis value is the product of the axis profiles
    assert heat[17, 24, 5].item() == pytest.approx(
        math.exp(-0.5 * ((2 / 2.75) ** 2 + (1 / 2.75) ** 2 + (1 / 0.75) ** 2)), rel=1e-12
    )
    # truncated at 3 sigma: 9 voxels in-plane (> 8.25) is 0, 8 voxels is not
    assert heat[15 + 9, 25, 4].item() == 0.0 and heat[15 + 8, 25, 4].item() > 0.0
    # k=2: the box's physical edge (5.5 voxels from the centre) is at 2 sigma, exp(-2) in value:
    # the last voxel inside the box is above it, the first outside below
    assert heat[20, 25, 4].item() > math.exp(-2.0) > heat[21, 25, 4].item()


def test_heatmap_sigma_floor_is_in_mm_and_boxes_combine_by_max():
    box = [10, 10, 4, 13, 13, 5]  # 3 x 3 x 1 voxels at 0.5 x 0.5 x 5 mm: sigma 0.375 mm x 0.375 mm x 1.25 mm
    heat = gaussian_heatmap((24, 24, 9), [box], spacing=(0.5, 0.5, 5.0), min_sigma_mm=2.5, dtype=torch.float64)
    # floor 2.5 mm: 5 voxels in-plane, 0.5 slice along z
    assert heat[11 + 5, 11, 4].item() == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert heat[11, 11, 5].item() == pytest.approx(math.exp(-0.5 * 4.0), rel=1e-12)
    two = gaussian_heatmap((24, 24, 9), [box, [14, 14, 4, 17, 17, 5]], spacing=(0.5, 0.5, 5.0), min_sigma_mm=2.5)
    other = gaussian_heatmap((24, 24, 9), [[14, 14, 4, 17, 17, 5]], spacing=(0.5, 0.5, 5.0), min_sigma_mm=2.5)
    torch.testing.assert_close(two, torch.maximum(heat.float(), other))
    assert two[11, 11, 4] == 1.0 and two[15, 15, 4] == 1.0
    # a box partly outside the volume is clipped, an empty list gives zeros
    edge = gaussian_heatmap((8, 8, 4), [[-3, -3, 0, 4, 4, 3]])  # centre (0, 0, 1)
    assert edge.max() == 1.0 and edge[0, 0, 1] == 1.0
    assert gaussian_heatmap((4, 5, 6), np.zeros((0, 6))).abs().sum() == 0


def test_heatmap_bad_input():
    with pytest.raises(ValueError, match="empty"):
        gaussian_heatmap((8, 8, 8), [[2, 2, 2, 2, 5, 5]])
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        gaussian_heatmap((8, 8, 8), [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="spacing"):
        gaussian_heatmap((8, 8, 8), [[1, 1, 1, 3, 3, 3]], spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="shape"):
        gaussian_heatmap((8, 8), [[1, 1, 1, 3, 3, 3]])


# --------------------------------------------------------------------------- NMS
def _planted(shape=(40, 40, 16), spacing=(1.0, 1.0, 3.0)):
    boxes = [[5, 5, 2, 10, 10, 5], [25, 8, 9, 32, 15, 12], [12, 28, 6, 19, 35, 9]]
    heights = [0.9, 0.7, 0.8]
    heat = torch.zeros(shape, dtype=torch.float64)
    for b, hgt in zip(boxes, heights):
        heat = torch.maximum(heat, hgt * gaussian_heatmap(shape, [b], spacing=spacing, dtype=torch.float64))
    heat += 0.02 * torch.rand(shape, dtype=torch.float64)  # low noise: many tiny local maxima below threshold
    return heat, boxes, heights


def test_nms_finds_planted_peaks_in_score_order():
    heat, boxes, heights = _planted()
    centres, scores = heatmap_nms(heat[None, None], threshold=0.3, spacing=(1.0, 1.0, 3.0))
    expected = box_centres(boxes)  # (7, 7, 3), (28, 11, 10), (15, 31, 7)
    order = np.argsort(heights)[::-1]
    assert centres.dtype == torch.long and centres.shape == (3, 3)
    np.testing.assert_array_equal(centres.numpy(), np.round(expected[order]).astype(int))
    assert torch.all(scores[:-1] >= scores[1:])
    assert scores[0] == pytest.approx(0.9, abs=0.021)
    # threshold above the lowest peak drops it; max_detections caps the list
    c2, _ = heatmap_nms(heat, threshold=0.75, spacing=(1.0, 1.0, 3.0))
    assert len(c2) == 2
    c1, _ = heatmap_nms(heat, threshold=0.3, max_detections=1)
    assert c1.tolist() == [[7, 7, 3]]


def test_nms_min_distance_is_in_mm_and_plateau_gives_one_peak():
    heat = torch.zeros(20, 20, 10)
    heat[10, 10, 3] = 1.0
    heat[10, 10, 6] = 0.8  # 3 slices = 12 mm away at 4 mm slices, only 3 mm at 1 mm
    heat[10, 13, 3] = 0.6  # 3 voxels in-plane = 3 mm
    c, s = heatmap_nms(heat, threshold=0.1, min_distance_mm=10.0, spacing=(1.0, 1.0, 4.0))
    assert c.tolist() == [[10, 10, 3], [10, 10, 6]] and s.tolist() == pytest.approx([1.0, 0.8])
    c, _ = heatmap_nms(heat, threshold=0.1, min_distance_mm=10.0, spacing=(1.0, 1.0, 1.0))
    assert c.tolist() == [[10, 10, 3]]
    c, _ = heatmap_nms(heat, threshold=0.1)  # no distance rule: every local maximum
    assert len(c) == 3
    plateau = torch.zeros(12, 12, 6, dtype=torch.float16)
    plateau[4:7, 4:6, 2] = 1.0  # saturated region: six equal maxima
    plateau[9, 9, 4] = 0.5
    c, s = heatmap_nms(plateau, threshold=0.2)
    assert c.tolist() == [[4, 4, 2], [9, 9, 4]] and s.dtype == torch.float32


def test_nms_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W, D\)"):
        heatmap_nms(torch.rand(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        heatmap_nms(torch.ones(4, 4, 4, dtype=torch.long))


# --------------------------------------------------------------------------- FROC
def _froc_case():
    """20 volumes, 3 lesions (A, B in volume 0; C in volume 1), detections by hand.

    Ranked detections (score: outcome -> cumulative TP, FP):
        0.90 in A        -> TP 1, FP 0
        0.85 nothing     -> TP 1, FP 1   (0.05 FP/vol)
        0.80 nothing     -> TP 1, FP 2   (0.10)
        0.70 in A again  -> duplicate: neither TP nor FP
        0.60 in B        -> TP 2, FP 2
        0.50 nothing     -> TP 2, FP 3   (0.15)
        0.45 nothing     -> TP 2, FP 4   (0.20)
        0.40 in C        -> TP 3, FP 4
        0.30 nothing     -> TP 3, FP 5   (0.25)
    Sensitivity at <= 0.01, 0.02, 0.05 FP/vol: 1/3; 0.1: 2/3; 0.2, 0.25: 1.
    """
    gt = [np.array([[0, 0, 0, 10, 10, 4], [20, 20, 0, 30, 30, 4]]), np.array([[5, 5, 5, 9, 9, 8]])] + [
        np.zeros((0, 6))
    ] * 18
    det = [
        (np.array([[4, 4, 1], [50, 50, 2], [9, 0, 3], [25, 29, 2]]), np.array([0.9, 0.8, 0.7, 0.6])),
        (np.array([[0, 0, 0], [8, 5, 7], [40, 40, 1]]), np.array([0.45, 0.4, 0.3])),
        (np.array([[1, 1, 1]]), np.array([0.85])),
        (np.array([[3, 3, 3]]), np.array([0.5])),
    ] + [(np.zeros((0, 3)), np.zeros(0))] * 16
    return det, gt


def test_froc_hand_computed_case():
    det, gt = _froc_case()
    r = froc(det, gt)
    assert (r.n_lesions, r.n_volumes, r.n_detections) == (3, 20, 9)
    np.testing.assert_array_equal(r.fp_points, FROC_POINTS)
    np.testing.assert_allclose(r.sensitivity, [1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1], rtol=0, atol=1e-15)
    assert r.mean_sensitivity == pytest.approx(11 / 18)
    np.testing.assert_allclose(r.fps_per_volume, [0, 0, 0.05, 0.1, 0.1, 0.1, 0.15, 0.2, 0.2, 0.25])
    np.testing.assert_allclose(r.sensitivities, [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    assert r.thresholds[0] == np.inf and r.thresholds[-1] == 0.3
    assert "0.611" in r.table()


def test_froc_hit_radius_ties_and_torch_inputs():
    gt = [np.array([[10, 10, 2, 13, 13, 3]])]  # centre (11, 11, 2), one slice thick
    spacing = (1.0, 1.0, 5.0)
    near_inplane = torch.tensor([[11.0, 14.0, 2.0]])  # 3 mm from the centre, outside the box
    near_z = torch.tensor([[11.0, 11.0, 3.0]])  # 5 mm (one slice) away
    assert froc([(near_inplane, torch.tensor([0.9]))], gt, spacing).sensitivity.max() == 0
    r = froc([(near_inplane, torch.tensor([0.9]))], gt, spacing, hit_radius_mm=4.0)
    assert r.sensitivity.min() == 1.0
    assert froc([(near_z, torch.tensor([0.9]))], gt, spacing, hit_radius_mm=4.0).sensitivity.max() == 0
    # tied scores are one operating point: TP and FP at 0.5 arrive together
    tied = (np.array([[11, 11, 2], [0, 0, 0]]), np.array([0.5, 0.5]))
    r = froc([tied], gt, fp_points=[0.5, 1.0])
    np.testing.assert_allclose(r.fps_per_volume, [0.0, 1.0])
    np.testing.assert_allclose(r.sensitivity, [0.0, 1.0])


def test_froc_bad_input():
    det, gt = _froc_case()
    with pytest.raises(ValueError, match="one per volume"):
        froc(det[:3], gt)
    with pytest.raises(ValueError, match="no ground-truth lesion"):
        froc(det[2:], gt[2:])
    with pytest.raises(ValueError, match="2 centres but 1 scores"):
        froc([(np.zeros((2, 3)), np.zeros(1))], gt[:1])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\]\[0\].*empty"):
        froc([det[0]], [np.array([[0, 0, 0, 0, 1, 1]])])


def test_plot_froc_writes_png(tmp_path):
    det, gt = _froc_case()
    r = froc(det, gt)
    r2 = froc(det, gt, hit_radius_mm=30.0)
    out = plot_froc([r, r2], tmp_path / "froc.png", labels=["inside box", "within 30 mm"])
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["froc.png"]  # no temporary left behind
    with pytest.raises(FileNotFoundError):
        plot_froc(r, tmp_path / "missing" / "froc.png")
    with pytest.raises(ValueError, match="labels"):
        plot_froc([r], tmp_path / "x.png", labels=["a", "b"])


@pytest.mark.gpu
def test_nms_on_cuda_heatmap_matches_cpu():
    heat, _, _ = _planted()
    c_cpu, s_cpu = heatmap_nms(heat, threshold=0.3, min_distance_mm=5.0, spacing=(1.0, 1.0, 3.0))
    c_gpu, s_gpu = heatmap_nms(heat.cuda(), threshold=0.3, min_distance_mm=5.0, spacing=(1.0, 1.0, 3.0))
    assert torch.equal(c_cpu, c_gpu) and torch.equal(s_cpu, s_gpu)
