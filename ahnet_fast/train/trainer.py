"""One training stage: loop, mixed precision, accumulation, checkpoints, validation, logs.

:class:`Trainer` trains a model on a :class:`~ahnet_fast.data.loader.PatchDataset`
for a fixed number of optimizer steps, grouped into epochs of
``steps_per_epoch`` steps. Per step it draws ``grad_accum`` micro-batches of
``batch_size`` patches (sample indices ``(step * grad_accum + m) * batch_size + i``,
so the stream is independent of the worker count and of interruptions).

* Optimiser: Adam (betas 0.9/0.999, eps 1e-8), the paper's settings; torch's fused kernel on CPU and CUDA
  (:func:`ahnet_fast.train.optim.make_adam`).
* Loss: cross-entropy, switched to the focal loss once the epoch loss
  plateaus (:class:`LossSchedule`); or ``"ce"`` / ``"focal"`` throughout.
* Mixed precision: ``amp="bf16"`` or ``"fp16"`` autocast; fp16 uses a GradScaler.
* Weight averaging: ``ema=0.99`` keeps an exponential moving average of the weights and
  BatchNorm statistics, updated after every optimizer step; validation, ``best.pt`` and the
  ``model`` entry of every checkpoint use the average (the trained weights travel in
  ``last.pt`` as ``train_model`` for a resume).
* Activation checkpointing: ``checkpointing=True``.
* Checkpoints (atomic, :mod:`ahnet_fast.train.checkpoint`): ``last.pt`` every
  ``ckpt_every`` steps and at each epoch end; ``best.pt`` whenever the
  validation mean foreground Dice improves. ``resume=True`` restores model,
  optimiser, scaler, loss schedule, RNG states and the step, and continues
  exactly where the checkpoint was taken. Only ``last.pt`` of an unfinished
  stage carries what a resume needs (optimizer moments, scaler, RNG states,
  the running epoch sums: :data:`RESUME_KEYS`); ``best.pt`` and the ``last.pt``
  of a finished stage hold the weights and the run's metadata only.
* Time limits: ``fit(deadline=...)`` ends the stage cleanly when the clock
  passes the deadline (the partial epoch is closed, validated and saved).
* Logs: a tqdm bar, one summary line per epoch (loss, Dice per class, speed,
  peak memory) and a JSON-lines file ``log.jsonl`` (one object per epoch and
  per event).
* Several processes (torchrun / ``ahnet-fast train --nproc``, see
  :mod:`ahnet_fast.train.distributed`): DistributedDataParallel, ``batch_size``
  per process over a rank split of the same sample stream, ``no_sync`` on the
  non-final accumulation micro-steps, optional synchronized BatchNorm
  (``sync_bn``), rank 0 alone logs and writes checkpoints, every rank resumes
  from ``last.pt``, validation cases split over the ranks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ahnet_fast.data.loader import PatchDataset, make_loader
from ahnet_fast.train import distributed as ddp_util
from ahnet_fast.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from ahnet_fast.train.models import enable_activation_checkpointing
from ahnet_fast.train.optim import load_optimizer_state, make_adam
from ahnet_fast.train.report import json_safe
from ahnet_fast.losses import dice_ce_loss

__all__ = ["TrainConfig", "LossSchedule", "Trainer", "ValidationCase", "check_ema_decay", "dice_from_counts",
           "peak_memory_bytes", "RESUME_KEYS", "weights_only"]

#: checkpoint entries only a resume of an unfinished stage needs (the bulk of a checkpoint: Adam keeps two
#: moments per parameter; with ``ema``, the trained weights, since ``model`` holds their average)
RESUME_KEYS = ("optimizer", "scaler", "rng", "epoch_acc", "train_model")


def weights_only(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` without :data:`RESUME_KEYS` (weights, config and metadata only)."""
    return {k: v for k, v in payload.items() if k not in RESUME_KEYS}


#: values of ``loss``: the paper's schedule, its two parts alone, and cross-entropy + soft Dice
LOSSES = ("ce_then_focal", "ce", "focal", "dice_ce")


