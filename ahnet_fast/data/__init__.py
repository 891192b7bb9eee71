"""Data: NIfTI volumes (nifti), dataset lists (MSD or nnU-Net v2 folder / dataset.json / CSV),
intensity normalisation, voxel spacing (recorded at training, resampled to at inference), patch
sampling with in-plane augmentation, DataLoaders, and the MNI152 demo data.
"""
from __future__ import annotations

from ahnet_fast.data.dataset import Case, CaseRef, DatasetSpec, check_headers, load_case, read_dataset
from ahnet_fast.data.errors import DataError
from ahnet_fast.data.intensity import (
    IntensityConfig,
    ct_window,
    describe_stats,
    foreground_mask,
    normalise,
    normalise_with_stats,
    percentile_normalise,
)
from ahnet_fast.data.loader import PatchDataset, StepBatchSampler, make_loader, worker_init_fn
from ahnet_fast.data.sampling import AugmentConfig, ForegroundIndex, PatchInfo, check_patch_size, sample_patch
from ahnet_fast.data.spacing import (
    ResamplePlan,
    describe_preprocessing,
    plan_resampling,
    resample_image,
    resample_probabilities,
    training_spacing_from_meta,
)

__all__ = [
    "AugmentConfig", "Case", "CaseRef", "DataError", "DatasetSpec", "ForegroundIndex", "IntensityConfig",
    "PatchDataset", "PatchInfo", "ResamplePlan", "StepBatchSampler", "check_headers", "check_patch_size",
    "ct_window", "describe_preprocessing", "describe_stats", "foreground_mask", "load_case", "make_loader",
    "normalise", "normalise_with_stats", "percentile_normalise", "plan_resampling", "read_dataset",
    "resample_image", "resample_probabilities", "sample_patch", "training_spacing_from_meta", "worker_init_fn",
]
