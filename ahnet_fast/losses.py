"""Focal losses: cross-entropy forms (Lin et al. 2017) and AH-Net's L2 form for heatmaps.

Cross-entropy forms (``p_t`` is the predicted probability of the true class):

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t)

* :func:`softmax_focal_loss` / ``FocalLoss(mode="softmax")``: logits
  ``(B, K, *spatial)``, integer targets ``(B, *spatial)`` in ``[0, K)`` or
  ``ignore_index``. ``weight`` has ``F.cross_entropy``'s meaning (per-class, and
  ``"mean"`` divides by the summed weight of the counted voxels); ``alpha`` is
  Lin's balancing factor (a scalar, or one per class) and does not enter the
  normaliser. With ``gamma=0`` and ``alpha=None`` the result equals
  ``F.cross_entropy(logits, target, weight, ignore_index=...)``.
* :func:`sigmoid_focal_loss` / ``FocalLoss(mode="sigmoid")``: logits of any shape,
  targets of the same shape in ``[0, 1]`` (soft targets allowed: the modulating
  factor is ``|t - sigmoid(x)|^gamma``, which is ``1 - p_t`` for hard targets);
  ``alpha`` weighs positives by ``alpha`` and negatives by ``1 - alpha`` (scalar,
  or per channel along dim 1). With ``gamma=0``, ``alpha=None`` it equals
  ``F.binary_cross_entropy_with_logits(logits, target, weight)`` (over the voxels
  whose target is not ``ignore_index``).

Both are computed from ``log_softmax`` / ``logsigmoid`` (no ``log(0)``), in float32
at least (fp16/bf16 logits are upcast; the loss is returned in float32), and the
modulating factor's base is clamped away from 0 so that ``gamma < 1`` never gives
an infinite gradient.

L2 focal form (AH-Net, DBT lesion detection, heatmap regression). The paper
writes, for the per-voxel squared error ``D = (pred - target)^2`` and the
largest error ``D_max``::

    F = (ln D / ln D_max)^gamma * D

Taken literally with heatmaps in [0, 1] (so ``D <= D_max <= 1`` and both logs are
negative), the factor is >= 1 and grows as ``D`` shrinks: it would weight the
*easy* voxels more than plain L2 does, the opposite of a focal loss, and it is
undefined at ``D = 0`` and for ``D_max = 1``. Our reading, the default
``form="log1p"``, keeps the paper's shape (a log-ratio to the largest error,
raised to gamma, times ``D``) with the logs taken of ``1 + D``::

    F = (ln(1 + D) / ln(1 + D_max))^gamma * D

The factor lies in [0, 1], equals 1 for the hardest voxel and tends to 0 like
``(D / ln(1 + D_max))^gamma`` for well-predicted ones, exactly as ``(1 - p_t)^gamma``
does in the CE focal loss; ``gamma = 0`` is plain L2 (``F.mse_loss``) exactly.
``D_max`` is the largest ``D`` of each sample (gradient stopped: it is a
normaliser) unless a fixed ``d_max`` is given (e.g. 1.0 for heatmaps in [0, 1],
which makes the loss a fixed per-voxel function). ``form="paper"`` computes the
literal formula, with ``D`` and ``D_max`` clamped into ``[eps, 1 - eps]``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "soft_dice_loss",
    "dice_ce_loss",
    "softmax_focal_loss",
    "sigmoid_focal_loss",
    "l2_focal_loss",
    "FocalLoss",
    "L2FocalLoss",
]

Alpha = Union[float, Sequence[float], torch.Tensor, None]
_REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------- helpers
def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not gamma >= 0.0 or gamma == float("inf"):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return gamma


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # half-precision logits are upcast: log-probabilities near 0 and pow() lose too much in 16 bits
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _modulate(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """``base ** gamma`` with base in [0, 1]; clamped away from 0 so gamma < 1 has a finite gradient."""
    if gamma == 1.0:
        return base
    if gamma == 2.0:
        return base * base
    return base.clamp_min(torch.finfo(base.dtype).tiny).pow(gamma)


def _reduce(loss: torch.Tensor, reduction: str, denom: torch.Tensor | None = None) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if denom is None:
        return loss.mean() if loss.numel() else loss.sum()
    # every voxel ignored: 0 (with a graph), where torch's cross_entropy would give nan
    return loss.sum() / denom.clamp_min(torch.finfo(loss.dtype).tiny)


def _class_vector(value, k: int, name: str, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.dim() == 0:
        return v.expand(k)
    if v.dim() != 1 or v.numel() != k:
        raise ValueError(f"{name} must be a scalar or have one entry per class ({k}); got shape {tuple(v.shape)}")
    return v


# --------------------------------------------------------------------------- CE forms
def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Alpha = None,
    weight: torch.Tensor | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    check_targets: bool = True,
) -> torch.Tensor:
    """Multi-class focal loss on softmax probabilities.

    Args:
        logits: ``(B, K, *spatial)`` raw scores, K >= 1 classes along dim 1.
        target: ``(B, *spatial)`` integer class indices in ``[0, K)`` or ``ignore_index``.
        gamma: focusing parameter >= 0 (0 gives cross-entropy).
        alpha: balancing factor multiplying each voxel's loss: a scalar, or ``K``
            values (one per class, picked by the target class). Not part of the
            ``"mean"`` normaliser.
        weight: ``K`` class weights with ``F.cross_entropy``'s semantics: they
            multiply the loss and ``"mean"`` divides by their sum over the counted voxels.
        ignore_index: target value whose voxels contribute nothing (and are not counted).
        reduction: ``"none"`` (shape of ``target``, 0 at ignored voxels),
            ``"mean"`` or ``"sum"``. A mean over no counted voxel is 0.
        check_targets: validate target values (one device sync on a GPU).

    Returns:
        The loss, in float32 for fp16/bf16 logits, else in the logits' dtype.
    """
    _check_reduction(reduction)
    gamma = _check_gamma(gamma)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError("logits must be a floating-point tensor (B, K, *spatial)")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"softmax focal loss needs integer class-index targets (B, *spatial); got "
            f"{getattr(target, 'dtype', type(target).__name__)} (use mode='sigmoid' for float targets)"
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            f"expected {expected} (logits without the class dim 1)"
        )
    k = logits.shape[1]
    target = target.long()
    valid = target != ignore_index
    if check_targets and target.numel():
        bad = valid & ((target < 0) | (target >= k))
        if bool(bad.any()):
            vals = torch.unique(target[bad])[:5].tolist()
            raise ValueError(f"target holds values {vals} outside [0, {k}) (ignore_index={ignore_index})")

    x = logits.to(_compute_dtype(logits))
    safe_t = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    logp_t = x.log_softmax(dim=1).gather(1, safe_t).squeeze(1)
    loss = -logp_t
    if gamma != 0.0:
        # 1 - p_t computed as -expm1(log p_t): accurate when p_t is close to 1
        loss = _modulate((-torch.expm1(logp_t)).clamp(0.0, 1.0), gamma) * loss
    denom = None
    if weight is not None:
        w = _class_vector(weight, k, "weight", x)[safe_t.squeeze(1)]
        loss = loss * w
        denom = (w * valid).sum()
    if alpha is not None:
        loss = loss * _class_vector(alpha, k, "alpha", x)[safe_t.squeeze(1)]
    loss = loss * valid  # exact zeros at ignored voxels (their gathered class is a dummy 0)
    if reduction == "mean" and denom is None:
        denom = valid.sum().to(x.dtype)
    return _reduce(loss, reduction, denom)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Alpha = None,
    weight: torch.Tensor | None = None,
    ignore_index: float | None = None,
    reduction: str = "mean",
    check_targets: bool = True,
) -> torch.Tensor:
    """Binary / multi-label focal loss on sigmoid probabilities.

    Args:
        logits: any shape ``(B, *)``.
        target: same shape, values in ``[0, 1]`` (soft targets allowed) or ``ignore_index``.
        gamma: focusing parameter >= 0 (0 gives BCE-with-logits).
        alpha: positives weighted by ``alpha``, negatives by ``1 - alpha`` (for soft
            targets ``alpha * t + (1 - alpha) * (1 - t)``); a scalar in [0, 1], or one
            value per channel (dim 1) for multi-label logits ``(B, K, ...)``.
        weight: elementwise rescaling broadcastable to ``logits`` (as in
            ``F.binary_cross_entropy_with_logits``); ``"mean"`` is a plain mean.
        ignore_index: a target value (e.g. -1 or 255) whose voxels contribute nothing
            and are not counted by ``"mean"``; None ignores nothing.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        check_targets: validate that targets lie in [0, 1] (one device sync on a GPU).

    Returns:
        The loss, in float32 for fp16/bf16 logits, else in the logits' dtype.
    """
    _check_reduction(reduction)
    gamma = _check_gamma(gamma)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor")
    if not isinstance(target, torch.Tensor) or target.shape != logits.shape:
        raise ValueError(
            f"sigmoid focal loss needs a target of the logits' shape {tuple(logits.shape)}, got "
            f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}"
        )
    x = logits.to(_compute_dtype(logits))
    t = target.to(x.dtype)
    valid = None if ignore_index is None else target != ignore_index
    if valid is not None:
        t = torch.where(valid, t, torch.zeros_like(t))
    if check_targets and t.numel() and bool(((t < 0) | (t > 1) | t.isnan()).any()):
        raise ValueError(
            "sigmoid focal loss targets must lie in [0, 1]"
            + ("" if ignore_index is None else f" or equal ignore_index={ignore_index}")
        )
    loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma != 0.0:
        loss = _modulate((t - torch.sigmoid(x)).abs(), gamma) * loss
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        if a.dim() == 1 and x.dim() >= 2 and a.numel() == x.shape[1]:
            a = a.view(1, -1, *([1] * (x.dim() - 2)))
        elif a.dim() != 0:
            raise ValueError(f"alpha must be a scalar or have one value per channel (dim 1); got shape {tuple(a.shape)}")
        if bool(((a < 0) | (a > 1)).any()):
            raise ValueError(f"sigmoid focal alpha must lie in [0, 1], got {a.flatten().tolist()}")
        loss = (a * t + (1 - a) * (1 - t)) * loss
    if weight is not None:
        loss = loss * torch.as_tensor(weight, dtype=x.dtype, device=x.device)
    denom = None
    if valid is not None:
        loss = loss * valid
        denom = valid.sum().to(x.dtype)
    return _reduce(loss, reduction, denom)


class FocalLoss(nn.Module):
    """Focal loss module (``mode="softmax"`` or ``"sigmoid"``); arguments as in the functions.

    ``forward(logits, target)``: see :func:`softmax_focal_loss` (logits
    ``(B, K, *spatial)``, integer target ``(B, *spatial)``) and
    :func:`sigmoid_focal_loss` (target of the logits' shape). ``weight`` and a
    per-class ``alpha`` are stored as buffers so they follow ``.to(device)``.
    """

    def __init__(
        self,
        mode: str = "softmax",
        gamma: float = 2.0,
        alpha: Alpha = None,
        weight: torch.Tensor | Sequence[float] | None = None,
        ignore_index: int | None = None,
        reduction: str = "mean",
        check_targets: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("softmax", "sigmoid"):
            raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
        _check_reduction(reduction)
        self.mode = mode
        self.gamma = _check_gamma(gamma)
        self.ignore_index = (-100 if mode == "softmax" else None) if ignore_index is None else ignore_index
        self.reduction = reduction
        self.check_targets = check_targets
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = softmax_focal_loss if self.mode == "softmax" else sigmoid_focal_loss
        return fn(
            logits,
            target,
            gamma=self.gamma,
            alpha=self.alpha,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            check_targets=self.check_targets,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------- L2 form
def l2_focal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    d_max: float | None = None,
    form: str = "log1p",
    eps: float = 1e-6,
) -> torch.Tensor:
    """AH-Net's focal loss for heatmap regression (see the module docstring for the reading).

    Args:
        pred: ``(B, *)`` predicted heatmap (e.g. ``(B, 1, H, W, D)``).
        target: same shape, the target heatmap (e.g. from
            :func:`ahnet_fast.infer.detection.gaussian_heatmap`).
        gamma: focusing parameter >= 0; 0 gives ``F.mse_loss`` exactly.
        reduction: ``"none"`` (elementwise), ``"mean"`` or ``"sum"``.
        weight: optional elementwise factor broadcastable to ``pred``
            (``"mean"`` stays a plain mean over elements).
        d_max: the normalising largest error; None uses each sample's largest
            ``D`` (over all non-batch dims, gradient stopped).
        form: ``"log1p"`` (default, ``(ln(1+D)/ln(1+D_max))^gamma * D``) or
            ``"paper"`` (``(ln D/ln D_max)^gamma * D`` with ``D, D_max`` clamped into
            ``[eps, 1 - eps]``; meant for values in [0, 1]).
        eps: clamp for ``form="paper"``.

    Returns:
        The loss in float32 for half-precision inputs, else in the inputs' dtype.
    """
    _check_reduction(reduction)
    gamma = _check_gamma(gamma)
    if form not in ("log1p", "paper"):
        raise ValueError(f"form must be 'log1p' or 'paper', got {form!r}")
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor) or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must be tensors of the same shape, got "
            f"{tuple(getattr(pred, 'shape', ()))} and {tuple(getattr(target, 'shape', ()))}"
        )
    if not pred.is_floating_point() or pred.dim() < 1:
        raise ValueError("pred must be a floating-point tensor (B, *)")
    if d_max is not None and not (float(d_max) > 0 and float(d_max) != float("inf")):
        raise ValueError(f"d_max must be a finite number > 0, got {d_max!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    dtype = _compute_dtype(pred)
    p, t = pred.to(dtype), target.to(dtype)
    d = (p - t) * (p - t)
    loss = d
    if gamma != 0.0:
        if d_max is None:
            dm = d.detach().flatten(1).amax(dim=1) if d.dim() > 1 else d.detach().amax().reshape(1)
            dm = dm.view(-1, *([1] * (d.dim() - 1))) if d.dim() > 1 else dm
        else:
            dm = torch.tensor(float(d_max), dtype=dtype, device=d.device)
        if form == "log1p":
            # a sample with D_max == 0 is perfect: its factor is irrelevant (D == 0), keep it finite
            ratio = torch.log1p(d) / torch.log1p(dm).clamp_min(torch.finfo(dtype).tiny)
            factor = _modulate(ratio.clamp(0.0, 1.0) if d_max is None else ratio.clamp_min(0.0), gamma)
        else:
            lo, hi = eps, 1.0 - eps
            ratio = torch.log(d.clamp(lo, hi)) / torch.log(dm.clamp(lo, hi))
            factor = ratio.pow(gamma)
        loss = factor * d
    if weight is not None:
        loss = loss * torch.as_tensor(weight, dtype=dtype, device=loss.device)
    return _reduce(loss, reduction)


class L2FocalLoss(nn.Module):
    """Module form of :func:`l2_focal_loss`; ``forward(pred, target)``."""

    def __init__(
        self,
        gamma: float = 2.0,
        reduction: str = "mean",
        d_max: float | None = None,
        form: str = "log1p",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        if form not in ("log1p", "paper"):
            raise ValueError(f"form must be 'log1p' or 'paper', got {form!r}")
        self.gamma = _check_gamma(gamma)
        self.reduction, self.d_max, self.form, self.eps = reduction, d_max, form, eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return l2_focal_loss(
            pred, target, self.gamma, self.reduction, weight=weight, d_max=self.d_max, form=self.form, eps=self.eps
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, form={self.form!r}, d_max={self.d_max}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------- Dice
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss of softmax probabilities, per sample and class, averaged (background included).

    ``logits (B, K, *spatial)``, integer ``target (B, *spatial)`` in ``[0, K)``:
    ``1 - mean_{b,k} (2 sum p t + smooth) / (sum p + sum t + smooth)``, computed in fp32. A class
    absent from a sample and not predicted scores 1 (loss 0) through ``smooth``. The formula of
    MONAI's ``DiceLoss(softmax=True, to_onehot_y=True)`` with its default smoothing.
    """
    if logits.dim() < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"soft_dice_loss: logits (B, K, *spatial) and target (B, *spatial) expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    t = F.one_hot(target.long(), k).movedim(-1, 1).to(p.dtype)
    dims = tuple(range(2, logits.dim()))
    inter = (p * t).sum(dims)
    den = p.sum(dims) + t.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (den + smooth)).mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus :func:`soft_dice_loss` (equal weights): the Dice term pulls small classes
    (thin structures a few voxels wide) that cross-entropy, dominated by the large ones, neglects."""
    return F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target)
