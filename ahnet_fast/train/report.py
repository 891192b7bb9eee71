"""The run's record for people: ``progress.png`` and ``summary.json`` in the run folder.

Both are built from the stages' ``log.jsonl`` files (one object per epoch, appended across
resumes), so they continue across ``--resume`` and cover every stage run into the folder.
An epoch that a resumed run redid (the process died after logging it, before its checkpoint)
counts once: the later record of a ``(stage, epoch)`` wins.

``progress.png`` (as nnU-Net users know it): training loss, Dice per class (validation Dice, or
the Dice of the training batches when there is no validation set: the panel says which),
learning rate and seconds per epoch against the epoch, the stages one after another with
their boundaries marked. Both files are written atomically.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ahnet_fast._atomic import atomic_path, atomic_write_text

__all__ = ["TRAINED_STAGES", "read_epochs", "write_progress_png", "write_summary"]

TRAINED_STAGES = ("2d", "decoder", "finetune")


def read_epochs(out_dir: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Epoch records of each trained stage in ``out_dir``, in epoch order, one per epoch."""
    out = Path(out_dir)
    result: dict[str, list[dict[str, Any]]] = {}
    for stage in TRAINED_STAGES:
        path = out / stage / "log.jsonl"
        if not path.is_file():
            continue
        by_epoch: dict[int, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and rec.get("event") == "epoch" and isinstance(rec.get("epoch"), int):
                by_epoch[rec["epoch"]] = rec
        if by_epoch:
            result[stage] = [by_epoch[e] for e in sorted(by_epoch)]
    return result


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def write_progress_png(out_dir: str | os.PathLike, class_names: Sequence[str] | None = None,
                       path: str | os.PathLike | None = None) -> Path | None:
    """Draw ``progress.png`` (module docstring); None when no epoch has been logged yet."""
    epochs = read_epochs(out_dir)
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path) if path is not None else Path(out_dir) / "progress.png"
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    x0 = 0
    sources = set()
    stage_colours = {"2d": "tab:blue", "decoder": "tab:orange", "finetune": "tab:green"}
    palette = plt.get_cmap("tab10")
    labelled: set[str] = set()
    for stage, recs in epochs.items():
        xs = [x0 + i + 1 for i in range(len(recs))]
        col = stage_colours.get(stage, "k")
        axes[0].plot(xs, [_nan(r.get("loss")) for r in recs], "-o", ms=3, color=col, label=stage)
        dice = [(r.get("val_dice") or r.get("train_dice") or []) for r in recs]
        sources.add("validation" if recs[-1].get("val_dice") else "training batches")
        k = max((len(d) for d in dice), default=0)
        for c in range(1, k):
            name = class_names[c] if class_names and c < len(class_names) else f"class {c}"
            axes[1].plot(xs, [_nan(d[c]) if c < len(d) else math.nan for d in dice], "-o", ms=2,
                         color=palette((c - 1) % 10),
                         label=name if name not in labelled else None)
            labelled.add(name)
        axes[1].plot(xs, [_nan(r.get("mean_fg_dice")) for r in recs], "k--o", ms=3, lw=1.5,
                     label="mean foreground" if "mean" not in labelled else None)
        labelled.add("mean")
        axes[2].plot(xs, [_nan(r.get("lr")) for r in recs], "-o", ms=3, color=col)
        axes[3].plot(xs, [_nan(r.get("epoch_seconds")) for r in recs], "-o", ms=3, color=col)
        for ax in axes:
            ax.axvline(x0 + 0.5, color="grey", lw=0.8, ls=":")
        axes[0].annotate(stage, (x0 + 1, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=9)
        x0 += len(recs)
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("Dice (" + " / ".join(sorted(sources)) + ")")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8, ncol=4, loc="upper left")
    axes[2].set_ylabel("learning rate")
    axes[3].set_ylabel("seconds per epoch")
    axes[3].set_xlabel("epoch (stages in order: " + ", ".join(epochs) + ")")
    fig.suptitle(f"{Path(out_dir).resolve().name}: training progress")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return path


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, recursively, so a record is strict JSON (NaN: a class absent from both
    prediction and truth). Shared by the training log (trainer.py) and summary.json."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` (strict JSON: NaN/inf become null) with each stage's epoch history."""
    out = Path(out_dir)
    epochs = read_epochs(out)
    record = dict(summary)
    stages = dict(record.get("stages", {}))
    for stage, recs in epochs.items():
        entry = dict(stages.get(stage, {}))
        last = recs[-1]
        entry.update({
            "epochs_logged": len(recs), "last_step": last.get("step"), "best_dice": last.get("best_dice"),
            "dice_source": last.get("dice_source", "validation" if last.get("val_dice") else "training batches"),
            "last_dice": last.get("val_dice") or last.get("train_dice"),
            "seconds_logged": sum(float(r.get("epoch_seconds") or 0.0) for r in recs),
        })
        stages[stage] = entry
    record["stages"] = stages
    path = out / "summary.json"
    atomic_write_text(path, json.dumps(json_safe(record), indent=2, default=str))
    return path
