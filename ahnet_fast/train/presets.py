"""Named training configurations for `ahnet-fast train --preset` and the demo.

A preset sets :class:`~ahnet_fast.train.recipe.RecipeConfig` fields (model size, patches, batches,
steps, workers, precision); options given on the command line win over it. Without ``--preset``
the device decides (:func:`default_preset`): a CPU gets ``cpu-small``, never the paper's GPU
schedule (4000 + 4000 + 8000 steps of a ResNet50 AH-Net: days on a CPU).

* ``cpu-small``: AH-Net with one residual block per layer, one PSP branch, trilinear upsampling,
  64 x 64 x 32 patches, the plain FCN for the 2D stage, 60 / 40 / 500 steps, class-balanced
  sampling, cosine learning rate, patches drawn in the main process (``workers 0``: a worker
  process would take a core from torch's threads). About ten minutes on two cores.
* ``gpu-paper``: the paper's settings (ResNet50 encoder, MC-FCN, 224 x 224 2D and
  192 x 192 x 32 3D patches, 4000 / 4000 / 8000 steps, fp32), fast AH-Net, 4 workers.
* ``gpu-12gb``: the paper's model and schedule in bf16, with the memory chooser fitting
  patch, batch and activation checkpointing of each stage into 11 GiB (a 12 GB card).
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["PRESETS", "PRESET_SUMMARY", "default_preset", "preset_values", "describe_default"]

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {
        "model_config": {"layers": (1, 1, 1, 1), "psp_block_num": 1, "upsample_mode": "trilinear"},
        "model_2d": "fcn",
        "patch_2d": (64, 64), "batch_2d": 8, "steps_2d": 60,
        "patch_3d": (64, 64, 32), "batch_3d": 2, "steps_decoder": 40, "steps_finetune": 500,
        "steps_per_epoch": 50, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "cosine",
        "class_balanced": True, "num_workers": 0, "plateau_patience": 2, "amp": "none",
    },
    "gpu-paper": {
        "model_config": {"layers": (3, 4, 6, 3), "psp_block_num": 4, "upsample_mode": "transpose"},
        "model_2d": "mcfcn",
        "patch_2d": (224, 224), "batch_2d": 8, "steps_2d": 4000,
        "patch_3d": (192, 192, 32), "batch_3d": 2, "steps_decoder": 4000, "steps_finetune": 8000,
        "steps_per_epoch": 200, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "constant",
        "num_workers": 4, "amp": "none",
    },
    "gpu-12gb": {
        "model_config": {"layers": (3, 4, 6, 3), "psp_block_num": 4, "upsample_mode": "transpose"},
        "model_2d": "mcfcn",
        "patch_2d": (224, 224), "batch_2d": 8, "steps_2d": 4000,
        "patch_3d": (192, 192, 32), "batch_3d": 2, "steps_decoder": 4000, "steps_finetune": 8000,
        "steps_per_epoch": 200, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "constant",
        "num_workers": 4, "amp": "bf16", "max_memory": 11.0,
    },
}

#: one line per preset for --help
PRESET_SUMMARY = {
    "cpu-small": "AH-Net 1,1,1,1 / 64x64x32 patches / 60+40+500 steps / 0 workers (default on a CPU)",
    "gpu-paper": "the paper's ResNet50 AH-Net, 192x192x32 patches, 4000+4000+8000 steps, fp32 (default on a GPU)",
    "gpu-12gb": "gpu-paper in bf16, patch/batch/checkpointing fitted into 11 GiB",
}


def default_preset(device: str | torch.device | None) -> str:
    """``gpu-paper`` when training runs on CUDA (``device`` None: CUDA if available), else ``cpu-small``."""
    if device is None:
        cuda = torch.cuda.is_available()
    else:
        cuda = torch.device(device).type == "cuda"
    return "gpu-paper" if cuda else "cpu-small"


def preset_values(name: str) -> dict[str, Any]:
    """A copy of the preset's RecipeConfig fields; ``ValueError`` naming the accepted presets."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name}: unknown preset; accepted: {', '.join(PRESETS)}")
    out = dict(PRESETS[name])
    out["model_config"] = dict(out["model_config"])
    return out


def describe_default(field: str, fmt: Any = None) -> str:
    """``"cpu-small: 60, gpu-paper: 4000, gpu-12gb: 4000"``: a field's value under every preset (help texts)."""
    def show(v: Any) -> str:
        if fmt is not None:
            return fmt(v)
        if isinstance(v, tuple):
            return ",".join(str(x) for x in v)
        return str(v)

    return ", ".join(f"{n}: {show(p[field])}" for n, p in PRESETS.items() if field in p)
