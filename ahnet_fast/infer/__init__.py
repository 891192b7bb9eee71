"""Inference and evaluation: sliding windows, the coarse-to-fine cascade, metrics, model loading.

Volumes are ``(B, C, H, W, D)`` tensors in network layout (see
:mod:`ahnet_fast.data.nifti`: canonical orientation, coarsest axis last).
"""
from __future__ import annotations

from .cascade import CascadeStats, cascade_inference
from .graphed import GraphedForward, graphed
from .metrics import average_surface_distance, dice, dice_per_class, evaluate_case, global_dice, hd95
from .model_io import CheckpointError, load_model, save_model_checkpoint
from .segment import SegmentOptions, SegmentResult, predict_volume, segment_file
from .sliding_window import importance_map, sliding_window_inference, valid_window, window_rules

__all__ = [
    "CascadeStats",
    "CheckpointError",
    "average_surface_distance",
    "cascade_inference",
    "dice",
    "dice_per_class",
    "evaluate_case",
    "global_dice",
    "graphed",
    "GraphedForward",
    "hd95",
    "importance_map",
    "load_model",
    "predict_volume",
    "segment_file",
    "SegmentOptions",
    "SegmentResult",
    "save_model_checkpoint",
    "sliding_window_inference",
    "valid_window",
    "window_rules",
]
