"""`train --preset`: defaults from the device, help that shows them, budgets and threads on the command line."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from ahnet_fast.cli import main
from ahnet_fast.cli.train import preset_for
from ahnet_fast.train.presets import PRESETS, default_preset, describe_default, preset_values


def test_default_preset_follows_the_device():
    assert default_preset("cpu") == "cpu-small" and default_preset(torch.device("cpu")) == "cpu-small"
    assert default_preset("cuda") == default_preset("cuda:1") == "gpu-paper"
    assert preset_for(argparse.Namespace(device="cpu", preset=None)) == (
        "cpu-small", "the default on device cpu; --preset to choose another")
    name, why = preset_for(argparse.Namespace(device="cpu", preset="gpu-paper"))
    assert name == "gpu-paper" and "warning: a GPU schedule on device cpu" in why


def test_preset_values_are_copies_and_unknown_names_are_refused():
    v = preset_values("cpu-small")
    v["model_config"]["layers"] = (9, 9, 9, 9)
    v["steps_2d"] = 1
    assert PRESETS["cpu-small"]["model_config"]["layers"] == (1, 1, 1, 1) and PRESETS["cpu-small"]["steps_2d"] == 60
    assert PRESETS["cpu-small"]["num_workers"] == 0 and PRESETS["gpu-12gb"]["max_memory"] == 11.0
    with pytest.raises(ValueError, match="unknown preset; accepted: cpu-small, gpu-paper, gpu-12gb"):
        preset_values("tiny")
    assert describe_default("steps_2d") == "cpu-small: 60, gpu-paper: 4000, gpu-12gb: 4000"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--preset {cpu-small,gpu-paper,gpu-12gb}", "--time-budget DURATION", "--step-budget N",
                 "--threads", "--progress, --no-progress", "default from --preset: cpu-small: 60, gpu-paper: 4000",
                 "3D patch H,W,D (D a multiple of 32; default from --preset: cpu-small: 64,64,32",
                 "cpu-small: 0, gpu-paper: 4, gpu-12gb: 4"):
        assert part in text, part
    assert "worker processes (default 2)" not in text  # the worker default the help used to claim


def test_bad_budget_is_a_one_line_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--time-budget", "20 minutes"])
    assert e.value.code == 2 and "is not a duration; expected e.g. 20m" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--step-budget", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err


def test_a_recorded_cuda_device_without_cuda_is_one_clear_error(tmp_path, monkeypatch):
    from ahnet_fast.data.mni import build_mni_dataset
    from ahnet_fast.train.recipe import RecipeConfig, run_recipe

    js = build_mni_dataset(tmp_path / "data", inplane_step=6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda: CUDA is not available on this machine; use --device cpu"):
        run_recipe(RecipeConfig(data=str(js), out_dir=str(tmp_path / "run"), device="cuda"), log=lambda m: None,
                   progress=False)


def test_amp_auto_is_bf16_only_where_the_device_has_it(monkeypatch):
    from ahnet_fast.train import presets

    monkeypatch.setattr(presets, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert presets.resolve_amp("auto", "cpu") == ("bf16", "--amp auto: this CPU has AVX512-BF16")
    monkeypatch.setattr(presets, "_cpu_flags", lambda: {"avx512f", "amx_tile", "amx_bf16"})
    assert presets.resolve_amp("auto", torch.device("cpu"))[0] == "bf16"
    monkeypatch.setattr(presets, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert presets.resolve_amp("auto", "cpu") == (
        "none", "--amp auto: this CPU has no native bf16 (AVX512-BF16 or AMX)")
    assert presets.resolve_amp("fp16", "cpu") == ("fp16", "") and presets.resolve_amp("none", "cpu") == ("none", "")
    with pytest.raises(ValueError, match="--amp int8: accepted values are none, bf16, fp16, auto"):
        presets.resolve_amp("int8", "cpu")
    # the CPU preset trains the fast model with the precision the CPU has
    assert PRESETS["cpu-small"]["amp"] == "auto" and PRESETS["cpu-small"]["fast"] is True
    assert PRESETS["gpu-paper"]["amp"] == "none"
    # the paper's loss schedule on the GPU presets; Dice+CE on the CPU one (module docstring)
    assert PRESETS["cpu-small"]["loss"] == "dice_ce" and PRESETS["gpu-paper"]["loss"] == "ce_then_focal"
    # spacing halved on the CPU preset (AH-Net predicts at half resolution), validated every 100 steps
    # as that grid is larger; the paper's grids on a GPU
    assert PRESETS["cpu-small"]["spacing"] == "auto" and "spacing" not in PRESETS["gpu-paper"]
    assert PRESETS["cpu-small"]["steps_per_epoch"] == 100


@pytest.mark.parametrize("flags,line", [
    ({"avx512f", "avx512_bf16"}, "precision bf16 (--amp auto: this CPU has AVX512-BF16)"),
    ({"avx2"}, "precision fp32 (--amp auto: this CPU has no native bf16 (AVX512-BF16 or AMX))"),
])
def test_train_on_a_cpu_starts_from_cpu_small_and_records_it(tmp_path, capsys, monkeypatch, flags, line):
    from ahnet_fast.data.mni import build_mni_dataset
    from ahnet_fast.train import presets

    monkeypatch.setattr(presets, "_cpu_flags", lambda: flags)
    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "1", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    rc = main(args)
    assert rc == 0
    text = capsys.readouterr().out
    assert "[run] preset cpu-small (the default on device cpu" in text
    assert f"[run] device: cpu, 2 torch threads; {line}; 0 data worker(s)" in text
    assert "model: ahnet_fast.AHNet (fused fast AH-Net; the cpu-small preset" in text
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["preset"] == "cpu-small" and rec["num_workers"] == 0 and rec["lr_schedule"] == "cosine"
    assert rec["model_2d"] == "fcn" and rec["steps_2d"] == 1 and rec["patch_2d"] == [32, 32]
    # recipe.json keeps the resolved precision; resuming with the same "auto" is not a changed setting
    assert rec["amp"] == ("bf16" if "avx512_bf16" in flags else "none")
    assert main([*args, "--resume"]) == 0


def test_augmentation_strength_on_the_command_line(tmp_path, capsys):
    """--aug-rotation/--aug-scale set the in-plane augmentation (recorded in recipe.json); 0 and 0 leave
    mirroring only; values out of range and a clash with --no-augment are one-line errors."""
    from ahnet_fast.data.mni import build_mni_dataset

    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "1", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    assert main([*args, "--aug-rotation", "0", "--aug-scale", "0"]) == 0
    aug = json.loads((out / "recipe.json").read_text())["augment"]
    assert aug["rotation"] == 0 and aug["scale"] == 0 and aug["flip_axes"] == [0, 1] and aug["enabled"] is True
    assert "[run] augmentation: mirroring H, W (also at test time in `segment`)" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--aug-rotation", "200"]) == 2
    err = capsys.readouterr().err
    assert "--aug-rotation: rotation must be in [0, 180] degrees, got 200" in err
    assert "Traceback" not in err
    assert main([*args, "--overwrite", "--aug-scale", "0.1", "--no-augment"]) == 2
    assert "--no-augment turns off" in capsys.readouterr().err
    # intensity augmentation: recorded, described, checked
    assert main([*args, "--overwrite", "--aug-brightness", "0.2", "--aug-gamma", "0.5",
                 "--aug-intensity-prob", "0.4"]) == 0
    aug = json.loads((out / "recipe.json").read_text())["augment"]
    assert (aug["brightness"], aug["contrast"], aug["gamma"], aug["intensity_prob"]) == (0.2, 0.0, 0.5, 0.4)
    assert "intensity brightness 1+-0.2, gamma 1/1.5..1.5 (each with probability 0.4)" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--aug-contrast", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--aug-contrast: contrast must be in [0, 1)" in err and "Traceback" not in err


def test_resume_of_a_run_recorded_before_intensity_augmentation(tmp_path):
    """recipe.json written before the intensity settings existed resumes: the missing settings are
    their defaults (off), not a changed setting."""
    from ahnet_fast.data.mni import build_mni_dataset

    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "1", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    assert main(args) == 0
    rec = json.loads((out / "recipe.json").read_text())
    for k in ("brightness", "contrast", "gamma", "intensity_prob"):
        del rec["augment"][k]
    (out / "recipe.json").write_text(json.dumps(rec))
    assert main([*args, "--resume"]) == 0
    assert main([*args, "--resume", "--aug-gamma", "0.3"]) == 2  # a real change is still refused


def test_weight_average_on_the_command_line(tmp_path, capsys):
    """--ema reaches every stage's trainer (recorded in recipe.json and the checkpoints), the start-up
    summary says what is saved, and a decay outside [0, 1) is a one-line error."""
    from ahnet_fast.data.mni import build_mni_dataset

    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "2", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    assert main([*args, "--ema", "0.9"]) == 0
    assert json.loads((out / "recipe.json").read_text())["ema"] == 0.9
    assert "[run] weights: an exponential moving average (decay 0.9, --ema)" in capsys.readouterr().out
    from ahnet_fast.train.checkpoint import load_checkpoint

    assert load_checkpoint(out / "2d" / "last.pt")["train_config"]["ema"] == 0.9
    assert main([*args, "--overwrite", "--ema", "1"]) == 2
    err = capsys.readouterr().err
    assert "--ema 1.0: the weight average's decay must be in [0, 1)" in err and "Traceback" not in err


def test_class_balanced_sampling_can_be_turned_off(tmp_path, capsys):
    """cpu-small draws each foreground class equally often; --no-class-balanced draws foreground voxels
    by volume (recorded in recipe.json, named in the start-up summary), and the help names both defaults."""
    from ahnet_fast.data.mni import build_mni_dataset

    assert describe_default("class_balanced") == "cpu-small: True, gpu-paper: False, gpu-12gb: False"
    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "1", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    assert main(args) == 0
    assert json.loads((out / "recipe.json").read_text())["class_balanced"] is True
    assert ("[run] patches: 70% centred on a foreground voxel (each class equally often, then a voxel of it; "
            "--no-class-balanced: classes by volume), 30% anywhere (--fg-ratio)") in capsys.readouterr().out
    assert main([*args, "--overwrite", "--no-class-balanced", "--fg-ratio", "0.5"]) == 0
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["class_balanced"] is False and rec["fg_ratio"] == 0.5
    assert "[run] patches: 50% centred on a foreground voxel (classes by volume" in capsys.readouterr().out


def test_intensity_stats_from_the_training_cases(tmp_path, capsys):
    """--intensity-stats training: the request is recorded in recipe.json, the fixed window it resolves to
    (the training case's percentiles) in the checkpoints for `segment`; the start-up summary says so; a
    CT window with it is a one-line error; a run recorded before the option resumes as per-case."""
    from ahnet_fast.data.intensity import IntensityConfig, normalise_with_stats
    from ahnet_fast.data.mni import build_mni_dataset
    from ahnet_fast.data.nifti import load_volume
    from ahnet_fast.train.checkpoint import load_checkpoint

    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "1", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    assert main([*args, "--intensity", "percentile", "--intensity-stats", "training"]) == 0
    assert json.loads((out / "recipe.json").read_text())["intensity"]["stats"] == "training"
    saved = load_checkpoint(out / "2d" / "last.pt")["preprocessing"]["intensity"]
    train_image = json.loads(js.read_text())["training"][0]["image"]
    own = normalise_with_stats(load_volume(js.parent / train_image).array, IntensityConfig(mode="percentile"))[1]
    assert saved["mode"] == "window" and saved["window"] == pytest.approx([own["lo"], own["hi"]])
    text = capsys.readouterr().out
    assert "--intensity-stats training: percentiles 0.5-99.5 of the 1 training case(s)' foreground" in text
    assert main([*args, "--overwrite", "--intensity", "ct", "--intensity-stats", "training"]) == 2
    err = capsys.readouterr().err
    assert "intensity stats 'training' applies to percentile and zscore scaling only" in err and "Traceback" not in err
    # per-case (the default) is said in the summary; a record without "stats" resumes as per-case
    args += ["--intensity", "percentile", "--percentiles", "1", "99"]
    assert main([*args, "--overwrite"]) == 0
    assert "each case scaled by its own percentiles; --intensity-stats training" in capsys.readouterr().out
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["intensity"]["percentiles"] == [1, 99] and rec["intensity"].pop("stats") == "case"
    (out / "recipe.json").write_text(json.dumps(rec))
    assert main([*args, "--resume"]) == 0
    assert main([*args, "--resume", "--intensity-stats", "training"]) == 2  # a real change is still refused


def test_zscore_intensity_is_recorded_and_used(tmp_path, capsys):
    """The z-score, the default for data other than CT: recorded in recipe.json and in the checkpoints, so
    `segment` applies it; the summary says how cases are scaled; options only another mode reads are
    refused in one line."""
    from ahnet_fast.data.mni import build_mni_dataset
    from ahnet_fast.infer.segment import intensity_from_meta
    from ahnet_fast.train.checkpoint import load_checkpoint

    js = build_mni_dataset(tmp_path / "data", inplane_step=3)
    out = tmp_path / "run"
    args = ["train", str(js), "--out", str(out), "--stages", "2d", "--steps-2d", "1", "--patch-2d", "32,32",
            "--batch-2d", "2", "--device", "cpu", "--no-progress", "--no-estimate", "--threads", "2"]
    assert main(args) == 0  # the default for data other than CT
    assert json.loads((out / "recipe.json").read_text())["intensity"]["mode"] == "zscore"
    ck = load_checkpoint(out / "2d" / "last.pt")
    assert intensity_from_meta(ck, None).mode == "zscore"
    assert "each case scaled by its own foreground mean and standard deviation" in capsys.readouterr().out
    # a run recorded before the resolved setting was written ("intensity": null) used the default of
    # then, per-case percentiles for MRI: a resume keeps it
    from ahnet_fast.train.recipe import _read_saved_record, recipe_config_from_record

    rec = json.loads((out / "recipe.json").read_text())
    rec["intensity"] = None
    (out / "recipe.json").write_text(json.dumps(rec))
    assert _read_saved_record(out)["intensity"]["mode"] == "percentile"
    assert recipe_config_from_record(rec, data=str(js), out_dir=str(out)).intensity.mode == "percentile"
    assert main([*args, "--overwrite", "--intensity", "zscore", "--ct-window", "-100", "200"]) == 2
    err = capsys.readouterr().err
    assert "--ct-window applies to --intensity ct, and this run normalises with 'zscore'" in err
    assert "Traceback" not in err
    assert main([*args, "--overwrite", "--intensity", "ct", "--percentiles", "1", "99"]) == 2
    assert "--percentiles applies to --intensity percentile or --intensity zscore" in capsys.readouterr().err
