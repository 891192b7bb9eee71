"""The run's record: summary.json, progress.png, recipe.json across partial re-runs, model.pt ownership."""
from __future__ import annotations

import json

import torch

from ahnet_fast.train.recipe import RecipeConfig, _existing_outputs, _merged_record
from ahnet_fast.train.report import read_epochs, write_progress_png, write_summary


def _epoch(stage, epoch, step, loss, dice, val=True):
    return {"event": "epoch", "stage": stage, "epoch": epoch, "step": step, "loss": loss,
            "val_dice" if val else "train_dice": dice, "mean_fg_dice": sum(dice[1:]) / (len(dice) - 1),
            "lr": 1e-3 / epoch, "epoch_seconds": 2.0 * epoch}


def test_progress_and_summary_continue_across_a_resume(tmp_path):
    (tmp_path / "2d").mkdir()
    (tmp_path / "finetune").mkdir()
    lines = [_epoch("2d", 1, 5, 1.0, [0.9, 0.1, 0.2]), _epoch("2d", 2, 10, 0.8, [0.9, 0.2, 0.3]),
             # a resumed run redid epoch 2 (killed after logging it, before its checkpoint): counted once
             {"event": "resume", "step": 5}, _epoch("2d", 2, 10, 0.7, [0.9, 0.25, 0.35]),
             _epoch("2d", 3, 15, 0.6, [0.9, 0.3, 0.4])]
    (tmp_path / "2d" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"event\": \"ep")
    (tmp_path / "finetune" / "log.jsonl").write_text(
        json.dumps(_epoch("finetune", 1, 4, 0.5, [0.95, 0.5, float("nan")], val=False)).replace("NaN", "null") + "\n")
    epochs = read_epochs(tmp_path)
    assert list(epochs) == ["2d", "finetune"] and [r["epoch"] for r in epochs["2d"]] == [1, 2, 3]
    assert epochs["2d"][1]["loss"] == 0.7  # the redone epoch's record wins
    png = write_progress_png(tmp_path, ["background", "liver", "tumour"])
    assert png == tmp_path / "progress.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = write_summary(tmp_path, {"stages": {"2d": {"steps": 15}}, "score": float("nan")})
    rec = json.loads(path.read_text())  # strict JSON: NaN written as null
    assert rec["score"] is None and rec["stages"]["2d"]["steps"] == 15 and rec["stages"]["2d"]["epochs_logged"] == 3
    assert rec["stages"]["finetune"]["dice_source"] == "training batches"
    assert rec["stages"]["2d"]["seconds_logged"] == 2.0 + 4.0 + 6.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_recipe_json_keeps_every_stage_across_a_partial_rerun(tmp_path):
    first = RecipeConfig(data=str(tmp_path), out_dir=str(tmp_path), steps_2d=7, steps_decoder=5, steps_finetune=9,
                         patch_2d=(64, 64))
    (tmp_path / "recipe.json").write_text(json.dumps(_merged_record(tmp_path, first)))
    again = RecipeConfig(data=str(tmp_path), out_dir=str(tmp_path), stages=("finetune",), steps_finetune=3)
    rec = _merged_record(tmp_path, again)
    assert rec["stages"] == ["2d", "transfer", "decoder", "finetune"]
    assert rec["steps_2d"] == 7 and rec["patch_2d"] == [64, 64] and rec["steps_decoder"] == 5  # what they ran with
    assert rec["steps_finetune"] == 3
    assert rec["stage_settings"]["2d"]["steps_2d"] == 7 and rec["stage_settings"]["finetune"]["steps_finetune"] == 3


def test_model_pt_belongs_to_the_stage_that_wrote_it(tmp_path):
    torch.save({"model": {}, "stage": "decoder", "model_source": {"stage": "decoder", "mean_fg_dice": 0.5}},
               tmp_path / "model.pt")
    (tmp_path / "finetune").mkdir()
    # a fine-tune run after a decoder-only run: model.pt is the decoder's result, not in the way
    assert _existing_outputs(tmp_path, ["finetune"]) == []
    assert _existing_outputs(tmp_path, ["decoder"]) == ["model.pt"]
    (tmp_path / "finetune" / "last.pt").write_bytes(b"x")
    assert _existing_outputs(tmp_path, ["decoder", "finetune"]) == ["finetune/last.pt", "model.pt"]
