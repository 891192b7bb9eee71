"""Training: the paper's recipe (2D MC-FCN -> transfer -> 3D decoder -> fine-tune) for memory-limited GPUs.

Heavy modules are imported lazily; ``from ahnet_fast.train import run_recipe`` works as usual.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "ahnet_fast.train.trainer",
    "Trainer": "ahnet_fast.train.trainer",
    "LossSchedule": "ahnet_fast.train.trainer",
    "ValidationCase": "ahnet_fast.train.trainer",
    "RecipeConfig": "ahnet_fast.train.recipe",
    "run_recipe": "ahnet_fast.train.recipe",
    "evaluate": "ahnet_fast.train.recipe",
    "predict_2d": "ahnet_fast.train.recipe",
    "predict_3d": "ahnet_fast.train.recipe",
    "STAGES": "ahnet_fast.train.recipe",
    "save_checkpoint": "ahnet_fast.train.checkpoint",
    "load_checkpoint": "ahnet_fast.train.checkpoint",
    "choose_config": "ahnet_fast.train.memory",
    "enable_activation_checkpointing": "ahnet_fast.train.models",
    "freeze_encoder": "ahnet_fast.train.models",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ahnet_fast.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
