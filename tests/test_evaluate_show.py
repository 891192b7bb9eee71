"""`evaluate` and `show`: class names, folder order, --no-surface, error wording, colours, titles, centres."""
from __future__ import annotations

import argparse
import colorsys
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ahnet_fast.cli import evaluate as cli_evaluate
from ahnet_fast.cli import show as cli_show
from ahnet_fast.infer.evaluate import class_names_from, find_class_names, order_problem


def _main(module, argv):
    parser = argparse.ArgumentParser(prog="ahnet-fast")
    module.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _save(path, arr, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(dtype), np.diag([1.0, 1.0, 4.0, 1.0])), str(path))


@pytest.fixture()
def task(tmp_path):
    gt = np.zeros((16, 18, 6), np.uint8)
    gt[2:8, 3:9, 1:4] = 1
    gt[9:14, 10:16, 2:5] = 2
    pred = gt.copy()
    pred[2:4, 3:9, 1:4] = 0
    root = tmp_path / "task"
    _save(root / "labelsTs" / "case.nii.gz", gt)
    _save(root / "pred" / "case.nii.gz", pred)
    _save(root / "imagesTs" / "case.nii.gz", gt * 100.0 + 5.0, np.float32)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    return root


def test_evaluate_names_classes_and_refuses_a_swapped_order(task, capsys):
    # nnU-Net's order (GT PRED) given to PRED_DIR GT_DIR: refused, with the way to say it explicitly
    assert _main(cli_evaluate, ["evaluate", str(task / "labelsTs"), str(task / "pred")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "looks like ground truth" in err and "--pred DIR --gt DIR" in err
    # the explicit form: class names from the dataset.json beside the ground truth
    assert _main(cli_evaluate, ["evaluate", "--gt", str(task / "labelsTs"), "--pred", str(task / "pred")]) == 0
    out = capsys.readouterr().out
    assert "1 liver" in out and "2 tumour" in out and "HD95" in out and "class names:" in out
    # the positional form in this command's order still works
    assert _main(cli_evaluate, ["evaluate", str(task / "pred"), str(task / "labelsTs"), "--no-surface"]) == 0
    out = capsys.readouterr().out
    assert "HD95" not in out and "ASD" not in out and "nan" not in out and "liver" in out
    # mixing the two forms, or half of the named one: one line each
    assert _main(cli_evaluate, ["evaluate", str(task / "pred"), "--gt", str(task / "labelsTs")]) == 1
    assert "either as PRED_DIR GT_DIR or with --pred and --gt" in capsys.readouterr().err
    assert _main(cli_evaluate, ["evaluate", "--gt", str(task / "labelsTs")]) == 1
    assert "--pred and --gt go together" in capsys.readouterr().err


def test_evaluate_csv_without_surface_and_names_from_a_checkpoint(task, tmp_path, capsys):
    ck = tmp_path / "model.pt"
    torch.save({"model": {}, "preprocessing": {"class_names": ["bg", "organ", "lesion"]}}, ck)
    csv_path = tmp_path / "m.csv"
    assert _main(cli_evaluate, ["evaluate", "--pred", str(task / "pred"), "--gt", str(task / "labelsTs"),
                                "--classes", str(ck), "--no-surface", "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "1 organ" in out and "2 lesion" in out
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "case,label,dice,pred_voxels,gt_voxels,intersection,class"
    assert rows[1].startswith("case,1,") and rows[1].endswith(",organ")


def test_evaluate_shape_error_names_the_ground_truth(task, capsys):
    _save(task / "pred" / "case.nii.gz", np.zeros((16, 18, 7), np.uint8))
    assert _main(cli_evaluate, ["evaluate", "--pred", str(task / "pred"), "--gt", str(task / "labelsTs")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from the ground truth" in err and "image" not in err
    assert "(16, 18, 7)" in err and "(16, 18, 6)" in err


def test_class_names_in_both_dataset_json_formats(tmp_path):
    (tmp_path / "msd.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    (tmp_path / "v2.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "both": [1, 2]}}))
    assert class_names_from(tmp_path / "msd.json") == {0: "background", 1: "liver"}
    assert class_names_from(tmp_path / "v2.json") == {0: "background", 1: "liver"}
    (tmp_path / "none.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="declares no class names"):
        class_names_from(tmp_path / "none.json")
    sub = tmp_path / "labelsTs"
    sub.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}}))
    assert find_class_names(sub) == ({0: "bg", 1: "x"}, tmp_path / "dataset.json")


