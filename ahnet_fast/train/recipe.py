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
4. ``finetune``: fine-tune the whole AH-Net (``out_dir/finetune``).

``out_dir/model.pt`` (what ``ahnet-fast segment`` reads: weights, model config and
preprocessing, no optimizer state) is written as soon as a 3D stage ends its first epoch and
is replaced whenever a 3D epoch beats its Dice (validation Dice, or the Dice of the training
batches when the dataset has no validation cases), so a run stopped at any point leaves a
usable model.

Budgets: ``time_budget`` (seconds) measures a few steps of each stage on this machine first,
then scales the configured steps of the trained stages by one factor so that the run fits
(:mod:`ahnet_fast.train.budget`), re-plans the stages still to run at each stage start, and
stops each stage at its share of the time. ``step_budget`` scales them to that many optimizer
steps in all. On ``resume`` the steps recorded in ``recipe.json`` stand (with the warm-up
measurements recorded there), and a time budget bounds the resumed invocation from its start. ``out_dir/summary.json`` and ``out_dir/progress.png`` (loss, Dice per class,
learning rate and time per epoch, every stage, continued across resumes) are kept current.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ahnet_fast.data.dataset import (
    Case, DatasetSpec, check_headers, load_case, read_dataset, require_labels, training_intensity,
)
from ahnet_fast.data.intensity import ZSCORE_CLIP, IntensityConfig
from ahnet_fast.data.spacing import (
    AUTO_MAX_VOXELS,
    check_target_spacing,
    describe_preprocessing,
    resample_case,
)
from ahnet_fast.data.loader import PatchDataset
from ahnet_fast.data.sampling import AugmentConfig
from ahnet_fast.train import distributed as ddp_util
from ahnet_fast.train.budget import StageCost, format_duration, plan_steps
from ahnet_fast.train.presets import PRESETS, resolve_amp
from ahnet_fast.train.checkpoint import load_checkpoint, save_checkpoint
from ahnet_fast.train.models import (
    ENCODER_PREFIXES,
    FrozenBNTrainMode,
    ahnet_class,
    build_2d_model,
    build_ahnet,
    enable_activation_checkpointing,
    freeze_encoder,
)
from ahnet_fast.train.trainer import (
    TrainConfig,
    Trainer,
    ValidationCase,
    _confusion,
    check_ema_decay,
    dice_from_counts,
    weights_only,
)

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
        spacing: voxel size (mm along H, W, D, network layout) every case is resampled to for
            training and validation (:func:`ahnet_fast.data.spacing.resample_case`; recorded in the
            checkpoint, so `segment` resamples its inputs to it), ``"auto"`` (thick slices and,
            while the cases stay within :data:`~ahnet_fast.data.spacing.AUTO_MAX_VOXELS`, the
            in-plane spacing resampled to half: :func:`ahnet_fast.data.spacing.auto_training_spacing`),
            or None to use each case on its own grid. AH-Net predicts at half the input resolution
            on every axis, so a grid twice as fine as the scan's gives its prediction the scan's
            own resolution.
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
        ema: decay of the weight average each stage keeps and saves (0: off; see
            :class:`~ahnet_fast.train.trainer.TrainConfig`).
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
        val_window: sliding-window size for 3D validation (None: the stage's training patch, the
            window `ahnet-fast segment` uses by default).
        preset: name of the preset these settings came from (:mod:`ahnet_fast.train.presets`;
            informational).
        time_budget: wall-time budget of the run in seconds (module docstring), or None.
        step_budget: optimizer steps of all trained stages together, or None.
    """

    data: str
    out_dir: str
    stages: tuple[str, ...] = STAGES
    num_classes: int | None = None
    intensity: IntensityConfig | None = None
    spacing: tuple[float, float, float] | str | None = None
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
    ema: float = 0.0
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
    preset: str | None = None
    time_budget: float | None = None
    step_budget: int | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {list(self.stages)}")
        if self.time_budget is not None and self.step_budget is not None:
            raise ValueError("--time-budget and --step-budget: give one budget, not both")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time budget must be positive, got {self.time_budget} s")
        if self.step_budget is not None and self.step_budget < 1:
            raise ValueError(f"step budget must be at least 1, got {self.step_budget}")
        check_ema_decay(self.ema, "--ema")  # here too: before the data is read, named as the user set it
        self.stages = tuple(s for s in STAGES if s in self.stages)  # always in recipe order
        if self.spacing != "auto":
            self.spacing = check_target_spacing(self.spacing)


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
                 overrides: Sequence[str] = (), clock: Callable[[], float] = time.monotonic,
                 amp_why: str = "") -> None:
        self.cfg = cfg
        self.clock = clock
        self.t_start = clock()
        self._choices: dict[str, tuple[tuple[int, ...], int, bool]] = {}
        self.costs: dict[str, Any] = {}  # stage -> budget.StageCost (measured warm-up)
        self.base_steps: dict[str, int] = {}  # stage -> configured steps the budget plan scales (_plan_budget)
        self.run_end: float | None = None  # clock time the budget ends
        self.replan = False  # re-plan the steps of the stages still to run at each stage start
        self.model_best = -math.inf  # Dice of the weights in model.pt (this run)
        self.model_source: dict[str, Any] | None = None
        self.spe_fixed: dict[str, int] = {}  # stage -> epoch length kept when a budget resized the stage
        self.rates: dict[str, list[float]] = {}  # stage -> seconds per step of each epoch (this invocation)
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
        # --intensity-stats training: one fixed window, recorded in model.pt, so every case (training,
        # validation, `segment`'s inputs) is scaled the same way (ahnet_fast.data.intensity)
        self.intensity_is_default = cfg.intensity is None
        if cfg.intensity is None:
            # recorded as resolved (recipe.json, checkpoints): a later change of the modality's default
            # cannot change what a resumed run normalises with
            cfg.intensity = IntensityConfig.for_modality(self.spec.modality)
        self.intensity = training_intensity(self.spec, cfg.intensity)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device}: CUDA is not available on this machine; use --device cpu "
                             "(a resumed run may be continued on another device)")
        self.amp_why = amp_why
        require_labels(self.spec)
        check_headers(self.spec.training + self.spec.validation)
        self._train_cases: list[Case] | None = None
        self._val_cases: list[Case] | None = None
        self.model_config = {"spatial_dims": 3, "in_channels": 1, "out_channels": self.k,
                             **{k_: (tuple(v) if isinstance(v, list) else v) for k_, v in cfg.model_config.items()}}
        # intensity, classes and the training spacing (+ its axis convention) for inference
        self.preprocessing = describe_preprocessing(self.spec, self.intensity, self.k, cfg.spacing)
        # the grid every case is trained on (None: the cases' own; "auto" resolved above)
        self.spacing = tuple(self.preprocessing["spacing"]) if "resampled_from" in self.preprocessing else None

    # data is loaded once and shared by the stages
    def train_cases(self) -> list[Case]:
        if self._train_cases is None:
            self._train_cases = [resample_case(load_case(r, self.k, self.intensity), self.spacing)
                                 for r in self.spec.training]
        return self._train_cases

    def val_cases(self) -> list[Case]:
        if self._val_cases is None:
            self._val_cases = [resample_case(load_case(r, self.k, self.intensity), self.spacing)
                               for r in self.spec.validation if r.label]
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
        self._check_spacing(init, ck, stage)

    def _check_spacing(self, path: Path, ck: dict[str, Any], stage: str) -> None:
        """A stage continues from weights trained on the same grid: ``--spacing auto`` is resolved
        anew from the cases at every start, so a resumed run (or one rerun with other data or
        another version) could otherwise switch grids between stages without a word."""
        pre = ck.get("preprocessing")
        saved = pre.get("spacing") if isinstance(pre, dict) else None
        now = self.preprocessing.get("spacing")
        if saved is None or now is None or "spacing" in self.overrides:
            return
        if "resampled_from" not in pre and "resampled_from" not in self.preprocessing:
            return  # both on the cases' own grids: what those are is the data's business
        if any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(saved, now)):
            fmt = lambda v: " ".join(f"{float(x):g}" for x in v)  # noqa: E731
            given = self.cfg.spacing
            asked = given if isinstance(given, str) else fmt(given) if given is not None else "native"
            raise ValueError(f"{path}: stage {stage} starts from a model trained at {fmt(saved)} mm, but this run's "
                             f"--spacing {asked} gives {fmt(now)} mm; pass --spacing {fmt(saved)} to continue on "
                             "that grid, or rerun the earlier stages into a new --out (with --resume, --override "
                             "spacing changes it on purpose)")

    def steps_per_epoch(self, steps: int) -> int:
        """A stage's epoch length: ``steps_per_epoch``, shorter when the stage is shorter; with a budget
        at least 4 epochs per stage (each epoch validates and can update model.pt)."""
        c = self.cfg
        spe = min(c.steps_per_epoch, max(steps, 1))
        if c.time_budget is not None or c.step_budget is not None:
            spe = min(spe, max(1, -(-steps // 4)))
        return spe

    def stage_spe(self, stage: str, steps: int) -> int:
        """The stage's epoch length: as fixed when a budget lengthened it, else :meth:`steps_per_epoch`."""
        return self.spe_fixed.get(stage) or self.steps_per_epoch(steps)

    def _train_cfg(self, steps: int, batch: int, lr: float, checkpointing: bool, seed_offset: int,
                   stage: str = "") -> TrainConfig:
        c = self.cfg
        return TrainConfig(
            steps=steps, steps_per_epoch=self.stage_spe(stage, steps), batch_size=batch,
            grad_accum=c.grad_accum, lr=lr, amp=c.amp, checkpointing=checkpointing, loss=c.loss,
            focal_gamma=c.focal_gamma, plateau_patience=c.plateau_patience, num_workers=c.num_workers,
            seed=c.seed + seed_offset, device=str(self.device), val_window=c.val_window, lr_schedule=c.lr_schedule,
            sync_bn=c.sync_bn, ema=c.ema,
        )

    def _choose(self, factory: Callable[[], nn.Module], in_ch: int, patch: tuple[int, ...], batch: int,
                multiple: tuple[int, ...], minimum: tuple[int, ...], stage: str) -> tuple[tuple[int, ...], int, bool]:
        c = self.cfg
        if c.max_memory is None:
            return patch, batch, c.checkpointing
        if stage in self._choices:  # chosen once (the warm-up measurement and the stage share it)
            return self._choices[stage]
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
        self._choices[stage] = (choice.patch_size, choice.batch_size, choice.checkpointing)
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
                          self._train_cfg(c.steps_2d, batch, c.lr_2d, ck, 1, "2d"), self.out / "2d", self.k, vals,
                          predict=lambda m, im: predict_2d(m, im, 3, device=self.device), stage="2d",
                          extra={"preprocessing": self.preprocessing}, log=self.log, progress=self.progress,
                          on_epoch=self._on_epoch, eta=self._eta, **self._resume_args("2d"))
        return self._fit(trainer, "2d", resume)

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
            self._check_spacing(src, ck, "transfer")
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

    def _model_3d(self, stage: str) -> tuple[Callable[[], nn.Module], nn.Module, tuple, int, bool]:
        """(factory, a fresh AH-Net, 3D patch, batch, activation checkpointing) of a 3D stage: the
        patch and batch the memory planner chose, checked against the network's window rules."""
        from ahnet_fast.infer.sliding_window import window_rules

        c = self.cfg
        factory = lambda: build_ahnet(self.model_config, fast=c.fast)  # noqa: E731
        model = factory()
        rules = window_rules(model) or ((32, 32, 32), (32, 32, 32))
        patch, batch, ck = self._choose(factory, 1, tuple(c.patch_3d), c.batch_3d, tuple(rules[0]),
                                        tuple(rules[1]), stage)
        _check_multiple(patch, tuple(rules[0]), f"3D patch for {type(model).__name__}({self.model_config})",
                        tuple(rules[1]))
        return factory, model, tuple(patch), batch, ck

    def _stage_3d(self, stage: str, init: Path, steps: int, lr: float, frozen: bool, resume: bool) -> dict[str, Any]:
        c = self.cfg
        torch.manual_seed(c.seed + 3)
        factory, model, patch, batch, ck = self._model_3d(stage)
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
            # windows of the training patch, as `segment` runs the model: best.pt and model.pt are
            # chosen on what the user gets (a whole-volume window gives the net a context it was
            # not trained on: 0.02 lower mean Dice on the MNI task)
            return predict_3d(m, im, c.val_window or patch, self.device, amp_dtype)

        trainer = Trainer(model, self.model_config, ds, self._train_cfg(steps, batch, lr, ck, 3 if frozen else 4, stage),
                          self.out / stage, self.k, vals, predict=predict,
                          train_mode=train_mode, stage=stage,
                          extra={"preprocessing": self.preprocessing, "init": str(init)},
                          log=self.log, progress=self.progress, on_epoch=self._on_epoch, eta=self._eta,
                          **self._resume_args(stage))
        return self._fit(trainer, stage, resume)

    def stage_decoder(self, resume: bool) -> dict[str, Any]:
        init = self.out / "transfer" / "init.pt"
        if not init.is_file():
            raise FileNotFoundError(f"{init}: no transferred AH-Net; run the 'transfer' stage first")
        return self._stage_3d("decoder", init, self.cfg.steps_decoder, self.cfg.lr_3d, True, resume)

    def stage_finetune(self, resume: bool) -> dict[str, Any]:
        init = _best_or_last(self.out / "decoder", "decoder")
        res = self._stage_3d("finetune", init, self.cfg.steps_finetune, self.cfg.lr_finetune or self.cfg.lr_3d,
                             False, resume)
        model_pt = self.out / "model.pt"
        if ddp_util.is_main() and (self.model_source is None or not model_pt.is_file()):
            # no epoch of this run scored (a resumed finished stage, or only NaN Dice): the stage's best
            best = _best_or_last(self.out / "finetune", "finetune")
            ck = weights_only(load_checkpoint(best))
            self.model_source = {"stage": "finetune", "checkpoint": best.name, "step": ck.get("step"),
                                 "mean_fg_dice": ck.get("best_dice")}
            save_checkpoint(model_pt, {**ck, "model_source": self.model_source})
        ddp_util.barrier()
        src = self.model_source or {}
        self.log(f"[finetune] final model: {model_pt} (stage {src.get('stage')}, step {src.get('step')}, mean fg "
                 f"Dice {_fmt(src.get('mean_fg_dice'))} on {src.get('dice_source', 'validation')})")
        return res

    # ---------------------------------------------------------------- budget, model.pt, progress
    def measure_costs(self) -> None:
        """Warm-up: time a few real steps of each trained stage to run, on this machine
        (:func:`ahnet_fast.train.budget.measure_stage`), with throw-away copies of the networks."""
        import gc

        from ahnet_fast.data.loader import make_loader
        from ahnet_fast.train.budget import StageCost, format_duration, measure_stage

        c = self.cfg
        t0 = self.clock()
        val_vox = sum(int(v.image.size) for v in self.val_cases())
        budget = c.time_budget is not None or c.step_budget is not None
        for stage in [s for s in c.stages if s in ("2d", "decoder", "finetune")]:
            train_mode = None
            if stage == "2d":
                factory: Callable[[], nn.Module] = lambda: build_2d_model(c.model_2d, 3, self.k)  # noqa: E731
                patch, batch, ck = self._choose(factory, 3, tuple(c.patch_2d), c.batch_2d, (32, 32), (32, 32), "2d")
                _check_multiple(patch, (32, 32), "2D patch")
                model, shape, mode = factory(), (*patch, 3), "2.5d"
            else:
                factory, model, patch, batch, ck = self._model_3d(stage)
                shape, mode = tuple(patch), "3d"
                if stage == "decoder":
                    freeze_encoder(model, ENCODER_PREFIXES)
                    train_mode = FrozenBNTrainMode(ENCODER_PREFIXES)
            if ck:
                enable_activation_checkpointing(model)
            ds = PatchDataset([], self.k, self.intensity, shape, fg_ratio=c.fg_ratio, augment=c.augment,
                              seed=c.seed + 99, mode=mode, class_balanced=c.class_balanced, cases=self.train_cases())
            batches = iter(make_loader(ds, batch, 4, num_workers=0))
            per_step, eval_s = measure_stage(model, batches, self.device, c.amp, train_mode, timed_steps=2,
                                             eval_voxels=val_vox, clock=self.clock)
            n_params = sum(p.numel() for p in model.parameters())
            write_s = n_params * 4 * 4 / 200e6  # last.pt (weights + Adam moments) and best.pt at ~200 MB/s
            self.costs[stage] = StageCost(per_step * c.grad_accum, eval_s + write_s,
                                          min(c.steps_per_epoch, max(self.planned_steps(stage), 1)),
                                          4 if budget else 1)
            del model, batches, ds
            gc.collect()
        self.log("[plan] measured on this machine in " + format_duration(self.clock() - t0) + ": " + ", ".join(
            f"{s} {v.seconds_per_step:.2f} s/step (+{v.seconds_per_epoch:.1f} s per epoch for validation and "
            f"checkpoints)" for s, v in self.costs.items()))

    def describe(self) -> list[str]:
        """The start-up summary: model, backend, device, data, validation, intensity."""
        c = self.cfg
        from ahnet_fast.reference import AHNet as ReferenceAHNet

        cls = ahnet_class(c.fast)
        fast = cls is not ReferenceAHNet
        from_preset = c.preset in PRESETS and PRESETS[c.preset].get("fast") == c.fast and c.fast is not None
        why = (f"the {c.preset} preset; --reference for the plain-PyTorch model" if from_preset else
               {None: "the default: fast on CUDA, the reference on a CPU", True: "--fast", False: "--reference"}[c.fast])
        mc = self.model_config
        lines = [
            f"model: {'ahnet_fast.AHNet (fused fast AH-Net' if fast else 'ahnet_fast.reference.AHNet (plain PyTorch'}; "
            f"{why}), layers {','.join(map(str, mc.get('layers', ())))}, psp {mc.get('psp_block_num')}, "
            f"{mc.get('upsample_mode')} upsampling, {self.k} classes; 2D stage network: {c.model_2d}",
        ]
        if fast:
            from ahnet_fast.ops import get_backend

            lines.append(f"backend: {get_backend()} (AHNET_FAST_BACKEND; auto picks cuda/triton kernels per op and "
                         "falls back to the reference ops)")
        else:
            lines.append("backend: torch ops (the reference model does not use the fused kernels)")
        threads = f", {torch.get_num_threads()} torch threads" if self.device.type == "cpu" else ""
        why_amp = f" ({self.amp_why})" if self.amp_why else ""
        lines.append(f"device: {self.device}{threads}; precision {c.amp if c.amp != 'none' else 'fp32'}{why_amp}; "
                     f"{c.num_workers} data worker(s)")
        n_tr, n_val = len(self.spec.training), len([r for r in self.spec.validation if r.label])
        if n_val:
            how = ("windows of " + "x".join(map(str, c.val_window))) if c.val_window else \
                "windows of the training patch, as `segment` runs it (without its mirroring)"
            val = (f"{n_val} validation case(s): their Dice after every epoch ({how}) chooses best.pt and "
                   "model.pt")
        else:
            val = ("no validation cases: best.pt and model.pt are chosen on the Dice of the training batches "
                   "(optimistic; says nothing about unseen data; add a \"validation\" list to dataset.json)")
        lines.append(f"data: {self.spec.source}: {n_tr} training case(s); {val}")
        notes = [f"default for modality {self.spec.modality or 'unknown'}"] if self.intensity_is_default else []
        if self.intensity.mode == "window" and c.intensity is not None and c.intensity.stats == "training":
            lo, hi = self.intensity.window
            plo, phi = self.intensity.percentiles
            what = (f"mean +-{ZSCORE_CLIP:g} sd" if c.intensity.mode == "zscore" else f"percentiles {plo:g}-{phi:g}")
            notes.append(f"--intensity-stats training: {what} of the {len(self.spec.training)} "
                         f"training case(s)' foreground, pooled: [{lo:.6g}, {hi:.6g}] -> [0, 1] for every case, "
                         "recorded in model.pt for `segment`")
        elif self.intensity.mode == "percentile":
            notes.append("each case scaled by its own percentiles; --intensity-stats training for one fixed window")
        elif self.intensity.mode == "zscore":
            notes.append("each case scaled by its own foreground mean and standard deviation; "
                         "--intensity-stats training for one fixed window")
        lines.append(f"intensity: {self.intensity.to_dict()}" + (f" ({'; '.join(notes)})" if notes else ""))
        fg = f"{c.fg_ratio:.0%} centred on a foreground voxel"
        fg += (" (each class equally often, then a voxel of it; --no-class-balanced: classes by volume)"
               if c.class_balanced else " (classes by volume; --class-balanced: each class equally often)")
        lines.append(f"patches: {fg}, {1 - c.fg_ratio:.0%} anywhere (--fg-ratio)")
        lines.append("augmentation: " + _describe_augment(c.augment))
        if c.ema:
            lines.append(f"weights: an exponential moving average (decay {c.ema:g}, --ema) is validated and saved in "
                         "best.pt and model.pt, not the last step's weights")
        pre = self.preprocessing
        if "spacing" in pre:
            fmt = " x ".join
            own = pre.get("resampled_from", pre["spacing"])
            auto = ("; --spacing auto: halved where the cases allow, as AH-Net predicts at half resolution"
                    if c.spacing == "auto" else "")
            if self.spacing is None:
                lines.append(f"spacing: the cases' own ({fmt(f'{v:g}' for v in own)} mm, median"
                             + (f"; --spacing auto resamples only thick slices, and in-plane only while the "
                                f"largest case stays within {AUTO_MAX_VOXELS:,} voxels)" if auto else
                                "); --spacing H W D or auto to resample them"))
            else:
                lines.append(f"spacing: every case resampled to {fmt(f'{v:g}' for v in self.spacing)} mm (from "
                             f"{fmt(f'{v:g}' for v in own)} mm, median{auto}); validation on that grid; `segment` "
                             "resamples its inputs to it and the result back")
        return lines

    def describe_plan(self) -> str:
        from ahnet_fast.train.budget import format_duration

        c = self.cfg
        parts = []
        for s in c.stages:
            if s == "transfer":
                parts.append("transfer")
                continue
            n = self.planned_steps(s)
            cost = self.costs.get(s)
            parts.append(f"{s} {n} steps" + (f" (~{format_duration(cost.seconds(n))})" if cost else ""))
        text = "steps: " + ", ".join(parts)
        if self.costs:
            left = self.remaining_seconds()
            text += f"; estimated total {format_duration(left)} (ends about " \
                    f"{time.strftime('%H:%M', time.localtime(time.time() + left))})"
        if c.time_budget is not None:
            text += f"; time budget {format_duration(c.time_budget)}"
        if c.step_budget is not None:
            text += f"; step budget {c.step_budget}"
        return text

    def _fit(self, trainer: Trainer, stage: str, resume: bool) -> dict[str, Any]:
        return trainer.fit(resume=resume, deadline=self.stage_deadline(stage), clock=self.clock)

    def stage_deadline(self, stage: str) -> float | None:
        """Clock time stage ``stage`` must end by: the budget's end less the predicted time of later stages."""
        if self.run_end is None:
            return None
        later = [s for s in self.cfg.stages if STAGES.index(s) > STAGES.index(stage) and s in self.costs]
        return self.run_end - sum(self.costs[s].seconds(self.planned_steps(s)) for s in later)

    def planned_steps(self, stage: str) -> int:
        return {"2d": self.cfg.steps_2d, "decoder": self.cfg.steps_decoder,
                "finetune": self.cfg.steps_finetune}.get(stage, 0)

    def set_steps(self, plan: dict[str, int]) -> None:
        for stage, n in plan.items():
            setattr(self.cfg, {"2d": "steps_2d", "decoder": "steps_decoder", "finetune": "steps_finetune"}[stage], n)

    def remaining_seconds(self, stage: str | None = None, trainer: Trainer | None = None) -> float:
        """Predicted seconds to the end of the run (from the measured costs, corrected by the current
        stage's observed speed); NaN when nothing was measured."""
        if not self.costs:
            return float("nan")
        from ahnet_fast.train.budget import epochs_for

        scale = 1.0
        total = 0.0
        later_from = 0
        if stage is not None and trainer is not None:
            rec = getattr(trainer, "last_record", None) or {}
            cost = self.costs.get(stage)
            rate = rec.get("seconds_per_step")
            if cost is not None and rate:
                scale = rate / cost.seconds_per_step if cost.seconds_per_step > 0 else 1.0
                left = trainer.cfg.steps - trainer.step
                epochs_left = epochs_for(trainer.cfg.steps, trainer.cfg.steps_per_epoch) - trainer.epoch
                total += rate * left + max(0, epochs_left) * cost.seconds_per_epoch
            later_from = STAGES.index(stage) + 1
        for s in self.cfg.stages:
            if STAGES.index(s) >= later_from and s in self.costs:
                total += scale * self.costs[s].seconds(self.planned_steps(s))
        return total

    def _eta(self, trainer: Trainer) -> str:
        from ahnet_fast.train.budget import format_duration

        left = self.remaining_seconds(trainer.stage, trainer)
        if not math.isfinite(left):
            return ""
        if self.run_end is not None:
            budget_left = max(0.0, self.run_end - self.clock())
            if left > budget_left:  # the stages stop at the budget: it, not the plan, ends the run
                return f"run ETA {format_duration(budget_left)} (the time budget; the planned steps would take " \
                       f"{format_duration(left)} at this speed)"
            return f"run ETA {format_duration(left)} (budget left {format_duration(budget_left)})"
        return f"run ETA {format_duration(left)}"

    def _steps_sharing_the_time_saved(self, stage: str, done: int, rate: float, cost: StageCost) -> int | None:
        """Steps of ``stage`` when the stages from it on are planned again with its cost at the speed seen now
        (``rate`` s/step; one common factor on the configured steps, :func:`~ahnet_fast.train.budget.plan_steps`),
        so the time its faster steps save is shared with the later stages as the configured steps share the
        budget. The ``done`` steps count as if run at that speed. None when no later stage is planned."""
        base = self.base_steps
        later = [s for s in base if STAGES.index(s) > STAGES.index(stage) and s in self.costs]
        if stage not in base or not later or self.run_end is None:
            return None
        costs = {s: self.costs[s] for s in later}
        costs[stage] = dataclasses.replace(cost, seconds_per_step=rate)
        available = self.run_end - self.clock() + costs[stage].seconds(done)
        return plan_steps({s: base[s] for s in (stage, *later)}, costs, seconds=max(available, 0.0))[stage]

    def _fit_to_budget(self, trainer: Trainer, rec: dict[str, Any]) -> None:
        """Under a time budget, after an epoch: a stage running faster than its warm-up measured (the first
        steps of a process are the slowest; the machine was busy during the warm-up) is lengthened, by the
        share of the time saved that the configured steps give it (:meth:`_steps_sharing_the_time_saved`;
        the last stage takes all the time left); one running slower (a busy machine) is shortened to what
        fits, so that its learning rate still anneals before the budget ends it. The speed is the median
        of the stage's last three epochs."""
        cost = self.costs.get(trainer.stage)
        deadline = self.stage_deadline(trainer.stage)
        if rec.get("seconds_per_step"):
            self.rates.setdefault(trainer.stage, []).append(float(rec["seconds_per_step"]))
        if (not self.replan or cost is None or deadline is None or not self.rates.get(trainer.stage)
                or trainer.world > 1 or trainer.step >= trainer.cfg.steps):
            return
        rate = float(np.median(self.rates[trainer.stage][-3:]))
        spe = trainer.cfg.steps_per_epoch
        per_step = rate + cost.seconds_per_epoch / spe  # steps and their share of validation and checkpoints
        left = deadline - self.clock()
        todo = trainer.cfg.steps - trainer.step
        need = todo * rate + (-(-todo // spe)) * cost.seconds_per_epoch
        if left - need > max(0.15 * left, 2 * rate):
            steps = trainer.cfg.steps + int(0.85 * (left - need) / per_step)
            # a warm-up measured on a busy moment must not hand this stage the later stages' time: it keeps
            # the share the configured steps give it at the speed seen now (at most its deadline allows)
            shared = self._steps_sharing_the_time_saved(trainer.stage, trainer.step, rate, cost)
            if shared is not None:
                steps = min(steps, shared)
            if steps <= trainer.cfg.steps:  # ahead never shortens
                return
            why = "ahead of the plan"
        elif need > 1.1 * left:
            # never lengthens: near a stage's end its last epoch's validation cannot be spread over the steps
            steps = trainer.step + max(1, int(0.9 * left / per_step))
            if steps >= trainer.cfg.steps:
                return
            why = "behind the plan"
        else:
            return
        trainer.resize_steps(steps, f"{why} ({rate:.2f} s/step in the recent epochs, {cost.seconds_per_step:.2f} "
                                    f"in the warm-up; {format_duration(max(left, 0.0))} left for this stage)")
        self.set_steps({trainer.stage: steps})
        self.spe_fixed[trainer.stage] = spe  # the epoch length stays that of the run (resume compares it)
        _write_record(self, list(_read_saved_record(self.out).get("overrides", [])))

    def _on_epoch(self, trainer: Trainer, rec: dict[str, Any]) -> None:
        """After each epoch: model.pt follows the best 3D weights so far; progress.png is redrawn; under a
        time budget a stage is resized to the time it has left (:meth:`_fit_to_budget`)."""
        self._fit_to_budget(trainer, rec)
        if trainer.stage in ("decoder", "finetune") and rec.get("improved") and trainer.best_dice > self.model_best:
            self.model_best = trainer.best_dice
            self.model_source = {"stage": trainer.stage, "epoch": trainer.epoch, "step": trainer.step,
                                 "mean_fg_dice": trainer.best_dice, "dice_source": rec.get("dice_source")}
            save_checkpoint(self.out / "model.pt", {**weights_only(trainer._payload()),
                                                    "model_source": self.model_source})
        try:
            from ahnet_fast.train.report import write_progress_png

            write_progress_png(self.out, self.spec.class_names)
        except (OSError, ValueError, RuntimeError) as exc:  # a plot never stops training
            self.log(f"[{trainer.stage}] progress.png not written ({exc})")


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
                        "plateau_patience", "lr_schedule", "val_window", "sync_bn", "ema")
#: the per-stage TrainConfig fields, named as the user sets them
_STAGE_OPTION_NAMES = {
    "2d": {"lr": "--lr-2d", "batch_size": "--batch-2d", "steps": "--steps-2d"},
    "decoder": {"lr": "--lr-3d", "batch_size": "--batch-3d", "steps": "--steps-decoder"},
    "finetune": {"lr": "--lr-3d", "batch_size": "--batch-3d", "steps": "--steps-finetune"},
}


def _describe_augment(a: AugmentConfig) -> str:
    """One line for the start-up summary: what the patches go through."""
    if not a.enabled:
        return "none (--no-augment)"
    parts = []
    if a.rotation or a.scale:
        geo = " and ".join(t for t in (f"rotation up to {a.rotation:g} deg" if a.rotation else "",
                                       f"scaling up to {a.scale:g}" if a.scale else "") if t)
        parts.append(f"in-plane {geo} (probability {a.prob:g}, --aug-rotation/--aug-scale)")
    if a.flip_axes:
        parts.append("mirroring " + ", ".join("HW"[i] for i in a.flip_axes) + " (also at test time in `segment`)")
    if a.intensity:
        kinds = ", ".join(t for t in (f"brightness 1+-{a.brightness:g}" if a.brightness else "",
                                      f"contrast 1+-{a.contrast:g}" if a.contrast else "",
                                      f"gamma 1/{1 + a.gamma:g}..{1 + a.gamma:g}" if a.gamma else "") if t)
        parts.append(f"intensity {kinds} (each with probability {a.intensity_prob:g})")
    return "; ".join(parts) or "none"


#: RecipeConfig fields that decide each stage's result (compared with recipe.json on --resume)
_COMMON_RECIPE_FIELDS = ("data", "num_classes", "intensity", "spacing", "fg_ratio", "class_balanced", "augment", "loss",
                         "focal_gamma", "plateau_patience", "amp", "grad_accum", "seed", "steps_per_epoch",
                         "lr_schedule", "ema", "sync_bn", "val_window", "checkpointing", "max_memory")
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
    "finetune": tuple(f"finetune/{f}" for f in _TRAINER_FILES),
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
    record = _upgrade_legacy_record(dict(record), data)
    kw: dict[str, Any] = {k: v for k, v in record.items() if k in known}
    for k in ("patch_2d", "patch_3d", "val_window", "spacing"):
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


def _model_source(path: Path) -> dict[str, Any] | None:
    """What model.pt at ``path`` records about itself (stage, step, Dice); None without a readable one."""
    if not path.is_file():
        return None
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # unreadable: replaced by this run's first best; segment would report it
        return None
    if not isinstance(ck, dict):
        return None
    src = ck.get("model_source")
    if isinstance(src, dict):
        return src
    # a model.pt of an earlier version: a copy of finetune's best.pt
    return {"stage": ck.get("stage"), "step": ck.get("step"), "mean_fg_dice": ck.get("best_dice")}


def _existing_outputs(out: Path, stages: Sequence[str]) -> list[str]:
    names = [name for stage in stages for name in _STAGE_OUTPUTS[stage] if (out / name).exists()]
    # model.pt is the result of the 3D stage that wrote it (decoder or finetune)
    src = _model_source(out / "model.pt")
    if src is not None and src.get("stage") in stages:
        names.append("model.pt")
    return names


def _check_resume_settings(out: Path, cfg: RecipeConfig, overrides: set[str]) -> dict[str, list[Any]]:
    """Settings that differ from the run being resumed (recipe.json); refused unless overridden."""
    saved = _read_saved_record(out)
    if not saved:
        return {}
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
               progress: bool = True, overwrite: bool = False, overrides: Sequence[str] = (),
               estimate: bool = False, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Run ``cfg.stages`` in order (module docstring).

    Args:
        resume: continue the run in ``cfg.out_dir`` exactly; settings that differ from its
            ``recipe.json`` (and each stage checkpoint's) are refused unless named in ``overrides``.
        overwrite: without ``resume``, replace the outputs of ``cfg.stages`` already in
            ``out_dir`` (otherwise their presence is an error: nothing is silently replaced and
            logs of two runs are never mixed).
        overrides: :func:`recipe_fields` that may change on resume; changes are logged.
        estimate: time a few steps of each stage first (as a time budget does) to print the run's
            estimated duration at the start and its remaining time after every epoch.
        clock: the clock of budgets and estimates (tests inject a fake one).

    Returns:
        ``{"stages": {name: result with "seconds"}, "out_dir": ..., "num_classes": ...}``.
    """
    from ahnet_fast._atomic import clean_stale_temps

    if log is None:
        from tqdm.auto import tqdm

        log = lambda m: tqdm.write(m)  # noqa: E731
    if not ddp_util.is_main():
        log, progress = (lambda m: None), False  # rank 0 alone reports
    unknown = sorted(set(overrides) - set(recipe_fields()))
    if unknown:
        raise ValueError(f"--override: unknown setting(s) {unknown}; accepted: {', '.join(recipe_fields())}")
    # "--amp auto" becomes what the device computes natively before anything else sees it: the
    # resume check, the warm-up measurement, the stages and recipe.json all see bf16 or none
    amp, amp_why = resolve_amp(cfg.amp, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if amp != cfg.amp:
        cfg = dataclasses.replace(cfg, amp=amp)
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
    r = _Recipe(cfg, log, progress, overrides=overrides, clock=clock, amp_why=amp_why)
    saved = _read_saved_record(r.out) if resume else {}
    src = _model_source(r.out / "model.pt")  # a model.pt still here (resumed, or an earlier stage's): the bar
    if src is not None:
        r.model_source, r.model_best = src, float(src.get("mean_fg_dice") or -math.inf)
    for line in r.describe():
        log("[run] " + line)
    _plan_budget(r, resume, saved, estimate)
    log("[run] " + r.describe_plan())
    history: list[Any] = list(saved.get("overrides", [])) if resume else []
    if changed:
        history.append({"time": time.time(), "changes": changed})
        log("--override: " + ", ".join(f"{f} {a} -> {b}" for f, (a, b) in changed.items()))
    if ddp_util.is_main():
        for folder in [r.out, *(r.out / s for s in STAGES)]:
            clean_stale_temps(folder)  # left by a run killed with SIGKILL
    _write_record(r, history)
    results: dict[str, Any] = {}
    t_run = time.time()
    for stage in cfg.stages:
        if r.replan and stage in ("decoder", "finetune"):
            _replan(r, stage)
            _write_record(r, history)
        t0 = time.time()
        res = getattr(r, f"stage_{stage}")(resume)
        res["seconds"] = time.time() - t0
        results[stage] = res
        _write_record(r, history)  # the steps a re-plan may have changed
        log(f"[{stage}] done in {res['seconds']:.1f} s" + (
            f", best mean foreground Dice {res['best_dice']:.3f}" if "best_dice" in res else "") + (
            f" (stopped by the time budget at step {res['steps']})" if res.get("stopped_by_deadline") else ""))
    if ddp_util.is_main():
        _write_reports(r, results, time.time() - t_run)
    return {"stages": results, "out_dir": str(r.out), "num_classes": r.k, "intensity": r.intensity}


def _read_saved_record(out: Path) -> dict[str, Any]:
    path = out / "recipe.json"
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the settings of the run to resume ({exc})") from exc
    if not isinstance(rec, dict):
        return {}
    return _upgrade_legacy_record(rec, rec.get("data"))


def _upgrade_legacy_record(rec: dict[str, Any], data: str | None) -> dict[str, Any]:
    """``rec`` (a ``recipe.json`` record, changed in place) with the entries older versions wrote
    differently or left out read as what those runs did; ``data``: the run's dataset.json (for the
    modality's default of then)."""
    if isinstance(rec.get("augment"), dict):
        # a run recorded before an augmentation setting existed ran with its default (off): read so,
        # an earlier run's record compares equal to the same settings written now
        rec["augment"] = {**AugmentConfig().to_dict(), **rec["augment"]}
    if "intensity" in rec and rec["intensity"] is None and isinstance(data, str):
        # a run recorded before the resolved normalisation was written used the modality's default of then
        rec["intensity"] = _intensity_default_before_zscore(data).to_dict()
    if isinstance(rec.get("intensity"), dict):
        # likewise a run recorded before --intensity-stats scaled each case by its own statistics
        rec["intensity"] = {"stats": "case", **rec["intensity"]}
    return rec


def _intensity_default_before_zscore(data: str) -> IntensityConfig:
    """What a run recorded with ``intensity: null`` normalised with: the default of the versions that
    wrote such records, the CT window for CT and per-case percentiles for everything else (the
    foreground z-score became the default for non-CT data later, and runs now record the resolved
    setting)."""
    try:
        modality = read_dataset(data).modality
    except (OSError, ValueError):
        modality = None  # the data is gone: resuming fails on it anyway, with its own message
    now = IntensityConfig.for_modality(modality)
    return now if now.mode == "ct" else IntensityConfig(mode="percentile")


#: seconds kept at the end of a time budget for the transfer stage, model.pt, summary.json and progress.png
def _reserve(budget: float) -> float:
    return min(60.0, 5.0 + 0.02 * budget)


def _plan_budget(r: _Recipe, resume: bool, saved: dict[str, Any], estimate: bool) -> None:
    """Measure (or take the resumed run's measurements), then plan steps for a budget (module docstring)."""
    c = r.cfg
    trained = [s for s in c.stages if s in ("2d", "decoder", "finetune")]
    plan_rec = saved.get("plan") if resume else None
    if ddp_util.is_main():
        if isinstance(plan_rec, dict) and plan_rec.get("costs"):
            r.costs = {s: StageCost(**v) for s, v in plan_rec["costs"].items() if s in trained}
        if (c.time_budget is not None or estimate) and any(s not in r.costs for s in trained):
            r.measure_costs()
    r.costs = ddp_util.broadcast_object(r.costs)
    r.base_steps = {s: r.planned_steps(s) for s in trained}
    if isinstance(plan_rec, dict) and isinstance(plan_rec.get("base_steps"), dict):
        r.base_steps = {s: int(plan_rec["base_steps"].get(s, r.base_steps[s])) for s in trained}
    if isinstance(plan_rec, dict) and isinstance(plan_rec.get("steps_per_epoch"), dict):
        r.spe_fixed = {s: int(v) for s, v in plan_rec["steps_per_epoch"].items()}
    if not trained:
        return
    if c.time_budget is not None:
        r.run_end = r.t_start + c.time_budget - _reserve(c.time_budget)
    if resume:
        return  # the resumed run's steps (recipe.json) stand; a time budget bounds this invocation
    if c.step_budget is not None:
        plan = plan_steps(r.base_steps, steps=c.step_budget)
        r.set_steps(plan)
        r.log(f"[plan] step budget {c.step_budget}: " + ", ".join(f"{s} {n}" for s, n in plan.items()) +
              " steps (the configured steps' proportions)")
    elif c.time_budget is not None:
        assert r.run_end is not None
        available = r.run_end - r.clock()
        plan = ddp_util.broadcast_object(plan_steps(r.base_steps, r.costs, seconds=available))
        r.set_steps(plan)
        r.replan = True
        r.log(f"[plan] time budget {format_duration(c.time_budget)}, {format_duration(available)} left for "
              "training: " + ", ".join(f"{s} {n} steps" for s, n in plan.items()) +
              f" (the configured {', '.join(str(n) for n in r.base_steps.values())} scaled to fit; re-planned at "
              "each stage start)")


def _replan(r: _Recipe, stage: str) -> None:
    """At a stage start: fit the steps of this and the later stages into the time left."""
    assert r.run_end is not None
    rest = {s: n for s, n in r.base_steps.items() if STAGES.index(s) >= STAGES.index(stage) and s in r.costs}
    if not rest:
        return
    available = r.run_end - r.clock()
    plan = ddp_util.broadcast_object(plan_steps(rest, r.costs, seconds=max(available, 0.0)))
    before = {s: r.planned_steps(s) for s in plan}
    r.set_steps(plan)
    if plan != before:
        r.log(f"[plan] {format_duration(available)} left: " + ", ".join(
            f"{s} {before[s]} -> {n} steps" for s, n in plan.items()))


def _write_record(r: _Recipe, history: list[Any]) -> None:
    """recipe.json: this run's settings, merged with those of stages run earlier into the folder."""
    from ahnet_fast._atomic import atomic_write_text

    if not ddp_util.is_main():
        return
    record = _merged_record(r.out, r.cfg)
    record["overrides"] = history
    record["plan"] = {"costs": {s: v.to_dict() for s, v in r.costs.items()},
                      "base_steps": r.base_steps, "steps_per_epoch": r.spe_fixed}
    atomic_write_text(r.out / "recipe.json", json.dumps(_plain(record), indent=2, default=str))


def _merged_record(out: Path, cfg: RecipeConfig) -> dict[str, Any]:
    """This run's settings; the stage-specific settings of stages not run now stay those recorded
    for them (a partial re-run such as ``--stages finetune`` keeps what the other stages ran with),
    and ``stage_settings`` holds, per stage, every setting it last ran with."""
    now = _recipe_record(cfg)
    saved = _read_saved_record(out)
    record = dict(now)
    mine = {f for st in cfg.stages for f in _STAGE_RECIPE_FIELDS[st]}
    if saved:
        for stage in STAGES:
            if stage in cfg.stages:
                continue
            for f in _STAGE_RECIPE_FIELDS[stage]:
                if f in saved and f not in mine:
                    record[f] = saved[f]
        ran = set(saved.get("stages") or []) | set(cfg.stages)
        record["stages"] = [s for s in STAGES if s in ran]
    per_stage = dict(saved.get("stage_settings") or {}) if saved else {}
    for stage in cfg.stages:
        per_stage[stage] = {f: now.get(f) for f in (*_COMMON_RECIPE_FIELDS, *_STAGE_RECIPE_FIELDS[stage],
                                                     "preset", "time_budget", "step_budget", "device")}
        per_stage[stage]["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    record["stage_settings"] = per_stage
    return record


def _write_reports(r: _Recipe, results: dict[str, Any], seconds: float) -> None:
    from ahnet_fast.train.report import write_progress_png, write_summary

    c = r.cfg
    stages = {}
    for s, res in results.items():
        stages[s] = {k: res.get(k) for k in ("steps", "epochs", "finished", "stopped_by_deadline", "best_dice",
                                             "seconds") if k in res}
        if s in r.costs:
            stages[s]["planned_steps"] = r.planned_steps(s)
            stages[s]["measured_seconds_per_step"] = r.costs[s].seconds_per_step
    summary = {
        "out_dir": str(r.out.resolve()), "preset": c.preset, "device": str(r.device),
        "time_budget_s": c.time_budget, "step_budget": c.step_budget, "seconds_this_invocation": seconds,
        "run": r.describe(), "class_names": r.spec.class_names, "num_classes": r.k,
        "training_cases": len(r.spec.training),
        "validation_cases": len([v for v in r.spec.validation if v.label]),
        "model": str(r.out / "model.pt") if (r.out / "model.pt").is_file() else None,
        "model_source": r.model_source, "stages": stages,
    }
    try:
        write_summary(r.out, summary)
        write_progress_png(r.out, r.spec.class_names)
    except (OSError, ValueError, RuntimeError) as exc:
        r.log(f"[run] summary.json / progress.png not written ({exc})")
        return
    r.log(f"[run] summary: {r.out / 'summary.json'}; curves: {r.out / 'progress.png'}")


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
