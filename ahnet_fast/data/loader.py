"""Patch datasets and DataLoaders with reproducible, worker-count-independent sampling.

Every training sample has a global index ``g`` (``step * batch_size + i``); its
random draws come from ``numpy.random.default_rng([seed, g])``. So the batches
of step ``s`` are the same whether they are produced by 0, 1 or 8 workers, and
resuming a run at step ``s`` (``StepBatchSampler(start_step=s)``) continues the
exact sample stream.

Volumes are loaded (read, checked, normalised) either up front in the main
process (``preload=True``, the default: errors surface before training, and
forked workers share the arrays) or lazily inside the DataLoader workers with a
small per-worker cache (``preload=False``, for datasets larger than memory).
Patch extraction and augmentation always run in the workers.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ahnet_fast.data.dataset import Case, CaseRef, load_case
from ahnet_fast.data.errors import DataError
from ahnet_fast.data.intensity import IntensityConfig
from ahnet_fast.data.sampling import AugmentConfig, ForegroundIndex, sample_patch

__all__ = ["PatchDataset", "StepBatchSampler", "make_loader", "worker_init_fn"]


class PatchDataset(Dataset):
    """Random training patches from a list of cases.

    Args:
        refs: cases (each needs a label).
        num_classes: labels must lie in ``[0, num_classes)``.
        intensity: normalisation.
        patch_size: ``(h, w, d)``. For ``mode="2.5d"``, ``d`` is the number of
            neighbouring slices stacked as channels (odd; 3 in the paper) and
            the label is the centre slice.
        fg_ratio: share of foreground-centred patches (paper 0.7).
        augment: in-plane augmentation (None: none).
        seed: base seed of the sample stream.
        mode: ``"3d"`` (items ``image (1, h, w, d)``, ``label (h, w, d)``) or
            ``"2.5d"`` (items ``image (d, h, w)``, ``label (h, w)``).
        class_balanced: draw the foreground class uniformly before the voxel.
        preload: load every case in the constructor (see module docstring).
        cache_size: cases kept per process when ``preload=False``.
        cases: already loaded cases (skips loading; ``refs`` may then be empty).

    Items are dicts ``{"image": float32 tensor, "label": int64 tensor, "case": int}``.
    """

    def __init__(
        self,
        refs: Sequence[CaseRef],
        num_classes: int,
        intensity: IntensityConfig,
        patch_size: Sequence[int],
        fg_ratio: float = 0.7,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        mode: str = "3d",
        class_balanced: bool = False,
        preload: bool = True,
        cache_size: int = 4,
        cases: Sequence[Case] | None = None,
    ) -> None:
        if mode not in ("3d", "2.5d"):
            raise ValueError(f"mode must be '3d' or '2.5d', got {mode!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {tuple(patch_size)}")
        if mode == "2.5d" and self.patch_size[2] % 2 == 0:
            raise ValueError(f"2.5d mode needs an odd number of stacked slices, got {self.patch_size[2]}")
        self.refs = list(refs)
        self.num_classes = num_classes
        self.intensity = intensity
        self.fg_ratio = float(fg_ratio)
        self.augment = augment
        self.seed = int(seed)
        self.mode = mode
        self.class_balanced = class_balanced
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[int, tuple[Case, ForegroundIndex]] = OrderedDict()
        self._preloaded = False
        if cases is not None:
            self.refs = [CaseRef(c.image_path, c.label_path, c.name) for c in cases]
            for i, c in enumerate(cases):
                if c.label is None:
                    raise DataError(c.image_path, "training case has no label")
                self._cache[i] = (c, ForegroundIndex(c.label))
            self._preloaded = True
        elif preload:
            for i in range(len(self.refs)):
                self._cache[i] = self._load(i)
            self._preloaded = True
        if not self.refs:
            raise ValueError("PatchDataset needs at least one case")
        for r in self.refs:
            if r.label is None and cases is None:
                raise ValueError(f"{r.image}: training case has no label")

    def _load(self, i: int) -> tuple[Case, ForegroundIndex]:
        case = load_case(self.refs[i], self.num_classes, self.intensity)
        if case.label is None:
            raise ValueError(f"{self.refs[i].image}: training case has no label")
        return case, ForegroundIndex(case.label)

    def case(self, i: int) -> tuple[Case, ForegroundIndex]:
        """Case ``i`` and its foreground index (loaded on demand, LRU-cached)."""
        hit = self._cache.get(i)
        if hit is not None:
            if not self._preloaded:
                self._cache.move_to_end(i)
            return hit
        item = self._load(i)
        self._cache[i] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return item

    def __len__(self) -> int:
        # The stream is unbounded; StepBatchSampler decides how many samples are drawn.
        return 2**62

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(index)])
        ci = int(rng.integers(len(self.refs)))
        case, fgi = self.case(ci)
        img, lab, _ = sample_patch(
            case.image,
            case.label,
            self.patch_size,
            rng,
            fg_ratio=self.fg_ratio,
            augment=self.augment,
            fg_index=fgi,
            class_balanced=self.class_balanced,
            pad_value=float(case.image.min()),
            where=case.image_path,
        )
        assert lab is not None
        if self.mode == "2.5d":
            image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, 2, 0)))  # (d, h, w)
            label = torch.from_numpy(lab[:, :, self.patch_size[2] // 2].astype(np.int64))
        else:
            image = torch.from_numpy(img[None])
            label = torch.from_numpy(lab.astype(np.int64))
        return {"image": image, "label": label, "case": ci}


class StepBatchSampler(Sampler):
    """Yields the global sample indices of steps ``start_step .. start_step + num_steps - 1``.

    Batch ``s`` is ``[s * batch_size, ..., s * batch_size + batch_size - 1]``.
    """

    def __init__(self, batch_size: int, num_steps: int, start_step: int = 0) -> None:
        if batch_size < 1 or num_steps < 0 or start_step < 0:
            raise ValueError(f"need batch_size >= 1, num_steps >= 0, start_step >= 0; got "
                             f"{batch_size}, {num_steps}, {start_step}")
        self.batch_size, self.num_steps, self.start_step = batch_size, num_steps, start_step

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start_step, self.start_step + self.num_steps):
            yield list(range(s * self.batch_size, (s + 1) * self.batch_size))


def worker_init_fn(worker_id: int) -> None:
    """Per-worker seeding of the global generators (python, numpy, torch).

    Our own sampling does not use them (it derives a generator per sample), but
    user transforms might; torch gives each worker ``base_seed + worker_id``.
    Also keeps each worker single-threaded so workers don't oversubscribe cores.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


def make_loader(
    dataset: PatchDataset,
    batch_size: int,
    num_steps: int,
    start_step: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``num_steps`` batches starting at ``start_step`` (see module docstring)."""
    gen = torch.Generator()
    gen.manual_seed(dataset.seed)
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(batch_size, num_steps, start_step),
        num_workers=num_workers,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        generator=gen,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
