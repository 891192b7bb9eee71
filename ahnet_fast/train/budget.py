"""Budgets and estimates for the recipe: how many steps fit, how long the rest will take.

* :func:`parse_duration` reads ``20m``, ``1h30m``, ``90s``, ``1200`` (seconds).
* :func:`measure_stage` times a few real training steps of a stage's network on this machine
  (patches drawn exactly as in training, the optimizer step included; the first step is a warm-up
  and not counted) and one evaluation forward (for the cost of validation).
* :class:`StageCost` predicts a stage's wall time for ``n`` steps: steps, plus per epoch one
  validation and the checkpoint writes.
* :func:`plan_steps` scales the configured schedule (the preset's steps per stage, whose ratios are
  kept) by one factor so that the stages fill a time budget, or a budget of optimizer steps.
* :func:`format_duration` prints ``1h02m``, ``12m30s``, ``45s``.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ahnet_fast.train.optim import make_adam

__all__ = ["parse_duration", "format_duration", "StageCost", "measure_stage", "plan_steps", "epochs_for"]

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``text``: ``"20m"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` or a bare number of seconds.

    Raises:
        ValueError: not a positive duration (the message gives accepted forms).
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", t):
            value = float(t)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
            if not parts or "".join(n + u for n, u in parts) != t or len({u for _, u in parts}) != len(parts):
                raise ValueError(f"{text!r} is not a duration; expected e.g. 20m, 1h30m, 90s or 1200 (seconds)")
            value = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{text!r}: a duration must be positive")
    return value


def format_duration(seconds: float) -> str:
    """``3725 -> "1h02m"``, ``750 -> "12m30s"``, ``45 -> "45s"``; days for very long runs."""
    if not math.isfinite(seconds):
        return "unknown"
    s = max(0, int(round(seconds)))
    if s >= 86400 * 2:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """Epochs (each ending with validation and checkpoints) of a stage of ``steps`` steps."""
    return 0 if steps <= 0 else -(-steps // max(1, steps_per_epoch))


@dataclass
class StageCost:
    """Measured cost of one trained stage on this machine.

    Attributes:
        seconds_per_step: one optimizer step, patch sampling included.
        seconds_per_epoch: per epoch besides the steps (validation of every validation case and the
            checkpoint writes).
        steps_per_epoch: the stage's longest epoch.
        min_epochs: epochs a stage has at least (when it has that many steps; 4 under a budget).
    """

    seconds_per_step: float
    seconds_per_epoch: float
    steps_per_epoch: int
    min_epochs: int = 1

    def epochs(self, steps: int) -> int:
        """Epochs of a stage of ``steps`` steps."""
        return max(min(self.min_epochs, steps), epochs_for(steps, self.steps_per_epoch))

    def seconds(self, steps: int) -> float:
        """Predicted wall time of ``steps`` steps."""
        return steps * self.seconds_per_step + self.epochs(steps) * self.seconds_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return {"seconds_per_step": self.seconds_per_step, "seconds_per_epoch": self.seconds_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "min_epochs": self.min_epochs}


def measure_stage(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    device: torch.device,
    amp: str = "none",
    train_mode: Callable[[nn.Module], None] | None = None,
    timed_steps: int = 2,
    eval_voxels: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """Time ``timed_steps`` training steps (after one untimed warm-up step) and the evaluation cost.

    ``batches`` yields ``{"image", "label"}`` batches as the training loader does (its sampling
    time counts). The model's weights change (use a throw-away copy).

    Returns:
        ``(seconds per step, seconds of evaluating eval_voxels voxels)`` (the latter scaled from one
        no-grad forward of a training batch; 0 when ``eval_voxels`` is 0).
    """
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adam(params, lr=1e-6)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    (train_mode or (lambda m: m.train()))(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        b = next(batches)
        x, y = b["image"].to(device), b["label"].to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()

    step()  # warm-up: allocation, kernel selection, compilation
    sync()
    t0 = clock()
    for _ in range(timed_steps):
        step()
    sync()
    per_step = (clock() - t0) / max(timed_steps, 1)
    eval_s = 0.0
    if eval_voxels:
        b = next(batches)
        x = b["image"].to(device)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            sync()
            t0 = clock()
            model(x)
            sync()
            per_voxel = (clock() - t0) / x.numel()
        # sliding windows overlap by a quarter and volumes are padded: about 1.5x the voxels
        eval_s = per_voxel * eval_voxels * 1.5
    return per_step, eval_s


def plan_steps(
    base_steps: Mapping[str, int],
    costs: Mapping[str, StageCost] | None = None,
    seconds: float | None = None,
    steps: int | None = None,
    min_steps: int = 1,
) -> dict[str, int]:
    """Steps per stage: ``base_steps`` scaled by one common factor to fill the budget.

    Exactly one of ``seconds`` (with ``costs``: fill that much predicted wall time) or ``steps``
    (total optimizer steps over the stages) is given. Every stage gets at least ``min_steps``.
    """
    names = [s for s, n in base_steps.items() if n > 0] or list(base_steps)
    base = {s: max(1, int(base_steps[s])) for s in names}
    total = sum(base.values())
    if (seconds is None) == (steps is None):
        raise ValueError("give exactly one budget: seconds or steps")
    if steps is not None:
        if steps < min_steps * len(names):
            raise ValueError(f"a budget of {steps} steps is less than {min_steps} step(s) for each of the "
                             f"{len(names)} trained stage(s) ({', '.join(names)})")
        plan = {s: max(min_steps, int(math.floor(steps * base[s] / total))) for s in names}
        while sum(plan.values()) > steps:  # the minimums took more than flooring left: trim the largest
            big = max((s for s in names if plan[s] > min_steps), key=lambda s: plan[s])
            plan[big] -= 1
        # hand out what flooring left, largest stage first, never beyond the budget
        for s in sorted(names, key=lambda s: -base[s]):
            if sum(plan.values()) >= steps:
                break
            plan[s] += steps - sum(plan.values())
        return plan
    assert costs is not None
    assert seconds is not None

    def at(k: float) -> dict[str, int]:
        return {s: max(min_steps, int(math.floor(k * base[s]))) for s in names}

    def cost(plan: dict[str, int]) -> float:
        return sum(costs[s].seconds(n) for s, n in plan.items())

    lo, hi = 0.0, 1.0
    while cost(at(hi)) <= seconds and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisection on the common factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(at(mid)) <= seconds else (lo, mid)
    return at(lo)
