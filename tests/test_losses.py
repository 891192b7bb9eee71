"""Focal losses: equal to CE / BCE / MSE at gamma=0, the focal formulas, stability, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.losses import (FocalLoss, L2FocalLoss, dice_ce_loss, l2_focal_loss, sigmoid_focal_loss, soft_dice_loss,
                               softmax_focal_loss)

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _seg_case(k=4, ignore=-100, shape=(2, 5, 3, 2)):
    logits = torch.randn(shape[0], k, *shape[1:], dtype=torch.float64) * 3
    target = torch.randint(0, k, shape)
    target[torch.rand(shape) < 0.2] = ignore
    return logits, target


# --------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore", [-100, 255])
@pytest.mark.parametrize("use_weight", [False, True])
def test_softmax_gamma0_equals_cross_entropy(reduction, ignore, use_weight):
    logits, target = _seg_case(ignore=ignore)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64) if use_weight else None
    ours = softmax_focal_loss(logits, target, gamma=0.0, weight=weight, ignore_index=ignore, reduction=reduction)
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction=reduction)
    torch.testing.assert_close(ours, ref, **TIGHT)


def test_softmax_gamma0_alpha_is_a_per_voxel_factor():
    logits, target = _seg_case()
    alpha = [0.25, 1.0, 2.0, 0.5]
    ce = F.cross_entropy(logits, target, reduction="none")
    a_t = torch.tensor(alpha, dtype=torch.float64)[target.clamp_min(0)] * (target != -100)
    ours = softmax_focal_loss(logits, target, gamma=0.0, alpha=alpha, reduction="none")
    torch.testing.assert_close(ours, ce * a_t, **TIGHT)
    # mean: normalised by the number of counted voxels, not by the alphas
    mean = softmax_focal_loss(logits, target, gamma=0.0, alpha=0.25)
    torch.testing.assert_close(mean, 0.25 * F.cross_entropy(logits, target), **TIGHT)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_softmax_focal_matches_textbook_formula(gamma):
    logits, target = _seg_case(k=3)
    valid = target != -100
    p = logits.softmax(1).gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    ref = -((1 - p) ** gamma) * torch.log(p) * valid
    ours = softmax_focal_loss(logits, target, gamma=gamma, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        softmax_focal_loss(logits, target, gamma=gamma), ref.sum() / valid.sum(), rtol=1e-10, atol=1e-12
    )


def test_softmax_focal_downweights_easy_voxels_and_2d_logits():
    # (B, K) logits: one sample easy (p_t = e^4/(e^4+2) ~ 0.965), one hard (p_t = 1/(2+e) ~ 0.21)
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    ce = softmax_focal_loss(logits, target, gamma=0.0, reduction="none")
    fl = softmax_focal_loss(logits, target, gamma=2.0, reduction="none")
    p_t = torch.tensor([math.exp(4) / (math.exp(4) + 2), 1 / (2 + math.e)], dtype=torch.float64)
    torch.testing.assert_close(fl / ce, (1 - p_t) ** 2)
    assert (fl / ce)[0] < 2e-3 and (fl / ce)[1] > 0.6


def test_softmax_stable_for_extreme_logits_and_gamma_below_one():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [30.0, -30.0]], dtype=torch.float32, requires_grad=True)
    target = torch.tensor([0, 0, 0])  # confident right, confident wrong, p_t == 1 in float32
    for gamma in (0.0, 0.5, 2.0):
        loss = softmax_focal_loss(logits, target, gamma=gamma, reduction="sum")
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), gamma
    # the confidently wrong voxel costs ~2e4, not inf
    per = softmax_focal_loss(logits.detach(), target, gamma=2.0, reduction="none")
    torch.testing.assert_close(per[1], torch.tensor(2e4), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    logits, target = _seg_case()
    ours = softmax_focal_loss(logits.to(dtype), target, gamma=2.0)
    ref = softmax_focal_loss(logits.to(dtype).double(), target, gamma=2.0)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_softmax_gradcheck_and_all_ignored():
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1], [2, -100]]])
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: softmax_focal_loss(x, target, gamma=1.5, alpha=[0.3, 0.5, 0.2], weight=w), (logits,)
    )
    none = torch.full_like(target, -100)
    out = softmax_focal_loss(logits, none)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_softmax_bad_input():
    logits, target = _seg_case()
    with pytest.raises(ValueError, match="integer class-index targets"):
        softmax_focal_loss(logits, target.double())
    with pytest.raises(ValueError, match=r"expected \(2, 5, 3, 2\)"):
        softmax_focal_loss(logits, target[:, :4])
    bad = target.clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"values \[7\] outside \[0, 4\)"):
        softmax_focal_loss(logits, bad)
    with pytest.raises(ValueError, match="reduction"):
        softmax_focal_loss(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        softmax_focal_loss(logits, target, gamma=-1)
    with pytest.raises(ValueError, match=r"one entry per class \(4\)"):
        softmax_focal_loss(logits, target, alpha=[0.1, 0.2])


# --------------------------------------------------------------------------- sigmoid
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_gamma0_equals_bce_with_logits(reduction):
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 4
    target = (torch.rand(2, 3, 4, 5) > 0.7).double()
    weight = torch.rand(1, 3, 1, 1, dtype=torch.float64) + 0.5
    for w in (None, weight):
        ours = sigmoid_focal_loss(logits, target, gamma=0.0, weight=w, reduction=reduction)
        ref = F.binary_cross_entropy_with_logits(logits, target, weight=w, reduction=reduction)
        torch.testing.assert_close(ours, ref, **TIGHT)
    soft = torch.rand(2, 3, 4, 5, dtype=torch.float64)  # soft targets too
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, soft, gamma=0.0, reduction=reduction),
        F.binary_cross_entropy_with_logits(logits, soft, reduction=reduction),
        **TIGHT,
    )


def test_sigmoid_ignore_index_equals_bce_on_kept_voxels():
    logits = torch.randn(3, 50, dtype=torch.float64)
    target = (torch.rand(3, 50) > 0.5).double()
    target[:, :7] = -1
    keep = target != -1
    ours = sigmoid_focal_loss(logits, target, gamma=0.0, ignore_index=-1)
    torch.testing.assert_close(ours, F.binary_cross_entropy_with_logits(logits[keep], target[keep]), **TIGHT)
    none = sigmoid_focal_loss(logits, target, gamma=2.0, ignore_index=-1, reduction="none")
    assert torch.equal(none[~keep], torch.zeros_like(none[~keep]))


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.5, None), (1.0, [0.25, 0.75])])
def test_sigmoid_focal_matches_textbook_formula(gamma, alpha):
    logits = torch.randn(2, 2, 6, dtype=torch.float64) * 3
    target = (torch.rand(2, 2, 6) > 0.6).double()
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    ref = -((1 - p_t) ** gamma) * torch.log(p_t)
    if alpha is not None:
        a = torch.tensor(alpha, dtype=torch.float64).view(-1, 1) if isinstance(alpha, list) else alpha
        ref = ref * (a * target + (1 - a) * (1 - target))
    ours = sigmoid_focal_loss(logits, target, gamma=gamma, alpha=alpha, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_sigmoid_stable_and_bad_input():
    logits = torch.tensor([200.0, -200.0, 0.0], requires_grad=True)
    target = torch.tensor([0.0, 1.0, 1.0])
    loss = sigmoid_focal_loss(logits, target, gamma=0.5, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, torch.tensor(400.0 + math.log(2) * 0.5**0.5), rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match="same shape|logits' shape"):
        sigmoid_focal_loss(logits, target[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sigmoid_focal_loss(logits.detach(), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="alpha must lie"):
        sigmoid_focal_loss(logits.detach(), target, alpha=1.5)


def test_focal_loss_module_modes_and_device_buffers():
    logits, target = _seg_case(k=3)
    m = FocalLoss("softmax", gamma=0.0, weight=[1.0, 2.0, 3.0])
    assert m.weight.dtype == torch.float32
    m = m.double()
    ref = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(m(logits, target), ref, **TIGHT)
    s = FocalLoss("sigmoid", gamma=2.0, alpha=0.25, reduction="sum")
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    t = (torch.rand(4, 1, 8) > 0.5).double()
    torch.testing.assert_close(s(x, t), sigmoid_focal_loss(x, t, gamma=2.0, alpha=0.25, reduction="sum"), **TIGHT)
    with pytest.raises(ValueError, match="mode"):
        FocalLoss("softmax2")


# --------------------------------------------------------------------------- L2 focal
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_l2_focal_gamma0_is_mse_exactly(reduction):
    pred = torch.rand(2, 1, 6, 5, 4, dtype=torch.float64)
    target = torch.rand(2, 1, 6, 5, 4, dtype=torch.float64)
    for form in ("log1p", "paper"):
        ours = l2_focal_loss(pred, target, gamma=0.0, reduction=reduction, form=form)
        assert torch.equal(ours, F.mse_loss(pred, target, reduction=reduction)), form


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_l2_focal_log1p_formula_and_focusing(gamma):
    pred = torch.rand(2, 1, 5, 5, 3, dtype=torch.float64)
    target = torch.rand(2, 1, 5, 5, 3, dtype=torch.float64)
    d = (pred - target) ** 2
    dmax = d.flatten(1).amax(1).view(2, 1, 1, 1, 1)  # per sample
    ref = (torch.log1p(d) / torch.log1p(dmax)) ** gamma * d
    ours = l2_focal_loss(pred, target, gamma=gamma, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    factor = ours / d
    assert factor.max() <= 1 + 1e-12 and factor.min() >= 0
    # the hardest voxel of each sample keeps its full L2 weight; easy voxels are down-weighted
    for b in range(2):
        i = d[b].argmax()
        torch.testing.assert_close(ours[b].flatten()[i], d[b].flatten()[i])
    small, large = d < 0.1 * dmax, d > 0.9 * dmax
    assert factor[small].max() < factor[large].min()
    fixed = l2_focal_loss(pred, target, gamma=gamma, d_max=1.0, reduction="none")
    torch.testing.assert_close(fixed, (torch.log1p(d) / math.log(2.0)) ** gamma * d, rtol=1e-12, atol=1e-15)


def test_l2_focal_paper_form_is_the_literal_formula():
    pred = torch.rand(1, 200, dtype=torch.float64) * 0.9
    target = torch.rand(1, 200, dtype=torch.float64) * 0.9
    d = (pred - target) ** 2
    ref = (torch.log(d) / torch.log(d.max())) ** 2 * d
    torch.testing.assert_close(l2_focal_loss(pred, target, gamma=2.0, form="paper", reduction="none"), ref)


def test_l2_focal_gradients_finite_with_zero_errors_and_half_inputs():
    pred = torch.zeros(2, 1, 4, 4, 2, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4, 2)
    target[0, 0, 1, 1, 0] = 1.0  # sample 1 is perfect: D_max = 0
    for form in ("log1p", "paper"):
        for gamma in (0.5, 2.0):
            loss = l2_focal_loss(pred, target, gamma=gamma, form=form)
            (g,) = torch.autograd.grad(loss, pred)
            assert torch.isfinite(loss) and torch.isfinite(g).all(), (form, gamma)
            assert torch.equal(g[1], torch.zeros_like(g[1]))
    half = l2_focal_loss(torch.rand(1, 8).half(), torch.rand(1, 8).half(), gamma=2.0)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    mod = L2FocalLoss(gamma=2.0, d_max=1.0)
    x, y = torch.rand(2, 9), torch.rand(2, 9)
    torch.testing.assert_close(mod(x, y, weight=torch.full((2, 9), 2.0)), 2 * l2_focal_loss(x, y, d_max=1.0))


def test_l2_focal_bad_input():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        l2_focal_loss(x, torch.rand(2, 4))
    with pytest.raises(ValueError, match="form"):
        l2_focal_loss(x, x, form="exp")
    with pytest.raises(ValueError, match="d_max"):
        l2_focal_loss(x, x, d_max=0.0)
    with pytest.raises(ValueError, match="gamma"):
        L2FocalLoss(gamma=float("nan"))


@pytest.mark.parametrize("spatial", [(7, 5, 4), (9, 6)])
def test_dice_and_dice_ce_match_monai(spatial):
    """The soft Dice and Dice+CE losses equal MONAI's DiceLoss / DiceCELoss (softmax, one-hot
    targets, background included, default smoothing) in 3D and 2D, a class absent from a sample
    included; gradients flow to the logits."""
    from monai.losses import DiceCELoss, DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, *spatial, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, *spatial))          # class 3 never present
    ours = soft_dice_loss(logits, target)
    ref = DiceLoss(softmax=True, to_onehot_y=True)(logits, target[:, None])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)
    both = dice_ce_loss(logits, target)
    ref2 = DiceCELoss(softmax=True, to_onehot_y=True)(logits, target[:, None])
    torch.testing.assert_close(both.double(), ref2, rtol=1e-6, atol=1e-7)
    both.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # a perfect, confident prediction has a Dice loss near 0
    perfect = F.one_hot(target, 4).movedim(-1, 1).double() * 50.0
    assert soft_dice_loss(perfect, target) < 1e-6
    with pytest.raises(ValueError, match="logits .B, K, .spatial. and target"):
        soft_dice_loss(logits, target[0])


@pytest.mark.gpu
def test_losses_on_cuda_match_cpu():
    logits, target = _seg_case()
    pred, heat = torch.rand(2, 1, 8, 8, 4, dtype=torch.float64), torch.rand(2, 1, 8, 8, 4, dtype=torch.float64)
    dev = torch.device("cuda")
    m = FocalLoss("softmax", gamma=2.0, alpha=[0.25, 0.5, 1.0, 2.0], weight=[1.0, 2.0, 3.0, 4.0]).double()
    torch.testing.assert_close(m.to(dev)(logits.to(dev), target.to(dev)).cpu(), m.cpu()(logits, target), rtol=1e-10, atol=0)
    for form in ("log1p", "paper"):
        torch.testing.assert_close(
            l2_focal_loss(pred.to(dev), heat.to(dev), form=form).cpu(), l2_focal_loss(pred, heat, form=form), rtol=1e-10, atol=0
        )
    bf = softmax_focal_loss(logits.to(dev, torch.bfloat16), target.to(dev))
    assert bf.dtype == torch.float32 and torch.isfinite(bf)
