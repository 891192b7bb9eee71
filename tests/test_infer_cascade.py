"""Coarse-to-fine cascade: ROI from the coarse pass, exact fine result inside it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ahnet_fast.infer.cascade import cascade_inference
from ahnet_fast.infer.sliding_window import sliding_window_inference


class Threshold(nn.Module):
    """Two-class logits from intensity: foreground where x > 0.5 (pointwise, so resolution-agnostic)."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


def _volume():
    x = torch.zeros(1, 1, 48, 40, 12)
    x[:, :, 20:30, 10:18, 4:8] = 1.0  # a bright box
    return x


def test_cascade_roi_and_equality_with_single_pass():
    x = _volume()
    model = Threshold()
    out, stats = cascade_inference(x, model, factor=4, margin=(4, 4, 1), window=(16, 16, 8), overlap=0.25)
    single = sliding_window_inference(x, model, window=(16, 16, 8), overlap=0.25)
    assert out.shape == single.shape == (1, 2, 48, 40, 12)
    (h0, h1), (w0, w1), (d0, d1) = stats.roi
    # the ROI contains the box: coarse voxels only half inside it may be missed by pass 1, which
    # is what a margin of at least the downsampling factor is for
    assert h0 <= 20 and h1 >= 30 and w0 <= 10 and w1 >= 18 and d0 <= 3 and d1 >= 9
    assert 0 < stats.pass2_fraction < 0.35
    assert stats.pass2_fraction == pytest.approx((h1 - h0) * (w1 - w0) * (d1 - d0) / (48 * 40 * 12))
    # inside the ROI the result is the full-resolution one
    torch.testing.assert_close(out[..., h0:h1, w0:w1, d0:d1], single[..., h0:h1, w0:w1, d0:d1])
    # and the segmentation equals the single-pass one everywhere (background outside the ROI)
    assert torch.equal(out.argmax(1), single.argmax(1))
    assert stats.time_pass1 > 0 and stats.time_pass2 > 0 and stats.coarse_shape == (12, 10, 12)


def test_cascade_empty_first_pass():
    x = torch.zeros(1, 1, 16, 16, 8)
    out, stats = cascade_inference(x, Threshold(), factor=2)
    assert stats.roi is None and stats.pass2_fraction == 0.0 and stats.time_pass2 == 0.0
    assert out.shape == (1, 2, 16, 16, 8) and (out.argmax(1) == 0).all()
    out, stats = cascade_inference(x, Threshold(), factor=2, empty="full")
    assert stats.roi == ((0, 16), (0, 16), (0, 8)) and stats.pass2_fraction == 1.0


def test_cascade_bad_arguments():
    with pytest.raises(ValueError, match="factor"):
        cascade_inference(_volume(), Threshold(), factor=0)
    with pytest.raises(ValueError, match="margin"):
        cascade_inference(_volume(), Threshold(), margin=(1, 1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        cascade_inference(_volume()[0], Threshold())