def check_ema_decay(decay: float, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``decay`` is a weight-average decay in [0, 1) (0: off)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{name} {decay}: the weight average's decay must be in [0, 1) (e.g. 0.99), 0 for off")


@dataclass
class TrainConfig:
    """Settings of one stage (see module docstring).

    Attributes:
        steps: total optimizer steps of the stage.
        steps_per_epoch: steps between summaries/validation/checkpoints.
        batch_size: patches per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: Adam learning rate (paper: 5e-4 for 2D, 1e-3 for 3D).
        weight_decay: Adam weight decay.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.
        checkpointing: activation checkpointing.
        loss: ``"ce_then_focal"`` (paper), ``"ce"``, ``"focal"`` or ``"dice_ce"`` (cross-entropy +
            soft Dice, :func:`ahnet_fast.losses.dice_ce_loss`).
        focal_gamma: focal loss gamma.
        plateau_patience: epochs without ``plateau_min_delta`` relative
            improvement of the epoch loss before switching to the focal loss.
        plateau_min_delta: relative improvement that counts as progress.
        ckpt_every: also write ``last.pt`` every this many steps (0: epoch ends only).
        num_workers: DataLoader workers.
        seed: seed of the sample stream and of torch's RNG.
        device: ``"cpu"``, ``"cuda"``, ... (None: cuda if available).
        val_window: sliding-window size for validation (None: the training patch of a 3D dataset,
            the window `ahnet-fast segment` uses by default; else the whole volume).
        clip_grad: max gradient norm (0: off).
        lr_schedule: ``"constant"`` (paper) or ``"cosine"`` (decays to 0 at the last
            step; a function of the step only, so resuming needs no extra state).
        sync_bn: with several processes, BatchNorm statistics over the global batch
            (:func:`ahnet_fast.nn.convert_sync_batchnorm`); ignored for one process.
        ema: decay of an exponential moving average of the weights and BatchNorm statistics
            (0: off). The decay of step ``n`` of the stage is ``min(ema, (1 + n) / (10 + n))``, so the
            average follows the weights closely while they change fast at the start of a stage.
    """

    steps: int
    steps_per_epoch: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    amp: str = "none"
    checkpointing: bool = False
    loss: str = "ce_then_focal"
    focal_gamma: float = 2.0
    plateau_patience: int = 2
    plateau_min_delta: float = 0.02
    ckpt_every: int = 0
    num_workers: int = 0
    seed: int = 0
    device: str | None = None
    val_window: tuple[int, int, int] | None = None
    clip_grad: float = 0.0
    lr_schedule: str = "constant"
    sync_bn: bool = False
    ema: float = 0.0

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if self.lr_schedule == "cosine" and self.steps > 0:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / self.steps))
        return self.lr

    def __post_init__(self) -> None:
        if self.steps < 0 or self.steps_per_epoch < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                f"need steps >= 0, steps_per_epoch >= 1, batch_size >= 1, grad_accum >= 1; got "
                f"{self.steps}, {self.steps_per_epoch}, {self.batch_size}, {self.grad_accum}"
            )
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        check_ema_decay(self.ema, "ema")


class LossSchedule:
    """Cross-entropy first, focal loss once the epoch loss stops improving.

    State (saved in checkpoints): current loss name, best epoch loss, epochs
    without progress, and the step of the switch.
    """

    def __init__(self, mode: str, patience: int, min_delta: float) -> None:
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.current = mode if mode in ("focal", "dice_ce") else "ce"
        self.best = math.inf
        self.bad_epochs = 0
        self.switched_at: int | None = None

    def end_epoch(self, epoch_loss: float, step: int) -> bool:
        """Record an epoch's mean loss; True when this call switched to focal."""
        if self.mode != "ce_then_focal" or self.current == "focal":
            return False
        if epoch_loss < self.best * (1 - self.min_delta):
            self.best = epoch_loss
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.current = "focal"
            self.switched_at = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "current": self.current, "best": self.best, "bad_epochs": self.bad_epochs,
                "switched_at": self.switched_at}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mode, self.current = d["mode"], d["current"]
        self.best, self.bad_epochs, self.switched_at = float(d["best"]), int(d["bad_epochs"]), d["switched_at"]


@dataclass
class ValidationCase:
    """A whole volume for validation: ``image (H, W, D)`` float32, ``label (H, W, D)`` ints."""

    image: np.ndarray
    label: np.ndarray
    name: str = "case"


def dice_from_counts(counts: np.ndarray) -> list[float]:
    """Per-class Dice from a ``(K, 3)`` array of (tp, fp, fn); NaN where a class is absent in both."""
    out = []
    for tp, fp, fn in counts:
        den = 2 * tp + fp + fn
        out.append(float(2 * tp / den) if den > 0 else float("nan"))
    return out


