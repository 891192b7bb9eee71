"""ahnet_fast: fast, memory-lean anisotropic 3D convolution networks.

Layers, bottom floor first (nothing imports a floor above its own)::

    ahnet_fast.kernels   Triton kernels and launchers (source folder: kernels/)
    csrc/                CUDA C++ kernels, loaded through ahnet_fast._cuda
    ahnet_fast.ops       one contract per fused op; backend policy; autograd
    ahnet_fast.nn        modules over the ops (Conv3d/BatchNorm3d state_dict keys)
    ahnet_fast.models    AH-Net, FCN, MCFCN (one topology, reference and fused block sets)
    ahnet_fast.transfer / losses / data
    ahnet_fast.train / infer
    ahnet_fast.cli, bench/

Importing this package never touches CUDA and never compiles anything; heavy
submodules are imported on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, see __getattr__)
_LAZY = {
    "use_backend": "ahnet_fast.ops",
    "get_backend": "ahnet_fast.ops",
    "AHNet": "ahnet_fast.models.fast",
    "FastAHNet": "ahnet_fast.models.fast",
    "FCN": "ahnet_fast.reference",
    "MCFCN": "ahnet_fast.reference",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ahnet_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
