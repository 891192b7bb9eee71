"""Triton kernels and their launchers (installed as ``ahnet_fast.kernels``).

Launchers (see notes/OPS_CONTRACT.md for the full contract):

* ``conv.conv3d_fused``          implicit-GEMM 3D conv with BN/ReLU prologue and a fused epilogue
* ``zpool.zmaxpool_forward`` / ``zpool.zmaxpool_backward``   (1,1,2) z max-pool, no index tensor
* ``batchnorm.channel_stats`` / ``bn_act_apply`` / ``bn_act_backward``

Importing this package imports neither triton nor torch.cuda: the submodules (which import
triton) load on first attribute access, so a machine without triton can still import it.
Under TRITON_INTERPRET=1 (set before triton is imported) every launcher also accepts CPU tensors.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "conv3d_fused": "conv",
    "zmaxpool_forward": "zpool",
    "zmaxpool_backward": "zpool",
    "channel_stats": "batchnorm",
    "bn_act_apply": "batchnorm",
    "bn_act_backward": "batchnorm",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in ("conv", "zpool", "batchnorm", "_common"):
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
