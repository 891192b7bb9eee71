"""Named training configurations for `ahnet-fast train --preset` and the demo.

A preset sets :class:`~ahnet_fast.train.recipe.RecipeConfig` fields (model size, patches, batches,
steps, workers, precision); options given on the command line win over it. Without ``--preset``
the device decides (:func:`default_preset`): a CPU gets ``cpu-small``, never the paper's GPU
schedule (4000 + 4000 + 8000 steps of a ResNet50 AH-Net: days on a CPU).

* ``cpu-small``: AH-Net with one residual block per layer, one PSP branch, nearest upsampling,
  64 x 64 x 32 patches, the plain FCN for the 2D stage, 60 / 40 / 500 steps, class-balanced
  sampling, cosine learning rate, patches drawn in the main process (``workers 0``: a worker
  process would take a core from torch's threads). The fast AH-Net (its CPU training path is
  faster than the reference's) and ``amp auto``: bf16 autocast where the CPU computes bf16
  natively (AVX512-BF16 or AMX; a training step takes about half the time of fp32 on such a
  CPU), fp32 elsewhere. Cross-entropy + soft Dice instead of the paper's cross-entropy -> focal
  schedule: under a 20-minute budget on the MNI task it lifted the held-out mean foreground Dice
  from 0.797 to 0.837, most on the thin CSF class (0.637 -> 0.713; bench/results/unet_budget.md).
  ``spacing auto``: thick slices (2x the in-plane spacing or more) resampled to half their
  spacing, and the in-plane spacing halved while the largest case stays within 256**3 voxels,
  for training and inference, since AH-Net predicts at half resolution on every axis: its
  prediction then lies on the scan's own grid. Validation every 100 steps (``steps_per_epoch``):
  it runs on the whole, now larger, grid. On the 1 x 1 x 4 mm MNI task, held-out mean foreground
  Dice under a 20-minute budget, two splits: 0.849 / 0.837 on the cases' own grid, 0.891-0.901 /
  0.861-0.874 with thick slices halved, 0.905-0.908 / 0.884-0.889 with in-plane halved too,
  0.911 / 0.882 with the foreground z-score that is now the default intensity normalisation for
  MRI (bench/results/unet_budget.md). ``upsample_mode "nearest"`` (MONAI's option; with it the
  stem's max-pool is 2 x 2 x 2 instead of 3 x 3 x 3 padded): MONAI's trilinear upsampling has
  ``align_corners=True``, whose x2 sampling positions drift by half an input voxel from one side of
  a window to the other, so each upsampled map meets its skip feature misaligned by an amount that
  depends on the position in the patch; nearest upsampling shifts every position alike (which of
  the two changes carries the gain was not separated). Held-out Dice 0.911-0.921 / 0.879-0.894
  (three seeds) instead of 0.906-0.911 / 0.880-0.882 under the same budget; over the seeds as
  good as the small MONAI UNet trained for the same time (0.901 against 0.895 as each is run,
  0.901 against 0.904 both mirrored; bench/results/unet_budget.md).
  `ahnet-fast demo` with it: 5.8 minutes on two cores of an Intel Xeon, held-out Dice 0.884.
* ``gpu-paper``: the paper's settings (ResNet50 encoder, MC-FCN, 224 x 224 2D and
  192 x 192 x 32 3D patches, 4000 / 4000 / 8000 steps, fp32), fast AH-Net, 4 workers.
* ``gpu-12gb``: the paper's model and schedule in bf16, with the memory chooser fitting
  patch, batch and activation checkpointing of each stage into 11 GiB (a 12 GB card).
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["PRESETS", "PRESET_SUMMARY", "default_preset", "preset_values", "describe_default", "native_bf16",
           "resolve_amp", "AMP_CHOICES"]

#: values of ``--amp``; ``auto`` is resolved per device by :func:`resolve_amp`
AMP_CHOICES = ("none", "bf16", "fp16", "auto")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {
        "model_config": {"layers": (1, 1, 1, 1), "psp_block_num": 1, "upsample_mode": "nearest"},
        "model_2d": "fcn",
        "patch_2d": (64, 64), "batch_2d": 8, "steps_2d": 60,
        "patch_3d": (64, 64, 32), "batch_3d": 2, "steps_decoder": 40, "steps_finetune": 500,
        "steps_per_epoch": 100, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "cosine",
        "class_balanced": True, "num_workers": 0, "plateau_patience": 2, "amp": "auto", "fast": True,
        "loss": "dice_ce", "spacing": "auto",
    },
    "gpu-paper": {
        "model_config": {"layers": (3, 4, 6, 3), "psp_block_num": 4, "upsample_mode": "transpose"},
        "model_2d": "mcfcn",
        "patch_2d": (224, 224), "batch_2d": 8, "steps_2d": 4000,
        "patch_3d": (192, 192, 32), "batch_3d": 2, "steps_decoder": 4000, "steps_finetune": 8000,
        "steps_per_epoch": 200, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "constant",
        "num_workers": 4, "amp": "none", "loss": "ce_then_focal", "class_balanced": False,
    },
    "gpu-12gb": {
        "model_config": {"layers": (3, 4, 6, 3), "psp_block_num": 4, "upsample_mode": "transpose"},
        "model_2d": "mcfcn",
        "patch_2d": (224, 224), "batch_2d": 8, "steps_2d": 4000,
        "patch_3d": (192, 192, 32), "batch_3d": 2, "steps_decoder": 4000, "steps_finetune": 8000,
        "steps_per_epoch": 200, "lr_2d": 5e-4, "lr_3d": 1e-3, "lr_schedule": "constant",
        "num_workers": 4, "amp": "bf16", "max_memory": 11.0, "loss": "ce_then_focal", "class_balanced": False,
    },
}

#: one line per preset for --help
PRESET_SUMMARY = {
    "cpu-small": "fast AH-Net 1,1,1,1 / 64x64x32 patches / 60+40+500 steps / Dice+CE / spacing halved (auto) / "
                 "0 workers / bf16 where the CPU has it (default on a CPU)",
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


def _cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's first CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and what says so (for the start-up summary).

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the AMX-BF16 or AVX512-BF16 instructions
    (oneDNN's bf16 convs and matmuls run on them; without them bf16 is emulated and slower than
    fp32).
    """
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "this GPU computes bf16" if ok else "this GPU has no bf16"
    flags = _cpu_flags()
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            return True, f"this CPU has {name}"
    return False, "this CPU has no native bf16 (AVX512-BF16 or AMX)"


def resolve_amp(amp: str, device: str | torch.device) -> tuple[str, str]:
    """``(precision, why)``: ``auto`` becomes ``bf16`` where :func:`native_bf16` says so, else
    ``none`` (fp32); any other value is returned as given, with an empty reason."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp {amp}: accepted values are {', '.join(AMP_CHOICES)}")
    if amp != "auto":
        return amp, ""
    ok, why = native_bf16(device)
    return ("bf16" if ok else "none"), f"--amp auto: {why}"