def _confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> np.ndarray:
    """(K, 3) tp/fp/fn counts of integer maps of equal shape."""
    idx = (target.reshape(-1).long() * k + pred.reshape(-1).long())
    cm = torch.bincount(idx, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)
    tp = np.diag(cm)
    return np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], axis=1)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _fmt_dice(d: Sequence[float]) -> str:
    return "[" + ", ".join("nan" if math.isnan(v) else f"{v:.3f}" for v in d) + "]"


class Trainer:
    """Trains one stage (module docstring).

    Args:
        model: the network (``(B, C, *spatial) -> (B, K, *spatial)``).
        model_config: constructor kwargs recorded in checkpoints (with
            ``model_kind`` and ``num_classes`` in ``extra`` if useful).
        dataset: training patches.
        config: :class:`TrainConfig`.
        out_dir: where ``last.pt``, ``best.pt`` and ``log.jsonl`` go.
        num_classes: K.
        val_cases: whole volumes for validation Dice (may be empty: then the
            Dice of the training batches is reported and ``best.pt`` follows the
            training Dice).
        predict: ``predict(model, image (H, W, D)) -> logits (K, H, W, D)`` for
            validation (default: 3D sliding window).
        train_mode: called instead of ``model.train()`` (e.g. to keep a frozen
            encoder's BatchNorms in eval mode).
        stage: name recorded in checkpoints and logs.
        extra: more entries for every checkpoint (e.g. preprocessing settings).
        log: callable for human-readable lines (default: print to stderr via tqdm).
        progress: show a tqdm bar.
        overrides: :class:`TrainConfig` fields that may differ from the checkpoint's on
            resume (the change is logged); any other difference refuses the resume, since
            the continued run would no longer be the one that was started.
        option_names: user-facing names of fields for messages (e.g. ``{"lr": "--lr-3d"}``).
        on_epoch: called as ``on_epoch(trainer, record)`` after each epoch's checkpoints are on disk
            (``record``: the epoch's log.jsonl entry; ``record["improved"]`` says whether best.pt was
            just written). The recipe keeps model.pt, summary.json and progress.png current with it.
        eta: returns text appended to each epoch line (e.g. the whole run's remaining time).
    """

    def __init__(
        self,
        model: nn.Module,
        model_config: dict[str, Any],
        dataset: PatchDataset,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        num_classes: int,
        val_cases: Sequence[ValidationCase] = (),
        predict: Callable[[nn.Module, np.ndarray], torch.Tensor] | None = None,
        train_mode: Callable[[nn.Module], None] | None = None,
        stage: str = "train",
        extra: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        progress: bool = True,
        overrides: Collection[str] = (),
        option_names: dict[str, str] | None = None,
        on_epoch: Callable[["Trainer", dict[str, Any]], None] | None = None,
        eta: Callable[["Trainer"], str] | None = None,
    ) -> None:
        self.cfg = config
        self.overrides = set(overrides)
        self.option_names = dict(option_names or {})
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.model_config = dict(model_config)
        self.dataset = dataset
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.k = num_classes
        self.val_cases = list(val_cases)
        self.predict = predict or self._predict_3d
        self.train_mode = train_mode or (lambda m: m.train())
        self.stage = stage
        self.extra = dict(extra or {})
        self.progress = progress
        self._log = log
        self.on_epoch = on_epoch
        self.eta = eta
        self.stopped_by_deadline = False
        self.last_record: dict[str, Any] | None = None  # the latest epoch's log record
        if config.checkpointing:
            enable_activation_checkpointing(self.model)
        # several processes: `self.net` (what the training forward calls) is the DDP wrapper;
        # `self.model` stays the plain module (state_dict keys, validation without collectives)
        self.rank, self.world = ddp_util.rank(), ddp_util.world_size()
        self.net: nn.Module = self.model
        if self.world > 1:
            if config.sync_bn:
                from ahnet_fast.nn.sync import convert_sync_batchnorm

                convert_sync_batchnorm(self.model)
            # find_unused_parameters: the 2D networks hold parameters their forward never uses
            # (one graph walk per step; negligible next to the convs)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = make_adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.schedule = LossSchedule(config.loss, config.plateau_patience, config.plateau_min_delta)
        from ahnet_fast.losses import FocalLoss

        self.focal = FocalLoss(mode="softmax", gamma=config.focal_gamma).to(self.device)
        self.step = 0
        self.epoch = 0
        self.best_dice = -math.inf
        self.history: list[dict[str, Any]] = []
        self.finished = False
        self._acc = self._new_acc()
        # the weight average (TrainConfig.ema): a copy of every state-dict entry, taken after any
        # SyncBatchNorm conversion so that its keys are the model's own
        self._ema: dict[str, torch.Tensor] | None = None
        if config.ema > 0:
            live = self.model.state_dict()  # views of the parameters and buffers, updated in place
            self._ema = {k: v.detach().clone() for k, v in live.items()}
            # paired once: the per-step update walks no module tree
            self._ema_float = ([e for e in self._ema.values() if e.is_floating_point()],
                               [live[k] for k, e in self._ema.items() if e.is_floating_point()])
            self._ema_count = [(e, live[k]) for k, e in self._ema.items() if not e.is_floating_point()]

    def _new_acc(self) -> dict[str, Any]:
        """Running sums of the current epoch (saved in checkpoints so a resumed epoch sums the same)."""
        return {"loss": 0.0, "n": 0, "counts": np.zeros((self.k, 3), np.int64), "samples": 0}

    # ------------------------------------------------------------------ logging
    def log(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self._log is not None:
            self._log(msg)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _jsonl(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = json_safe({"time": time.time(), "stage": self.stage, **record})
        path = self.out / "log.jsonl"
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record, default=_json_default, allow_nan=False) + "\n")
        except OSError as exc:  # a full disk: name the file (the bare errno does not)
            raise OSError(f"{path}: cannot append to the training log ({exc.strerror or exc})") from exc

    # ------------------------------------------------------------------ checkpoints
    def _payload(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config,
            **self._weights(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": capture_rng(),
            "step": self.step,
            "epoch": self.epoch,
            "stage": self.stage,
            "best_dice": self.best_dice,
            "finished": self.finished,
            "train_config": _plain(asdict(self.cfg)),
            "history": self.history,
            "epoch_acc": {"loss": self._acc["loss"], "n": self._acc["n"],
                          "counts": torch.from_numpy(self._acc["counts"].copy()), "samples": self._acc["samples"]},
            **self._inference_meta(),
            **self.extra,
        }

    def _weights(self) -> dict[str, Any]:
        """``model`` and, with a weight average, ``train_model`` entries of a checkpoint."""
        if self._ema is None:
            return {"model": self.model.state_dict()}
        return {"model": self._ema, "train_model": self.model.state_dict()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        """One step of the weight average (after the optimizer step ``self.step``)."""
        if self._ema is None:
            return
        decay = min(self.cfg.ema, (1.0 + self.step) / (10.0 + self.step))
        torch._foreach_lerp_(*self._ema_float, 1.0 - decay)
        for e, v in self._ema_count:  # BatchNorm's num_batches_tracked: the model's own count
            e.copy_(v)

    @contextlib.contextmanager
    def _averaged(self):
        """The weight average loaded into the model for the block (validation), the trained
        weights restored afterwards (in place: the optimizer keeps its parameters)."""
        if self._ema is None:
            yield
            return
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self._ema)
        try:
            yield
        finally:
            self.model.load_state_dict(trained)

    def _inference_meta(self) -> dict[str, Any]:
        """What `ahnet-fast segment` reads from a 3D checkpoint (ahnet_fast.infer.segment): the
        training patch (its default window) and the augmentation (its test-time mirroring)."""
        ds = self.dataset
        if getattr(ds, "mode", None) != "3d":
            return {}
        meta: dict[str, Any] = {"patch_size": list(ds.patch_size)}
        augment = getattr(ds, "augment", None)
        if augment is not None:
            meta["augment"] = augment.to_dict()
        return meta

    def save(self, name: str = "last.pt") -> Path:
        """Write a checkpoint (rank 0 only with several processes; the path is returned on every rank).

        ``last.pt`` of an unfinished stage is complete (a resume continues exactly from it); ``best.pt``
        and the ``last.pt`` of a finished stage hold weights and metadata only (:func:`weights_only`).
        """
        if self.rank != 0:
            return self.out / name
        payload = self._payload()
        if name != "last.pt" or self.finished:
            payload = weights_only(payload)
        return save_checkpoint(self.out / name, payload)

    def load(self, path: str | os.PathLike) -> None:
        """Restore everything a resume needs from ``path``."""
        ck = load_checkpoint(path, map_location=self.device)
        if ck.get("stage") not in (None, self.stage):
            raise ValueError(f"{path}: checkpoint of stage {ck.get('stage')!r}, cannot resume stage {self.stage!r}")
        self._check_same_run(path, ck)
        # with a weight average, "model" is the average and "train_model" the trained weights
        self.model.load_state_dict(ck.get("train_model", ck["model"]))
        if self._ema is not None:
            src = ck["model"] if "train_model" in ck else self.model.state_dict()
            for k, e in self._ema.items():
                e.copy_(src[k])
        self.step, self.epoch = int(ck["step"]), int(ck["epoch"])
        self.schedule.load_state_dict(ck["schedule"])
        if "optimizer" in ck:
            load_optimizer_state(self.optimizer, ck["optimizer"])
            self.scaler.load_state_dict(ck["scaler"])
            restore_rng(ck["rng"])
        elif self.step < self.cfg.steps:
            # a finished stage keeps weights only; continuing it (--override of its steps) restarts Adam
            self.log(f"[{self.stage}] {path} is the checkpoint of a finished stage (weights only): continuing it "
                     "restarts the optimizer's moments")
            self._jsonl({"event": "optimizer_restarted", "step": self.step})
        self.best_dice = float(ck["best_dice"])
        self.history = list(ck.get("history", []))
        self.finished = bool(ck.get("finished", False)) and self.step >= self.cfg.steps
        acc = ck.get("epoch_acc")
        if acc is not None:
            self._acc = {"loss": float(acc["loss"]), "n": int(acc["n"]),
                         "counts": acc["counts"].cpu().numpy().astype(np.int64), "samples": int(acc["samples"])}

    def _check_same_run(self, path: str | os.PathLike, ck: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint of another model, or with changed settings not overridden."""
        saved_model = _comparable(ck.get("model_config"))
        if "model_config" in ck and saved_model != _comparable(self.model_config):
            diff = _differences(saved_model, _comparable(self.model_config))
            raise ValueError(
                f"{path}: cannot resume: the checkpoint's model differs from this run's ({diff}); resume with "
                "the model options it was trained with (--layers, --psp, --upsample, ...) or train into a new --out"
            )
        saved = ck.get("train_config")
        if not isinstance(saved, dict):
            return  # written before train_config was recorded: nothing to compare
        now = _comparable(asdict(self.cfg))
        saved = _comparable(saved)
        changed = {k: (saved.get(k), now[k]) for k in now
                   if k not in _RESUME_FREE and k in saved and saved.get(k) != now[k]}
        refused = {k: v for k, v in changed.items() if k not in self.overrides}
        if refused:
            names = ", ".join(f"{self.option_names.get(k, k)} {a} -> {b}" for k, (a, b) in refused.items())
            keys = ",".join(self.option_names.get(k, k).lstrip("-").replace("-", "_") for k in refused)
            raise ValueError(
                f"{path}: cannot resume with changed settings ({names}): the result would match neither run; "
                f"give the original values, or --override {keys} to change them on purpose"
            )
        if changed:
            text = ", ".join(f"{self.option_names.get(k, k)} {a} -> {b}" for k, (a, b) in changed.items())
            self.log(f"[{self.stage}] resuming with overridden settings: {text}")
            self._jsonl({"event": "override", "step": int(ck.get("step", 0)),
                         "changes": {k: [a, b] for k, (a, b) in changed.items()}})

    def _reconcile_best(self, last: Path) -> None:
        """Make ``best.pt`` hold the best Dice that ``last.pt`` records.

        Runs written before best.pt was saved ahead of last.pt (or whose best.pt was lost) can
        resume with last.pt naming a best Dice that best.pt lacks. If last.pt is itself the
        state that reached it, best.pt is re-derived from it; otherwise those weights are gone,
        which is said, and the best Dice falls back to what best.pt holds, so the final model
        and the reported best agree.
        """
        if not math.isfinite(self.best_dice):
            return
        best = self.out / "best.pt"
        held = -math.inf
        if best.is_file():
            try:
                held = float(load_checkpoint(best, map_location="cpu").get("best_dice", -math.inf))
            except ValueError:  # unreadable or corrupted best.pt: as good as missing
                held = -math.inf
        if held >= self.best_dice:
            return
        # last.pt is the best state only if it was written at the end of the epoch that reached it
        # (not by a later mid-epoch ckpt_every save)
        rec = self.history[-1] if self.history else {}
        if rec.get("mean_fg_dice") == self.best_dice and rec.get("step") == self.step:
            if self.rank == 0:
                save_checkpoint(best, weights_only(load_checkpoint(last, map_location="cpu")))
            self.log(f"[{self.stage}] best.pt re-derived from last.pt (mean fg Dice {self.best_dice:.3f}, "
                     f"step {self.step})")
            self._jsonl({"event": "best_rederived", "step": self.step, "best_dice": self.best_dice})
            return
        self.log(f"[{self.stage}] warning: last.pt records best mean fg Dice {self.best_dice:.3f} but best.pt "
                 f"holds {held:.3f}; the weights of the better epoch were never saved, continuing with "
                 f"{held:.3f} as the best")
        self._jsonl({"event": "best_lost", "step": self.step, "recorded": self.best_dice, "held": held})
        self.best_dice = held

    # ------------------------------------------------------------------ validation
    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _predict_3d(self, model: nn.Module, image: np.ndarray) -> torch.Tensor:
        from ahnet_fast.infer.sliding_window import sliding_window_inference

        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)
        # windows of the training patch (as `segment` runs it) unless val_window says otherwise
        window = self.cfg.val_window or (self.dataset.patch_size if getattr(self.dataset, "mode", None) == "3d"
                                         else None)
        out = sliding_window_inference(x, model, window=window, overlap=0.25,
                                       autocast_dtype=dtype, pad_value=float(image.min()))
        return out[0]

    @torch.no_grad()
    def validate(self) -> list[float] | None:
        """Per-class Dice over all validation cases (summed counts), or None without cases."""
        if not self.val_cases:
            return None
        self.model.eval()
        counts = np.zeros((self.k, 3), np.int64)
        with self._averaged():  # what best.pt and model.pt will hold
            for vc in self.val_cases[self.rank::self.world]:  # each rank its share of the cases
                logits = self.predict(self.model, vc.image)
                pred = logits.argmax(0).cpu()
                counts += _confusion(pred, torch.from_numpy(vc.label.astype(np.int64)), self.k)
        if self.world > 1:
            counts = self._sum_ranks(counts)
        return dice_from_counts(counts)

    def _sum_ranks(self, a: np.ndarray) -> np.ndarray:
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors
        return ddp_util.all_reduce_sum(torch.from_numpy(np.ascontiguousarray(a)).to(dev)).cpu().numpy()

    # ------------------------------------------------------------------ training
    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.schedule.current == "focal":
            return self.focal(logits, target)
        if self.schedule.current == "dice_ce":
            return dice_ce_loss(logits, target)
        return F.cross_entropy(logits, target)

    def fit(self, resume: bool = False, stop_at_step: int | None = None, deadline: float | None = None,
            clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
        """Train until ``config.steps`` (or ``stop_at_step``, which saves and returns early,
        as if the run had been killed right after a checkpoint).

        Args:
            deadline: a time of ``clock``; once a step ends past it the stage stops cleanly: the
                partial epoch is closed like any epoch (validation, best.pt, last.pt, log) and
                ``stopped_by_deadline`` is set (the stage is not finished: ``--resume`` continues it).
            clock: the clock ``deadline`` refers to (tests inject a fake one).

        Returns:
            ``{"best_dice", "last_dice", "steps", "epochs", "history", "seconds", "finished",
            "stopped_by_deadline"}``.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        last = self.out / "last.pt"
        if resume and last.is_file():
            self.load(last)
            self.log(f"[{self.stage}] resumed from {last} at step {self.step}/{cfg.steps}")
            self._jsonl({"event": "resume", "step": self.step})
            self._reconcile_best(last)
        else:
            torch.manual_seed(cfg.seed)
        end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
        t_start = time.time()
        if self.step >= cfg.steps:
            self.finished = True
            return self._result(time.time() - t_start)
        if self.world > 1:
            loader = ddp_util.make_rank_loader(self.dataset, cfg.batch_size, (end - self.step) * cfg.grad_accum,
                                               start_step=self.step * cfg.grad_accum, num_workers=cfg.num_workers,
                                               pin_memory=self.device.type == "cuda")
            eff = self.world * cfg.batch_size * cfg.grad_accum
            self.log(f"[{self.stage}] {self.world} processes: batch {cfg.batch_size} per process x {self.world} x "
                     f"accumulation {cfg.grad_accum} = effective batch {eff}; lr {cfg.lr:g} (as given, not scaled)"
                     f"{'; synchronized BatchNorm' if cfg.sync_bn else ''}")
            self._jsonl({"event": "distributed", "world_size": self.world, "batch_per_process": cfg.batch_size,
                         "grad_accum": cfg.grad_accum, "effective_batch": eff, "lr": cfg.lr, "sync_bn": cfg.sync_bn})
        else:
            loader = make_loader(self.dataset, cfg.batch_size, (end - self.step) * cfg.grad_accum,
                                 start_step=self.step * cfg.grad_accum, num_workers=cfg.num_workers,
                                 pin_memory=self.device.type == "cuda")
        it = iter(loader)
        stop_here = False
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, disable=not self.progress or self.rank != 0,
                   dynamic_ncols=True, leave=False, file=sys.stderr)
        acc = self._acc
        ep_t0 = time.time()
        epoch_end = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.train_mode(self.model)
        try:
            while not stop_here and self.step < end:
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr_at(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    try:
                        batch = next(it)
                    except StopIteration:  # the stage was lengthened (resize_steps): the same stream, continued
                        it = iter(make_loader(self.dataset, cfg.batch_size, (end - self.step) * cfg.grad_accum,
                                              start_step=self.step * cfg.grad_accum + micro,
                                              num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda"))
                        batch = next(it)
                    x = batch["image"].to(self.device, non_blocking=True)
                    y = batch["label"].to(self.device, non_blocking=True)
                    # DDP: all-reduce the gradients only on the last micro-step of the step
                    no_sync = self.net is not self.model and micro < cfg.grad_accum - 1
                    with self.net.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                        with self._autocast():
                            logits = self.net(x)
                        loss = self._loss(logits, y) / cfg.grad_accum
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"[{self.stage}] non-finite loss at step {self.step} ({loss.item()}); try a lower "
                                "learning rate, amp='bf16' instead of 'fp16', or check the input intensities"
                            )
                        self.scaler.scale(loss).backward()
                    step_loss += float(loss.detach())
                    acc["counts"] += _confusion(logits.detach().argmax(1), y, self.k)
                    acc["samples"] += int(x.shape[0])
                if cfg.clip_grad > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                self._update_ema()
                acc["loss"] += step_loss
                acc["n"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", fn=self.schedule.current)
                epoch_end = self.step % cfg.steps_per_epoch == 0 or self.step == cfg.steps
                if deadline is not None and self.step < end:
                    out_of_time = clock() >= deadline
                    if self.world > 1:  # every rank stops at the same step (any rank's clock decides)
                        out_of_time = bool(self._sum_ranks(np.array([float(out_of_time)]))[0] > 0)
                    if out_of_time:
                        # out of time: close this (partial) epoch so its Dice is scored and saved
                        self.stopped_by_deadline = epoch_end = stop_here = True
                if epoch_end:
                    self.epoch += 1
                    ended, acc = acc, self._new_acc()
                    self._acc = acc  # reset before _end_epoch saves the checkpoint
                    if self.world > 1:  # the epoch's numbers over every rank (same on all ranks)
                        tot = self._sum_ranks(np.array([ended["loss"], ended["samples"]], np.float64))
                        ended["loss"], ended["samples"] = float(tot[0]) / self.world, int(tot[1])
                        ended["counts"] = self._sum_ranks(ended["counts"])
                    self._end_epoch(ended["loss"] / max(ended["n"], 1), ended["counts"], time.time() - ep_t0,
                                    ended["samples"])
                    ep_t0 = time.time()
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    self.train_mode(self.model)
                    end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)  # resize_steps
                    if bar.total != cfg.steps:
                        bar.total = cfg.steps
                        bar.refresh()
                elif cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
            if self.step >= cfg.steps:
                self.finished = True
            if self.stopped_by_deadline:
                self.log(f"[{self.stage}] time budget reached: stopped at step {self.step}/{cfg.steps}")
                self._jsonl({"event": "deadline", "step": self.step, "planned_steps": cfg.steps})
            if not epoch_end:  # an epoch end saves by itself
                self.save()
            ddp_util.barrier()  # every rank returns once rank 0's checkpoint is on disk
        finally:
            bar.close()
        return self._result(time.time() - t_start)

    def resize_steps(self, steps: int, reason: str) -> None:
        """Lengthen or shorten the running stage to ``steps`` optimizer steps (from an ``on_epoch`` hook,
        before the stage's last epoch, to more steps than are done; one process only). The sample stream
        continues as it would have; a cosine learning rate follows the new length from the next step on
        (so a shortened stage still anneals before it ends). Logged with ``reason``."""
        if self.world > 1:
            raise ValueError("resize_steps: not with several processes (every rank would have to agree)")
        if self.step >= self.cfg.steps or steps <= self.step or steps == self.cfg.steps:
            raise ValueError(f"resize_steps: {steps} steps must differ from the stage's {self.cfg.steps} and exceed "
                             f"the {self.step} done, before the stage ends")
        before, self.cfg.steps = self.cfg.steps, int(steps)
        self.finished = False
        self.log(f"[{self.stage}] {reason}: {before} -> {steps} steps")
        self._jsonl({"event": "resized", "step": self.step, "from": before, "to": int(steps), "reason": reason})

    def _end_epoch(self, loss: float, counts: np.ndarray, seconds: float, samples: int) -> None:
        train_dice = dice_from_counts(counts)
        val_dice = self.validate()
        score_dice = val_dice if val_dice is not None else train_dice
        fg = [d for d in score_dice[1:] if not math.isnan(d)]
        mean_fg = float(np.mean(fg)) if fg else float("nan")
        improved = not math.isnan(mean_fg) and mean_fg > self.best_dice
        if improved:
            self.best_dice = mean_fg
        trained_with = self.schedule.current  # the loss of this epoch's steps (a switch acts on the next ones)
        last_epoch = self.step >= self.cfg.steps or self.stopped_by_deadline
        # a switch at the stage's last step would change nothing that is trained: not made, not claimed
        switched = False if last_epoch else self.schedule.end_epoch(loss, self.step)
        mem = peak_memory_bytes(self.device)
        patch_vox = int(np.prod(self.dataset.patch_size))
        steps_done = self.step - (self.history[-1]["step"] if self.history else 0)
        rec = {
            "event": "epoch", "epoch": self.epoch, "step": self.step, "loss": loss,
            "loss_fn": trained_with, "train_dice": train_dice, "val_dice": val_dice,
            "dice_source": "validation" if val_dice is not None else "training batches",
            "mean_fg_dice": mean_fg, "best_dice": self.best_dice, "improved": improved,
            "samples_per_s": samples / max(seconds, 1e-9), "voxels_per_s": samples * patch_vox / max(seconds, 1e-9),
            "epoch_seconds": seconds, "seconds_per_step": seconds / max(steps_done, 1), "peak_memory_bytes": mem,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.history.append({k: rec[k] for k in ("epoch", "step", "loss", "mean_fg_dice")})
        self._jsonl(rec)
        self.last_record = rec
        kind = "val" if val_dice is not None else "train-batch"
        eta = self.eta(self) if self.eta is not None else ""
        self.log(
            f"[{self.stage}] epoch {self.epoch} step {self.step}/{self.cfg.steps} loss {loss:.4f} ({trained_with}) "
            f"{kind} Dice {_fmt_dice(score_dice)} mean fg {mean_fg:.3f}{' *' if improved else ''} | "
            f"{rec['samples_per_s']:.2f} patches/s | peak mem {mem / 2**30:.2f} GiB" + (f" | {eta}" if eta else "")
        )
        if switched:
            self.log(f"[{self.stage}] loss plateaued: the next steps use the focal loss (gamma "
                     f"{self.cfg.focal_gamma}) from step {self.step}")
            self._jsonl({"event": "loss_switch", "step": self.step, "to": "focal"})
        if self.step >= self.cfg.steps:
            self.finished = True
        # best.pt first: last.pt records best_dice, so once it is on disk the best weights must be too
        # (a run killed between the two writes resumes from the previous last.pt and redoes this epoch)
        if improved:
            self.save("best.pt")
        self.save("last.pt")
        if self.on_epoch is not None and self.rank == 0:
            self.on_epoch(self, rec)

    def _result(self, seconds: float) -> dict[str, Any]:
        last = self.history[-1]["mean_fg_dice"] if self.history else float("nan")
        return {"best_dice": self.best_dice, "last_dice": last, "steps": self.step, "epochs": self.epoch,
                "history": self.history, "seconds": seconds, "finished": self.finished,
                "stopped_by_deadline": self.stopped_by_deadline}


#: TrainConfig fields that may change on resume without changing the run (placement, loading, how often
#: last.pt is written)
_RESUME_FREE = frozenset({"device", "num_workers", "ckpt_every"})


def _comparable(x: Any) -> Any:
    """A checkpoint-stored value and a live one compare equal (tuples come back as lists, ...)."""
    return json.loads(json.dumps(_plain(x), default=_json_default))


def _differences(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)} in the checkpoint, {b.get(k)} now" for k in keys)
    return f"{a} in the checkpoint, {b} now"


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
