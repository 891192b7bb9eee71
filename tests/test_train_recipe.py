"""End-to-end: the whole recipe on a small real volume (MNI152, downsampled), and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ahnet_fast.cli import main
from ahnet_fast.data.mni import build_mni_dataset
from ahnet_fast.train.checkpoint import load_checkpoint
from ahnet_fast.train.recipe import RecipeConfig, run_recipe

SMALL = ["--layers", "1,1,1,1", "--psp", "0", "--upsample", "trilinear", "--model-2d", "fcn",
         "--patch-2d", "32,32", "--patch-3d", "32,32,32", "--batch-2d", "2", "--batch-3d", "2",
         "--workers", "0", "--device", "cpu", "--no-progress", "--no-estimate"]


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    # 3 x 3 x 4 mm crops of the template: ~51 x 35 x 39 voxels per case
    return build_mni_dataset(tmp_path_factory.mktemp("mni") / "data", inplane_step=3)


def test_recipe_end_to_end_on_mni(mni, tmp_path):
    out = tmp_path / "run"
    cfg = RecipeConfig(
        data=str(mni), out_dir=str(out),
        model_config={"layers": (1, 1, 1, 1), "psp_block_num": 0, "upsample_mode": "trilinear"},
        model_2d="fcn", patch_2d=(32, 32), patch_3d=(32, 32, 32), batch_2d=2, batch_3d=2,
        steps_2d=2, steps_decoder=2, steps_finetune=2, steps_per_epoch=2, num_workers=0, device="cpu",
    )
    logs: list[str] = []
    res = run_recipe(cfg, log=logs.append, progress=False)
    assert list(res["stages"]) == ["2d", "transfer", "decoder", "finetune"]
    for stage in ("2d", "decoder", "finetune"):
        r = res["stages"][stage]
        assert r["finished"] and r["steps"] == 2 and np.isfinite(r["history"][-1]["loss"])
        assert (out / stage / "best.pt").is_file() and (out / stage / "log.jsonl").is_file()
        rec = json.loads((out / stage / "log.jsonl").read_text().splitlines()[-1])
        assert len(rec["val_dice"]) == 4 and rec["peak_memory_bytes"] > 0 and rec["samples_per_s"] > 0
    # transfer: the 2D stem became the 3D stem (RGB channel z -> z-tap z)
    w2 = load_checkpoint(out / "2d" / "best.pt")["model"]["conv1.weight"]
    init = load_checkpoint(out / "transfer" / "init.pt")["model"]
    torch.testing.assert_close(init["conv1.weight"], w2.permute(0, 2, 3, 1).unsqueeze(1), rtol=0, atol=0)
    # decoder stage: encoder frozen (weights and BN statistics), decoder trained
    dec = load_checkpoint(out / "decoder" / "last.pt")["model"]
    for k in init:
        if k.startswith(("conv1.", "bn0.", "layer")):
            assert torch.equal(init[k], dec[k]), k
    assert not torch.equal(init["final.conv.weight"], dec["final.conv.weight"])
    # finetune: everything trains; the final model loads for inference
    fin = load_checkpoint(out / "finetune" / "last.pt")["model"]
    assert not torch.equal(dec["layer1.0.conv2.weight"], fin["layer1.0.conv2.weight"])
    from ahnet_fast.infer.model_io import load_model

    model, meta = load_model(out / "model.pt")
    assert meta["model_config"]["out_channels"] == 4
    assert meta["preprocessing"]["intensity"]["mode"] == "zscore"  # the default for data other than CT
    assert any("2D->3D transfer" in m for m in logs) and any("[finetune] epoch 1" in m for m in logs)


def test_cli_train_smoke_and_resume(mni, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d", "--steps-2d", "2",
               "--steps-per-epoch", "2", *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "[2d] epoch 1 step 2/2" in text and "stage times: 2d" in text
    assert load_checkpoint(out / "2d" / "last.pt")["step"] == 2
    # resume a finished stage: nothing to do, same checkpoint
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d", "--steps-2d", "2", "--resume", *SMALL])
    assert rc == 0 and "resumed from" in capsys.readouterr().out
    log_before = (out / "2d" / "log.jsonl").read_text()
    # the same --out again without --resume: refused, nothing replaced, logs not mixed
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d", "--steps-2d", "2", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err
    assert "already holds results of the stage(s) to run (2d/last.pt, 2d/best.pt, 2d/log.jsonl)" in err
    # --resume with a changed setting: refused, naming it and the way to change it on purpose
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d", "--resume", "--seed", "5", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "seed 0 -> 5" in err and "--override seed" in err
    # another model for a stage to resume: refused before anything is built
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "transfer", "--resume", *SMALL,
               "--layers", "2,1,1,1"])
    err = capsys.readouterr().err
    assert rc == 2 and "model_config {'layers': [1, 1, 1, 1]" in err and "'layers': [2, 1, 1, 1]" in err
    assert (out / "2d" / "log.jsonl").read_text() == log_before
    # ... unless overridden: accepted, and recorded in recipe.json and the stage's log
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d", "--resume", "--seed", "5",
               "--override", "seed", *SMALL])
    assert rc == 0 and "--override: seed 0 -> 5" in capsys.readouterr().out
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["seed"] == 5 and recipe["overrides"][-1]["changes"] == {"seed": [0, 5]}
    assert '"event": "override"' in (out / "2d" / "log.jsonl").read_text()
    # a full disk while writing a checkpoint: one line naming the file, no traceback, nothing left
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    torch.save = disk_full
    try:
        rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "transfer", *SMALL])
    finally:
        torch.save = real_save
    err = capsys.readouterr().err
    assert rc == 1 and "init.pt: cannot write the checkpoint: the write stopped part way" in err
    assert "Traceback" not in err and err.count("\n") == 1 and list((out / "transfer").iterdir()) == []
    # --overwrite replaces the stage's results: one run in the log. --max-memory on the CPU: estimated, reported
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d", "--steps-2d", "1",
               "--max-memory", "2", "--overwrite", *SMALL])
    assert rc == 0 and "max-memory 2.00 GiB: chose patch" in capsys.readouterr().out
    events = [json.loads(line)["event"] for line in (out / "2d" / "log.jsonl").read_text().splitlines()]
    assert events == ["epoch"] and load_checkpoint(out / "2d" / "last.pt")["step"] == 1


def test_cli_bad_input_is_one_line_error(tmp_path, mni, capsys):
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    assert main(["train", str(mni.parent), "--out", str(tmp_path / "o"), "--stages", "2d,bogus"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert main(["train", str(mni.parent), "--out", str(tmp_path / "o"), "--stages", "2d", "--patch-2d", "40,40",
                 "--steps-2d", "1", *[a for a in SMALL if a not in ("--patch-2d", "32,32")]]) == 2
    assert "2D patch: (40, 40) is not a valid size" in capsys.readouterr().err
    assert main(["train", str(mni.parent), "--out", str(tmp_path / "o"), "--stages", "decoder", *SMALL]) == 2
    assert "run the 'transfer' stage first" in capsys.readouterr().err
    assert main(["train", str(mni.parent), "--out", str(tmp_path / "o"), "--resume", "--override", "bogus,seed",
                 *SMALL]) == 2
    assert "--override: unknown setting(s) ['bogus']; accepted: amp, augment" in capsys.readouterr().err
    assert main(["train", str(mni.parent), "--out", str(tmp_path / "o"), "--override", "seed", *SMALL]) == 2
    assert "--override only applies with --resume" in capsys.readouterr().err
    # training lists with an unlabelled case, and a ragged CSV: one line naming the list, no traceback
    spec = json.loads(mni.read_text())
    img = str(mni.parent / spec["training"][0]["image"])
    lab = str(mni.parent / spec["training"][0]["label"])
    (tmp_path / "nolabel.csv").write_text(f"image,label\n{img},{lab}\n{img},\n")
    (tmp_path / "ragged.csv").write_text(f"image,label\n{img},{lab},extra\n")
    (tmp_path / "nolabel.json").write_text(json.dumps({**spec, "training": [{"image": img}]}))
    for name, msg in [("nolabel.csv", "1 training case(s) have no label"), ("ragged.csv", "line 2: 3 fields but"),
                      ("nolabel.json", "1 training case(s) have no label")]:
        assert main(["train", str(tmp_path / name), "--out", str(tmp_path / "o"), "--stages", "2d",
                     "--num-classes", "4", *SMALL]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ahnet-fast: error: {tmp_path / name}: {msg}") and err.count("\n") == 1, err


def test_cli_train_at_a_finer_spacing(mni, tmp_path, capsys):
    """--spacing: the cases are resampled for training, the spacing is recorded, and `segment`
    resamples its input to it and the labels back onto the input's grid."""
    out = tmp_path / "fine"
    rc = main(["train", str(mni.parent), "--out", str(out), "--stages", "2d,transfer,decoder", "--steps-2d", "1",
               "--steps-decoder", "2", "--steps-per-epoch", "1", "--spacing", "3", "3", "2", *SMALL])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "spacing: every case resampled to 3 x 3 x 2 mm (from 3 x 3 x 4 mm, median)" in text
    pre = load_checkpoint(out / "model.pt")["preprocessing"]
    assert pre["spacing"] == [3.0, 3.0, 2.0] and pre["resampled_from"] == [3.0, 3.0, 4.0]
    assert json.loads((out / "recipe.json").read_text())["spacing"] == [3.0, 3.0, 2.0]
    spec = json.loads(mni.read_text())
    img = mni.parent / spec["test"][0]["image"]
    seg = tmp_path / "seg.nii.gz"
    rc = main(["segment", str(img), str(seg), "--checkpoint", str(out / "model.pt"), "--no-tta"])
    cap = capsys.readouterr()
    text = cap.out
    assert rc == 0 and "to 51x29x78 at 3 x 3 x 2 mm (training spacing 3 x 3 x 2 mm)" in text, cap.out + cap.err
    assert "far from the training spacing" not in cap.out + cap.err  # the cases' own spacing before --spacing
    import nibabel as nib

    assert nib.load(str(seg)).shape == nib.load(str(img)).shape
    # auto: 3 x 3 x 4 mm slices are not thick (under 2x the in-plane spacing), so D is kept; these
    # small cases stay far within the voxel cap, so the in-plane spacing is halved
    rc = main(["train", str(mni.parent), "--out", str(tmp_path / "auto"), "--stages", "2d", "--steps-2d", "1",
               "--spacing", "auto", *SMALL])
    text = capsys.readouterr().out
    assert rc == 0 and ("spacing: every case resampled to 1.5 x 1.5 x 4 mm (from 3 x 3 x 4 mm, median; --spacing "
                        "auto: halved where the cases allow") in text, text
    assert json.loads((tmp_path / "auto" / "recipe.json").read_text())["spacing"] == "auto"
    assert load_checkpoint(tmp_path / "auto" / "2d" / "best.pt")["preprocessing"]["spacing"] == [1.5, 1.5, 4.0]
    # a later stage on another grid than the 2D weights it continues from: refused in one line that
    # says how to continue on the earlier grid (auto is resolved anew at every start)
    rc = main(["train", str(mni.parent), "--out", str(tmp_path / "auto"), "--stages", "transfer,decoder",
               "--steps-decoder", "1", "--spacing", "3", "3", "2", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "starts from a model trained at 1.5 1.5 4 mm, but this run's --spacing 3 3 2 gives 3 3 2 mm" in err
    assert "pass --spacing 1.5 1.5 4 to continue on that grid" in err and not (tmp_path / "auto" / "transfer").exists()
    # a bad spacing: one line naming what is accepted
    rc = main(["train", str(mni.parent), "--out", str(tmp_path / "bad"), "--stages", "2d", "--spacing", "3", "0", "2",
               *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "expected 3 positive voxel sizes in mm" in err and err.count("\n") == 1, err
