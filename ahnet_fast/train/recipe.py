"""The paper's training recipe, stage by stage or all at once.

Stages (each can run alone, given the previous stage's output in ``out_dir``):

1. ``2d``: train a 2D MC-FCN (ResNet50 encoder, GCN/Refine decoder) on stacks
   of 3 neighbouring slices (``out_dir/2d/{last,best}.pt``), Adam lr 5e-4.
2. ``transfer``: copy its encoder into AH-Net's 3D encoder (stem
   ``(64,3,7,7) -> (64,1,7,7,3)``, ``k x k -> k x k x 1``, BatchNorm statistics
   included; :func:`ahnet_fast.transfer.transfer_2d_to_3d`) ->
   ``out_dir/transfer/init.pt``. ``init_2d`` may name a 2D state dict file
   (FCN/MCFCN or a torchvision ResNet50) to transfer from instead.
3. ``decoder``: train AH-Net's 3D decoder with the transferred encoder frozen
   (its BatchNorms keep their statistics), Adam lr 1e-3 (``out_dir/decoder``).
4. ``finetune``: fine-tune the whole AH-Net (``out_dir/finetune``); the best
   checkpoint by validation Dice is also written to ``out_dir/model.pt``, the
   file ``ahnet-fast`` inference reads.

Every stage uses cross-entropy first and switches to the focal loss when its
loss plateaus (``loss="ce_then_focal"``), writes atomic checkpoints, resumes
exactly with ``resume=True`` and logs to ``out_dir/<stage>/log.jsonl``.

Under torchrun (several processes, :mod:`ahnet_fast.train.distributed`) every rank runs the
recipe; rank 0 alone writes files (the others wait at a barrier where they need them) and the
memory chooser's pick is rank 0's on every rank.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ahnet_fast._atomic import atomic_path
from ahnet_fast.data.dataset import Case, DatasetSpec, check_headers, load_case, read_dataset, require_labels
from ahnet_fast.data.intensity import IntensityConfig
from ahnet_fast.data.spacing import describe_preprocessing
from ahnet_fast.data.loader import PatchDataset
from ahnet_fast.data.sampling import AugmentConfig
from ahnet_fast.train import distributed as ddp_util
from ahnet_fast.train.checkpoint import load_checkpoint, save_checkpoint
from ahnet_fast.train.models import (
    ENCODER_PREFIXES,
    FrozenBNTrainMode,
    build_2d_model,
    build_ahnet,
    freeze_encoder,
)
from ahnet_fast.train.trainer import TrainConfig, Trainer, ValidationCase, _confusion, dice_from_counts

__all__ = [
    "STAGES",
    "RecipeConfig",
    "run_recipe",
    "recipe_fields",
    "recipe_config_from_record",
    "predict_2d",
    "predict_3d",
    "evaluate",
]

STAGES = ("2d", "transfer", "decoder", "finetune")


@dataclass
class RecipeConfig:
    """Everything the recipe needs (defaults: the paper's settings on a GPU).

    Attributes:
        data: dataset folder, ``dataset.json`` or CSV (:func:`ahnet_fast.data.read_dataset`).
        out_dir: output folder.
        stages: subset of :data:`STAGES`, run in order.
        num_classes: classes including background (default: from dataset.json's "labels").
        intensity: normalisation (default: CT window for CT, percentiles otherwise).
        model_config: AH-Net keyword arguments besides in/out channels
            (``layers``, ``psp_block_num``, ``upsample_mode``).
        model_2d: ``"mcfcn"`` (paper) or ``"fcn"``.
        patch_2d: in-plane patch of the 2D stage (multiples of 32).
        patch_3d: ``(h, w, d)`` patch of the 3D stages (valid for AH-Net: d a
            multiple of 32, h and w multiples of 32, or of ``2**(psp+3)`` in
            transpose mode).
        batch_2d, batch_3d: micro-batch sizes.
        steps_2d, steps_decoder, steps_finetune: optimizer steps per stage.
        steps_per_epoch: steps per epoch (summary, validation, checkpoint).
        lr_2d, lr_3d, lr_finetune: Adam learning rates (paper: 5e-4 and 1e-3).
        lr_schedule: ``"constant"`` (paper) or ``"cosine"`` decay within each stage.
        sync_bn: synchronized BatchNorm across processes (several processes only).
        fg_ratio: share of foreground-centred patches (paper 0.7).
        class_balanced: draw the foreground class uniformly before the voxel.
        augment: in-plane augmentation (paper: +-20 deg, +-0.2 scale, mirroring).
        loss, focal_gamma, plateau_patience: see :class:`~ahnet_fast.train.trainer.TrainConfig`.
        amp: ``"none"``, ``"bf16"``, ``"fp16"``.
        checkpointing: activation checkpointing.
        grad_accum: micro-batches per optimizer step.
        max_memory: GiB budget; picks patch/batch/checkpointing of each stage
            (:func:`ahnet_fast.train.memory.choose_config`).
        fast: use the fast AH-Net (None: on CUDA).
        init_2d: transfer from this 2D state-dict file instead of the 2D stage.
        num_workers, seed, device: as in TrainConfig.
        val_window: sliding-window size for 3D validation (None: the whole volume when it has at most
            2**24 voxels, else windows of twice the training patch).
    """

    data: str
    out_dir: str
    stages: tuple[str, ...] = STAGES
    num_classes: int | None = None
    intensity: IntensityConfig | None = None
    model_config: dict[str, Any] = field(
        default_factory=lambda: {"layers": (3, 4, 6, 3), "psp_block_num": 4, "upsample_mode": "transpose"}
    )
    model_2d: str = "mcfcn"
    patch_2d: tuple[int, int] = (224, 224)
    patch_3d: tuple[int, int, int] = (192, 192, 32)
    batch_2d: int = 8
    batch_3d: int = 2
    steps_2d: int = 4000
    steps_decoder: int = 4000
    steps_finetune: int = 8000
    steps_per_epoch: int = 200
    lr_2d: float = 5e-4
    lr_3d: float = 1e-3
    lr_finetune: float | None = None
    lr_schedule: str = "constant"
    sync_bn: bool = False
    fg_ratio: float = 0.7
    class_balanced: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: str = "ce_then_focal"
    focal_gamma: float = 2.0
    plateau_patience: int = 2
    amp: str = "none"
    checkpointing: bool = False
    grad_accum: int = 1
    max_memory: float | None = None
    fast: bool | None = None
    init_2d: str | None = None
    num_workers: int = 2
    seed: int = 0
    device: str | None = None
    val_window: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {list(self.stages)}")
        self.stages = tuple(s for s in STAGES if s in self.stages)  # always in recipe order


# --------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict_2d(model: nn.Module, image: np.ndarray, slices: int = 3, chunk: int = 8,
               device: torch.device | None = None) -> torch.Tensor:
    """Slice-by-slice prediction of a 2D model on stacks of ``slices`` neighbouring slices.

    ``image (H, W, D)`` -> logits ``(K, H, W, D)`` (CPU). Out-of-volume slices are
    filled with the image minimum; H and W are padded to multiples of 32.
    """
    device = device or next(model.parameters()).device
    h, w, d = image.shape
    ph, pw, r = (-h) % 32, (-w) % 32, slices // 2
    lo = float(image.min())
    vol = np.pad(image.astype(np.float32), ((0, ph), (0, pw), (r, r)), constant_values=lo)
    outs = []
    for z0 in range(0, d, chunk):
        zs = range(z0, min(z0 + chunk, d))
        x = np.stack([np.moveaxis(vol[:, :, z:z + slices], 2, 0) for z in zs])  # (n, slices, H, W)
        outs.append(model(torch.from_numpy(x).to(device)).float().cpu())
    logits = torch.cat(outs)[:, :, :h, :w]  # (D, K, H, W)
    return logits.permute(1, 2, 3, 0).contiguous()


@torch.no_grad()
def predict_3d(model: nn.Module, image: np.ndarray, window: Sequence[int] | None = None,
               device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sliding-window prediction ``image (H, W, D)`` -> logits ``(K, H, W, D)`` (CPU)."""
    from ahnet_fast.infer.sliding_window import sliding_window_inference

    device = device or next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = sliding_window_inference(x, model, window=window, overlap=0.25, sw_device=device, device="cpu",
                                   autocast_dtype=autocast_dtype, pad_value=float(image.min()))
    return out[0]


def evaluate(model: nn.Module, cases: Sequence[Case], num_classes: int,
             predict: Callable[[nn.Module, np.ndarray], torch.Tensor]) -> dict[str, Any]:
    """Dice per class over ``cases`` (voxel counts summed over cases) and per case."""
    model.eval()
    total = np.zeros((num_classes, 3), np.int64)
    per_case = {}
    for c in cases:
        if c.label is None:
            continue
        pred = predict(model, c.image).argmax(0)
        cnt = _confusion(pred, torch.from_numpy(c.label.astype(np.int64)), num_classes)
        total += cnt
        per_case[c.name] = dice_from_counts(cnt)
    dice = dice_from_counts(total)
    fg = [v for v in dice[1:] if not math.isnan(v)]
    return {"dice": dice, "mean_fg_dice": float(np.mean(fg)) if fg else float("nan"), "per_case": per_case}


# --------------------------------------------------------------------------- recipe
class _Recipe:
    def __init__(self, cfg: RecipeConfig, log: Callable[[str], None], progress: bool,
                 overrides: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.overrides = set(overrides)
        self.log = log
        self.progress = progress
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.spec: DatasetSpec = read_dataset(cfg.data)
        k = cfg.num_classes or self.spec.num_classes
        if k is None:
            raise ValueError(
                f"{self.spec.source}: the number of classes is not declared (no \"labels\" in dataset.json); "
                "pass num_classes (--num-classes)"
            )
        if self.spec.num_classes is not None and cfg.num_classes is not None and cfg.num_classes != self.spec.num_classes:
            raise ValueError(f"num_classes {cfg.num_classes} contradicts the {self.spec.num_classes} classes "
                             f"declared in {self.spec.source}")
        if k < 2:
            raise ValueError(f"need at least 2 classes (background + 1), got {k}")
        self.k = int(k)
        self.intensity = cfg.intensity or IntensityConfig.for_modality(self.spec.modality)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        require_labels(self.spec)
        check_headers(self.spec.training + self.spec.validation)
        self._train_cases: list[Case] | None = None
        self._val_cases: list[Case] | None = None
        self.model_config = {"spatial_dims": 3, "in_channels": 1, "out_channels": self.k,
                             **{k_: (tuple(v) if isinstance(v, list) else v) for k_, v in cfg.model_config.items()}}
        # intensity, classes and the training spacing (+ its axis convention) for inference
        self.preprocessing = describe_preprocessing(self.spec, self.intensity, self.k)

    # data is loaded once and shared by the stages
    def train_cases(self) -> list[Case]:
        if self._train_cases is None:
            self._train_cases = [load_case(r, self.k, self.intensity) for r in self.spec.training]
        return self._train_cases

    def val_cases(self) -> list[Case]:
        if self._val_cases is None:
            self._val_cases = [load_case(r, self.k, self.intensity) for r in self.spec.validation if r.label]
        return self._val_cases

    def _resume_args(self, stage: str) -> dict[str, Any]:
        """Trainer arguments that map recipe settings (as the user names them) to TrainConfig fields."""
        names = {f: "--" + f.replace("_", "-") for f in _COMMON_TRAIN_FIELDS}
        names.update(_STAGE_OPTION_NAMES.get(stage, {}))
        recipe_field = {v.lstrip("-").replace("-", "_"): k for k, v in names.items()}
        overrides = {recipe_field.get(o, o) for o in self.overrides}
        if "max_memory" in self.overrides:  # the memory chooser picks batch and checkpointing
            overrides |= {"batch_size", "checkpointing"}
        if stage == "finetune" and "lr_finetune" in self.overrides:  # an API setting; the CLI sets --lr-3d
            overrides.add("lr")
        return {"overrides": overrides, "option_names": names}

    def _check_init(self, init: Path, ck: dict[str, Any], stage: str) -> None:
        saved = _plain(ck.get("model_config"))
        now = _plain(self.model_config)
        if saved is not None and json.dumps(saved, sort_keys=True) != json.dumps(now, sort_keys=True):
            raise ValueError(f"{init}: stage {stage} starts from a model built with {saved}, but this run asks for "
                             f"{now}; use the model options of that run, or rerun the earlier stages into a new --out")

    def _train_cfg(self, steps: int, batch: int, lr: float, checkpointing: bool, seed_offset: int) -> TrainConfig:
        c = self.cfg
        return TrainConfig(
            steps=steps, steps_per_epoch=min(c.steps_per_epoch, max(steps, 1)), batch_size=batch,
            grad_accum=c.grad_accum, lr=lr, amp=c.amp, checkpointing=checkpointing, loss=c.loss,
            focal_gamma=c.focal_gamma, plateau_patience=c.plateau_patience, num_workers=c.num_workers,
            seed=c.seed + seed_offset, device=str(self.device), val_window=c.val_window, lr_schedule=c.lr_schedule,
            sync_bn=c.sync_bn,
        )

    def _choose(self, factory: Callable[[], nn.Module], in_ch: int, patch: tuple[int, ...], batch: int,
                multiple: tuple[int, ...], minimum: tuple[int, ...], stage: str) -> tuple[tuple[int, ...], int, bool]:
        c = self.cfg
        if c.max_memory is None:
            return patch, batch, c.checkpointing
        from ahnet_fast.train.memory import choose_config

        cands = []
        for shrink in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
            p = tuple(max(mn, int(round(v * shrink / m)) * m) for v, m, mn in zip(patch, multiple, minimum))
            if p not in cands:
                cands.append(p)
        batches = sorted({b for b in (batch, max(1, batch // 2), max(1, batch // 4), 1)}, reverse=True)
        choice = choose_config(c.max_memory, factory, in_ch, self.k, cands, batches, c.amp, self.device)
        choice = ddp_util.broadcast_object(choice)  # several processes: rank 0's pick everywhere
        self.log(f"[{stage}] {choice.describe()}")
        if not ddp_util.is_main():
            return choice.patch_size, choice.batch_size, choice.checkpointing
        with open(self.out / "memory_choice.jsonl", "a") as fh:
            fh.write(json.dumps({"stage": stage, "patch": list(choice.patch_size), "batch": choice.batch_size,
                                 "checkpointing": choice.checkpointing, "peak_bytes": choice.peak_bytes,
                                 "method": choice.method, "tried": choice.tried}) + "\n")
        return choice.patch_size, choice.batch_size, choice.checkpointing

    # ---------------------------------------------------------------- stages
    def stage_2d(self, resume: bool) -> dict[str, Any]:
        c = self.cfg
        factory = lambda: build_2d_model(c.model_2d, 3, self.k)  # noqa: E731
        (ph, pw), batch, ck = self._choose(factory, 3, tuple(c.patch_2d), c.batch_2d, (32, 32), (32, 32), "2d")
        _check_multiple((ph, pw), (32, 32), "2D patch")
        torch.manual_seed(c.seed)
        model = factory()
        ds = PatchDataset([], self.k, self.intensity, (ph, pw, 3), fg_ratio=c.fg_ratio, augment=c.augment,
                          seed=c.seed + 1, mode="2.5d", class_balanced=c.class_balanced, cases=self.train_cases())
        vals = [ValidationCase(v.image, v.label, v.name) for v in self.val_cases()]
        trainer = Trainer(model, {"kind": c.model_2d, "in_slices": 3, "out_channels": self.k}, ds,
                          self._train_cfg(c.steps_2d, batch, c.lr_2d, ck, 1), self.out / "2d", self.k, vals,
                          predict=lambda m, im: predict_2d(m, im, 3, device=self.device), stage="2d",
                          extra={"preprocessing": self.preprocessing}, log=self.log, progress=self.progress,
                          **self._resume_args("2d"))
        return trainer.fit(resume=resume)

    def stage_transfer(self, resume: bool) -> dict[str, Any]:
        from ahnet_fast.transfer import transfer_2d_to_3d

        c = self.cfg
        dst = self.out / "transfer" / "init.pt"
        if resume and dst.is_file():
            self._check_init(dst, load_checkpoint(dst), "transfer")
            self.log(f"[transfer] {dst} exists; kept")
            return {"finished": True, "seconds": 0.0, "reused": True}
        torch.manual_seed(c.seed + 2)
        target = build_ahnet(self.model_config, fast=False)
        if c.init_2d:
            source: Any = c.init_2d
        else:
            src = _best_or_last(self.out / "2d", "2d")
            ck = load_checkpoint(src)
            mc = ck["model_config"]
            source = build_2d_model(mc["kind"], int(mc["in_slices"]), int(mc["out_channels"]))
            source.load_state_dict(ck["model"])
        report = transfer_2d_to_3d(source, target)
        self.log("[transfer] " + report.summary().replace("\n", "\n[transfer] "))
        if ddp_util.is_main():
            save_checkpoint(dst, {"model_config": self.model_config, "model": target.state_dict(),
                                  "stage": "transfer", "preprocessing": self.preprocessing,
                                  "transfer": report.summary()})
        ddp_util.barrier()  # the next stage reads it on every rank
        return {"finished": True, "seconds": 0.0, "copied": report.n_copied}

    def _stage_3d(self, stage: str, init: Path, steps: int, lr: float, frozen: bool, resume: bool) -> dict[str, Any]:
        c = self.cfg
        from ahnet_fast.infer.sliding_window import window_rules

        factory = lambda: build_ahnet(self.model_config, fast=c.fast)  # noqa: E731
        torch.manual_seed(c.seed + 3)
        model = factory()
        rules = window_rules(model) or ((32, 32, 32), (32, 32, 32))
        patch, batch, ck = self._choose(factory, 1, tuple(c.patch_3d), c.batch_3d, tuple(rules[0]),
                                        tuple(rules[1]), stage)
        _check_multiple(patch, tuple(rules[0]), f"3D patch for {type(model).__name__}({self.model_config})",
                        tuple(rules[1]))
        state = load_checkpoint(init)
        self._check_init(init, state, stage)
        model.load_state_dict(state["model"])
        train_mode = None
        if frozen:
            freeze_encoder(model, ENCODER_PREFIXES)
            train_mode = FrozenBNTrainMode(ENCODER_PREFIXES)
        ds = PatchDataset([], self.k, self.intensity, patch, fg_ratio=c.fg_ratio, augment=c.augment,
                          seed=c.seed + (3 if frozen else 4), mode="3d", class_balanced=c.class_balanced,
                          cases=self.train_cases())
        vals = [ValidationCase(v.image, v.label, v.name) for v in self.val_cases()]
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.amp)
        def predict(m: nn.Module, im: np.ndarray) -> torch.Tensor:
            # whole volume when small (fastest); windows of twice the patch otherwise (memory)
            window = c.val_window or (None if im.size <= 2**24 else tuple(2 * p for p in patch))
            return predict_3d(m, im, window, self.device, amp_dtype)

        trainer = Trainer(model, self.model_config, ds, self._train_cfg(steps, batch, lr, ck, 3 if frozen else 4),
                          self.out / stage, self.k, vals, predict=predict,
                          train_mode=train_mode, stage=stage,
                          extra={"preprocessing": self.preprocessing, "init": str(init)},
                          log=self.log, progress=self.progress, **self._resume_args(stage))
        return trainer.fit(resume=resume)

    def stage_decoder(self, resume: bool) -> dict[str, Any]:
        init = self.out / "transfer" / "init.pt"
        if not init.is_file():
            raise FileNotFoundError(f"{init}: no transferred AH-Net; run the 'transfer' stage first")
        return self._stage_3d("decoder", init, self.cfg.steps_decoder, self.cfg.lr_3d, True, resume)

    def stage_finetune(self, resume: bool) -> dict[str, Any]:
        init = _best_or_last(self.out / "decoder", "decoder")
        res = self._stage_3d("finetune", init, self.cfg.steps_finetune, self.cfg.lr_finetune or self.cfg.lr_3d,
                             False, resume)
        best = _best_or_last(self.out / "finetune", "finetune")
        if ddp_util.is_main():
            with atomic_path(self.out / "model.pt", fsync=True) as tmp:
                shutil.copyfile(best, tmp)
        ddp_util.barrier()
        self.log(f"[finetune] final model: {self.out / 'model.pt'} (from {best.name})")
        return res


def _check_multiple(patch: Sequence[int], multiple: Sequence[int], what: str,
                    minimum: Sequence[int] | None = None) -> None:
    bad = [i for i, (p, m) in enumerate(zip(patch, multiple)) if p % m]
    low = [i for i, p in enumerate(patch) if minimum is not None and p < minimum[i]]
    if bad or low:
        fix = tuple(max(-(-p // m) * m, (minimum or [0] * len(patch))[i]) for i, (p, m) in enumerate(zip(patch, multiple)))
        raise ValueError(f"{what}: {tuple(patch)} is not a valid size (each axis must be a multiple of "
                         f"{tuple(multiple)}{'' if minimum is None else f' and at least {tuple(minimum)}'}); "
                         f"nearest valid size {fix}")


def _best_or_last(folder: Path, stage: str) -> Path:
    for name in ("best.pt", "last.pt"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no checkpoint of stage '{stage}'; run that stage first")


#: TrainConfig fields every trainer stage shares with RecipeConfig under the same name
_COMMON_TRAIN_FIELDS = ("seed", "steps_per_epoch", "grad_accum", "amp", "checkpointing", "loss", "focal_gamma",
                        "plateau_patience", "lr_schedule", "val_window", "sync_bn")
#: the per-stage TrainConfig fields, named as the user sets them
_STAGE_OPTION_NAMES = {
    "2d": {"lr": "--lr-2d", "batch_size": "--batch-2d", "steps": "--steps-2d"},
    "decoder": {"lr": "--lr-3d", "batch_size": "--batch-3d", "steps": "--steps-decoder"},
    "finetune": {"lr": "--lr-3d", "batch_size": "--batch-3d", "steps": "--steps-finetune"},
}
#: RecipeConfig fields that decide each stage's result (compared with recipe.json on --resume)
_COMMON_RECIPE_FIELDS = ("data", "num_classes", "intensity", "fg_ratio", "class_balanced", "augment", "loss",
                         "focal_gamma", "plateau_patience", "amp", "grad_accum", "seed", "steps_per_epoch",
                         "lr_schedule", "sync_bn", "val_window", "checkpointing", "max_memory")
_STAGE_RECIPE_FIELDS = {
    "2d": ("model_2d", "patch_2d", "batch_2d", "steps_2d", "lr_2d"),
    "transfer": ("init_2d", "model_config", "model_2d"),
    "decoder": ("model_config", "patch_3d", "batch_3d", "steps_decoder", "lr_3d", "fast"),
    "finetune": ("model_config", "patch_3d", "batch_3d", "steps_finetune", "lr_finetune", "lr_3d", "fast"),
}
#: what each stage writes into out_dir; --overwrite removes exactly these (never a user's other files)
_TRAINER_FILES = ("last.pt", "best.pt", "log.jsonl")
_STAGE_OUTPUTS = {
    "2d": tuple(f"2d/{f}" for f in _TRAINER_FILES),
    "transfer": ("transfer/init.pt",),
    "decoder": tuple(f"decoder/{f}" for f in _TRAINER_FILES),
    "finetune": (*(f"finetune/{f}" for f in _TRAINER_FILES), "model.pt"),
}


def recipe_fields() -> list[str]:
    """Names accepted by ``overrides`` (:func:`run_recipe`, ``--override``)."""
    return sorted({*_COMMON_RECIPE_FIELDS, *(f for fs in _STAGE_RECIPE_FIELDS.values() for f in fs)})


def recipe_config_from_record(record: dict[str, Any], data: str, out_dir: str) -> RecipeConfig:
    """The :class:`RecipeConfig` a ``recipe.json`` describes (for ``--resume``: the run's own settings).

    ``data`` and ``out_dir`` are taken as given now (paths may be spelled differently);
    entries this version does not know are ignored.
    """
    known = {f.name for f in dataclasses.fields(RecipeConfig)} - {"data", "out_dir", "stages"}
    kw: dict[str, Any] = {k: v for k, v in record.items() if k in known}
    for k in ("patch_2d", "patch_3d", "val_window"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    if isinstance(kw.get("model_config"), dict):
        kw["model_config"] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw["model_config"].items()}
    if isinstance(kw.get("intensity"), dict):
        kw["intensity"] = IntensityConfig.from_dict(kw["intensity"])
    if isinstance(kw.get("augment"), dict):
        aug = dict(kw["augment"])
        aug["flip_axes"] = tuple(aug.get("flip_axes", (0, 1)))
        kw["augment"] = AugmentConfig(**aug)
    try:
        return RecipeConfig(data=data, out_dir=out_dir, **kw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{out_dir}/recipe.json: not the settings of a run of this version ({exc})") from exc


def _recipe_record(cfg: RecipeConfig) -> dict[str, Any]:
    rec = json.loads(json.dumps(_plain(dataclasses.asdict(cfg))))
    rec["data"] = str(Path(cfg.data).resolve())  # the same data given by another relative path is the same
    return rec


def _existing_outputs(out: Path, stages: Sequence[str]) -> list[str]:
    return [name for stage in stages for name in _STAGE_OUTPUTS[stage] if (out / name).exists()]


def _check_resume_settings(out: Path, cfg: RecipeConfig, overrides: set[str]) -> dict[str, list[Any]]:
    """Settings that differ from the run being resumed (recipe.json); refused unless overridden."""
    path = out / "recipe.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the settings of the run to resume ({exc})") from exc
    now = _recipe_record(cfg)
    fields = [*_COMMON_RECIPE_FIELDS, *(f for st in cfg.stages for f in _STAGE_RECIPE_FIELDS[st])]
    changed = {f: [saved.get(f), now.get(f)] for f in dict.fromkeys(fields)
               if f in saved and saved.get(f) != now.get(f)}
    refused = {f: v for f, v in changed.items() if f not in overrides}
    if refused:
        text = ", ".join(f"{f} {a} -> {b}" for f, (a, b) in refused.items())
        raise ValueError(
            f"--resume: settings differ from the run in {out} ({text}; see recipe.json); give the original "
            f"values, or --override {','.join(refused)} to change them on purpose"
        )
    return changed


def run_recipe(cfg: RecipeConfig, resume: bool = False, log: Callable[[str], None] | None = None,
               progress: bool = True, overwrite: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``cfg.stages`` in order (module docstring).

    Args:
        resume: continue the run in ``cfg.out_dir`` exactly; settings that differ from its
            ``recipe.json`` (and each stage checkpoint's) are refused unless named in ``overrides``.
        overwrite: without ``resume``, replace the outputs of ``cfg.stages`` already in
            ``out_dir`` (otherwise their presence is an error: nothing is silently replaced and
            logs of two runs are never mixed).
        overrides: :func:`recipe_fields` that may change on resume; changes are logged.

    Returns:
        ``{"stages": {name: result with "seconds"}, "out_dir": ..., "num_classes": ...}``.
    """
    from ahnet_fast._atomic import atomic_write_text, clean_stale_temps

    if log is None:
        from tqdm.auto import tqdm

        log = lambda m: tqdm.write(m)  # noqa: E731
    if not ddp_util.is_main():
        log, progress = (lambda m: None), False  # rank 0 alone reports
    unknown = sorted(set(overrides) - set(recipe_fields()))
    if unknown:
        raise ValueError(f"--override: unknown setting(s) {unknown}; accepted: {', '.join(recipe_fields())}")
    out = Path(cfg.out_dir)
    changed: dict[str, list[Any]] = {}
    if resume:
        changed = _check_resume_settings(out, cfg, set(overrides))
    else:
        existing = _existing_outputs(out, cfg.stages)
        if existing and not overwrite:
            shown = ", ".join(existing[:4]) + (f", ... ({len(existing)} in all)" if len(existing) > 4 else "")
            raise FileExistsError(
                f"{out}: already holds results of the stage(s) to run ({shown}); pass --resume to continue that "
                "run, --overwrite to replace them, or choose another --out"
            )
        if existing and ddp_util.is_main():
            for name in existing:
                (out / name).unlink()
            log(f"--overwrite: removed the earlier results in {out}: {', '.join(existing)}")
    ddp_util.barrier()  # every rank has checked the folder before rank 0 writes into it
    r = _Recipe(cfg, log, progress, overrides=overrides)
    if ddp_util.is_main():
        for folder in [r.out, *(r.out / s for s in STAGES)]:
            clean_stale_temps(folder)  # left by a run killed with SIGKILL
        record = _recipe_record(cfg)
        history: list[Any] = []
        if resume and (r.out / "recipe.json").is_file():
            history = list(json.loads((r.out / "recipe.json").read_text()).get("overrides", []))
        if changed:
            history.append({"time": time.time(), "changes": changed})
            log("--override: " + ", ".join(f"{f} {a} -> {b}" for f, (a, b) in changed.items()))
        record["overrides"] = history
        atomic_write_text(r.out / "recipe.json", json.dumps(record, indent=2))
    results: dict[str, Any] = {}
    for stage in cfg.stages:
        t0 = time.time()
        res = getattr(r, f"stage_{stage}")(resume)
        res["seconds"] = time.time() - t0
        results[stage] = res
        log(f"[{stage}] done in {res['seconds']:.1f} s" + (
            f", best mean foreground Dice {res['best_dice']:.3f}" if "best_dice" in res else ""))
    return {"stages": results, "out_dir": str(r.out), "num_classes": r.k, "intensity": r.intensity}


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
