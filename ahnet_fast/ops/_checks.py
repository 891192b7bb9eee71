"""Argument validation shared by the public op functions: clear errors, whatever the backend."""
from __future__ import annotations

from typing import Optional

import torch

from ._util import FLOAT_DTYPES, ZPOOL_MODES, triple

Tensor = torch.Tensor


def tensor5(name: str, t: Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(f"{name} must be 5-D (N, C, H, W, D), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: float32, float16, bfloat16 (float64 for checks)")


def same(name: str, t: Optional[Tensor], x: Tensor, *, dtype: bool = True) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if dtype and t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input dtype {x.dtype}")


def channel_vec(name: str, t: Optional[Tensor], c: int, x: Tensor) -> None:
    if t is None:
        return
    same(name, t, x, dtype=False)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")


def bn_args(c: int, x: Tensor, bn_weight, bn_bias, running_mean, running_var, training: bool,
            momentum: float, eps: float) -> None:
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        channel_vec(name, t, c, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False uses the running statistics, but running_mean/running_var are None "
                         "(pass training=True to normalise with batch statistics)")
    if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if not isinstance(eps, (int, float)) or float(eps) < 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def batch_count(shape, training: bool) -> int:
    """Values per channel of the BN input; training needs more than one (as F.batch_norm)."""
    n = 1
    for i, s in enumerate(shape):
        if i != 1:
            n *= int(s)
    if training and n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")
    return n


def conv_args(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], stride, padding) -> list[int]:
    """Validate a groups=1, dilation=1 Conv3d call; return the conv output shape."""
    tensor5("weight", weight)
    same("weight", weight, x)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels (groups=1) but the input has "
                         f"{x.shape[1]}: weight {tuple(weight.shape)}, input {tuple(x.shape)}")
    if conv_bias is not None:
        same("conv_bias", conv_bias, x)
        if tuple(conv_bias.shape) != (weight.shape[0],):
            raise ValueError(f"conv_bias must have shape ({weight.shape[0]},), got {tuple(conv_bias.shape)}")
    if any(s < 1 for s in stride) or any(p < 0 for p in padding):
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    out = [x.shape[0], weight.shape[0]]
    for i in range(3):
        size = (x.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i]) // stride[i] + 1
        if size < 1:
            raise ValueError(f"conv output would be empty along axis {'HWD'[i]}: input {tuple(x.shape)}, "
                             f"kernel {tuple(weight.shape[2:])}, stride {stride}, padding {padding}")
        out.append(size)
    return out


def any_requires_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def conv_bn_act_args(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], bn_weight, bn_bias,
                     running_mean, running_var, residual: Optional[Tensor], stride, padding, zpool: str,
                     training: bool, momentum: float, eps: float):
    """Validate a conv -> [pool] -> BN -> [pool] -> [+res] -> [ReLU] call (plain or synchronised).

    Returns (stride, padding, conv output shape, BN input shape, output shape) as lists.
    """
    tensor5("x", x)
    stride_, padding_ = triple(stride, "stride"), triple(padding, "padding")
    c_shape = conv_args(x, weight, conv_bias, stride_, padding_)
    if zpool not in ZPOOL_MODES:
        raise ValueError(f"zpool={zpool!r}; accepted: {', '.join(ZPOOL_MODES)}")
    if zpool != "none" and c_shape[-1] < 2:
        raise ValueError(f"zpool={zpool!r} needs a conv output depth >= 2, got {c_shape}")
    bn_args(weight.shape[0], x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    bn_shape = list(c_shape)
    if zpool == "before_bn":
        bn_shape[-1] //= 2
    out_shape = list(c_shape)
    if zpool != "none":
        out_shape[-1] //= 2
    if residual is not None:
        same("residual", residual, x)
        if list(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output shape {out_shape}, got {list(residual.shape)}")
    return stride_, padding_, c_shape, bn_shape, out_shape
