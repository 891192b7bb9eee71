"""Fused anisotropic ops (tensors (N, C, H, W, D), D = slice axis), registered with torch.library.

Public API::

    conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, ...)   # encoder
    bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, *, ...)   # decoder
    activated_conv(x, weight, *, out, ...)        # inference: conv of an already activated input
    zmaxpool(x)                                                                     # (1,1,2) max-pool
    use_backend(name) / get_backend() / backend_status()
    sync_conv_bn_act / sync_bn_act_conv / sync_batch_norm   # BatchNorm over every rank's batch


Backends: reference (torch; always), triton (ahnet_fast.kernels), cuda (ahnet_fast._cuda);
choose with AHNET_FAST_BACKEND=auto|reference|triton|cuda or ``with use_backend(name):``.
The torch.library ops live in the ``ahnet_fast`` namespace (torch.ops.ahnet_fast.*).
"""
from __future__ import annotations

from ._backend import BACKENDS, BackendUnavailableError, backend_status, get_backend, use_backend
from .bn_act_conv import activated_conv, bn_act_conv
from .conv_bn_act import conv_bn_act
from .sync_bn import sync_active, sync_batch_norm, sync_bn_act_conv, sync_conv_bn_act
from .zmaxpool import zmaxpool

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "activated_conv",
    "backend_status",
    "bn_act_conv",
    "conv_bn_act",
    "get_backend",
    "sync_active",
    "sync_batch_norm",
    "sync_bn_act_conv",
    "sync_conv_bn_act",
    "use_backend",
    "zmaxpool",
]