def test_order_detection_only_flags_clear_cases(tmp_path):
    assert order_problem(tmp_path / "labelsTs", tmp_path / "predictions")
    assert order_problem(tmp_path / "run1", tmp_path / "seg_out")  # the truth folder named like output
    assert order_problem(tmp_path / "pred", tmp_path / "labelsTs") is None
    assert order_problem(tmp_path / "labels", tmp_path / "labels") is None  # same folder: symmetric
    assert order_problem(tmp_path / "a", tmp_path / "b") is None  # nothing to go by


def test_show_colours_stand_out_and_stay_fixed_per_label():
    colours = cli_show.label_colours(20)
    assert len(colours) == 20 and len(set(colours)) == 20
    for r, g, b in colours:
        _, s, v = colorsys.rgb_to_hsv(r, g, b)
        assert s >= 0.8 and v >= 0.8  # never grey, dark or washed out on a greyscale image
    assert cli_show.label_colours(3) == colours[:3]  # label i's colour does not depend on how many there are


def test_show_title_centre_and_legend(task, tmp_path, capsys):
    other = tmp_path / "other" / "case.nii.gz"
    _save(other, np.zeros((16, 18, 6), np.uint8))
    title = cli_show.make_title(task / "imagesTs" / "case.nii.gz", task / "labelsTs" / "case.nii.gz")
    assert title == "image: imagesTs/case.nii.gz | segmentation: labelsTs/case.nii.gz"
    png1, png2 = tmp_path / "a.png", tmp_path / "b.png"
    # centred on the ground truth: the prediction's rendering passes through the same slices
    assert _main(cli_show, ["show", str(task / "imagesTs" / "case.nii.gz"), "--seg", str(task / "pred" / "case.nii.gz"),
                            "--center-on", str(task / "labelsTs" / "case.nii.gz"), "--out", str(png1)]) == 0
    out1 = capsys.readouterr().out
    assert _main(cli_show, ["show", str(task / "imagesTs" / "case.nii.gz"), "--seg",
                            str(task / "labelsTs" / "case.nii.gz"), "--out", str(png2)]) == 0
    out2 = capsys.readouterr().out
    slices = [o.split("(slices ")[1].split(";")[0] for o in (out1, out2)]
    assert slices[0] == slices[1] and "--slice" in out1
    assert png1.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an empty label map to centre on: one line
    assert _main(cli_show, ["show", str(task / "imagesTs" / "case.nii.gz"), "--center-on", str(other),
                            "--out", str(png1)]) == 1
    assert "no foreground voxel" in capsys.readouterr().err


def test_show_legend_uses_class_names(task, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    seen = {}
    real = Figure.legend

    def spy(self, *a, **k):
        seen["labels"] = [h.get_label() for h in k.get("handles", [])]
        seen["colours"] = [h.get_facecolor()[:3] for h in k.get("handles", [])]
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "legend", spy)
    seg = np.zeros((10, 10, 4), np.uint8)
    seg[1:3, 1:3, 1] = 1
    seg[5:8, 5:8, 1] = 8
    cli_show.render(np.random.default_rng(0).random((10, 10, 4)), (1, 1, 4), seg, tmp_path / "x.png",
                    names={0: "background", 1: "liver", 8: "vessel"}, title="t")
    assert seen["labels"] == ["1 liver", "8 vessel"]
    r, g, b = seen["colours"][1]
    assert colorsys.rgb_to_hsv(r, g, b)[1] >= 0.8  # label 8 is a saturated colour, not grey
