"""Data: NIfTI volumes (nifti), dataset lists (MSD folder / dataset.json / CSV), intensity
normalisation, patch sampling with in-plane augmentation, DataLoaders, and the MNI152 demo data.
"""
from __future__ import annotations

from ahnet_fast.data.dataset import Case, CaseRef, DatasetSpec, check_headers, load_case, read_dataset
from ahnet_fast.data.errors import DataError
from ahnet_fast.data.intensity import IntensityConfig, ct_window, normalise, percentile_normalise
from ahnet_fast.data.loader import PatchDataset, StepBatchSampler, make_loader, worker_init_fn
from ahnet_fast.data.sampling import AugmentConfig, ForegroundIndex, PatchInfo, check_patch_size, sample_patch

__all__ = [
    "AugmentConfig", "Case", "CaseRef", "DataError", "DatasetSpec", "ForegroundIndex", "IntensityConfig",
    "PatchDataset", "PatchInfo", "StepBatchSampler", "check_headers", "check_patch_size", "ct_window",
    "load_case", "make_loader", "normalise", "percentile_normalise", "read_dataset", "sample_patch",
    "worker_init_fn",
]
