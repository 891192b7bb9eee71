"""CLI plumbing on a small real volume (a crop of nilearn's MNI152 template) with a random tiny AH-Net.

Quality is the training tests' business; here: files in, files out, on the input's grid, orientation
restored, atomic, and clear errors for bad input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ahnet_fast.cli import evaluate as cli_evaluate
from ahnet_fast.cli import segment as cli_segment
from ahnet_fast.cli import show as cli_show

CONFIG = {"layers": (1, 1, 1, 1), "in_channels": 1, "out_channels": 4, "psp_block_num": 0,
          "upsample_mode": "trilinear"}


def _main(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ahnet-fast")
    module.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ahnet_fast.data.mni import make_labels, template_paths
    from ahnet_fast.infer.model_io import save_model_checkpoint
    from ahnet_fast.reference import AHNet

    root = tmp_path_factory.mktemp("cli")
    paths = template_paths()
    t1_img = nib.load(str(paths["t1"]))
    sl = np.s_[40:152:4, 50:178:4, 60:108:4]  # 28 x 32 x 12 voxels of 4 x 4 x 4 mm
    t1, gm, wm = (np.asarray(nib.load(str(paths[k])).dataobj[sl], dtype=np.float32) for k in ("t1", "gm", "wm"))
    lab = make_labels(t1, gm, wm).astype(np.uint8)
    img = t1
    aff = t1_img.affine.copy()
    aff[:3, :3] *= 4
    aff[:3, 2] *= 2  # 4 x 4 x 8 mm: z is the coarse axis
    aff[:3, 3] = (t1_img.affine @ np.array([40, 50, 60, 1]))[:3]
    (root / "images").mkdir()
    (root / "labels").mkdir()
    nib.Nifti1Image(img, aff).to_filename(str(root / "images" / "brain.nii.gz"))
    nib.Nifti1Image(lab, aff).to_filename(str(root / "labels" / "brain.nii.gz"))
    # the same scan stored flipped and permuted (LPS-like, slices first)
    flip = np.ascontiguousarray(img[::-1, ::-1, :].transpose(2, 0, 1))
    m = np.zeros((4, 4))
    m[:3, 0] = aff[:3, 2]
    m[:3, 1] = -aff[:3, 0]
    m[:3, 2] = -aff[:3, 1]
    m[:3, 3] = (aff @ np.array([img.shape[0] - 1, img.shape[1] - 1, 0, 1]))[:3]
    m[3, 3] = 1
    nib.Nifti1Image(flip, m).to_filename(str(root / "flipped.nii.gz"))
    torch.manual_seed(1)
    model = AHNet(**CONFIG).eval()
    ckpt = save_model_checkpoint(root / "model.pt", model, CONFIG, intensity={"mode": "percentile"},
                                 optimizer={"note": "ignored"})
    return root, img, lab, aff, ckpt


def test_segment_file_restores_grid_and_orientation(data, tmp_path):
    root, img, lab, aff, ckpt = data
    out = tmp_path / "seg.nii.gz"
    assert _main(cli_segment, ["segment", str(root / "images" / "brain.nii.gz"), str(out),
                               "--checkpoint", str(ckpt), "--probabilities", "--device", "cpu"]) == 0
    seg = nib.load(str(out))
    assert seg.shape == img.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, aff, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    assert labels.max() <= 3
    prob = nib.load(str(tmp_path / "seg_probabilities.nii.gz")).get_fdata()
    assert prob.shape == img.shape + (4,)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prob.argmax(-1), labels)
    # the flipped/permuted copy gives the same segmentation, stored on its own grid
    out2 = tmp_path / "seg_flipped.nii.gz"
    assert _main(cli_segment, ["segment", str(root / "flipped.nii.gz"), str(out2), "--checkpoint", str(ckpt)]) == 0
    seg2 = nib.load(str(out2))
    np.testing.assert_allclose(seg2.affine, nib.load(str(root / "flipped.nii.gz")).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(seg2.dataobj),
                                  np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 0, 1)))


def test_segment_folder_dataset_json_evaluate_and_show(data, tmp_path, capsys):
    root, img, lab, aff, ckpt = data
    ds = {"training": [{"image": "images/brain.nii.gz", "label": "labels/brain.nii.gz"}],
          "test": ["images/brain.nii.gz"], "labels": {"0": "bg", "1": "csf", "2": "gm", "3": "wm"}}
    (root / "dataset.json").write_text(json.dumps(ds))
    out_dir = tmp_path / "pred"
    assert _main(cli_segment, ["segment", str(root / "dataset.json"), str(out_dir), "--checkpoint", str(ckpt),
                               "--cascade", "--overlap", "0.5", "--window", "32", "32", "32"]) == 0
    assert "cascade: pass 2 on" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["brain.nii.gz"]
    # evaluating the ground truth against itself: perfect scores; the prediction: valid numbers
    csv_path = tmp_path / "m.csv"
    assert _main(cli_evaluate, ["evaluate", str(root / "labels"), str(root / "labels"), "--csv", str(csv_path)]) == 0
    table = capsys.readouterr().out
    assert "1.0000" in table and "Dice glob" in table
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("case,label,dice,hd95_mm") and len(rows) == 4
    assert all(r.split(",")[2] == "1.000000" and float(r.split(",")[3]) == 0.0 for r in rows[1:])
    assert _main(cli_evaluate, ["evaluate", str(out_dir), str(root / "labels"), "--labels", "1", "2", "3"]) == 0
    assert "mean" in capsys.readouterr().out
    # a folder input segments every NIfTI in it
    out_dir2 = tmp_path / "pred2"
    assert _main(cli_segment, ["segment", str(root / "images"), str(out_dir2), "--checkpoint", str(ckpt),
                               "--blend", "constant"]) == 0
    assert (out_dir2 / "brain.nii.gz").is_file()
    png = tmp_path / "brain.png"
    assert _main(cli_show, ["show", str(root / "images" / "brain.nii.gz"), "--seg",
                            str(root / "labels" / "brain.nii.gz"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_inputs_clear_errors_nothing_written(data, tmp_path, capsys):
    root, img, lab, aff, ckpt = data
    from ahnet_fast.infer.model_io import save_model_checkpoint
    from ahnet_fast.reference import AHNet

    out = tmp_path / "seg.nii.gz"
    # checkpoint of another configuration: the mismatch is stated
    other = dict(CONFIG, out_channels=3)
    bad_ckpt = tmp_path / "other.pt"
    save_model_checkpoint(bad_ckpt, AHNet(**other), other)
    torch.save({"model_config": CONFIG, "model": torch.load(bad_ckpt, weights_only=True)["model"]},
               tmp_path / "lying.pt")
    assert _main(cli_segment, ["segment", str(root / "images" / "brain.nii.gz"), str(out),
                               "--checkpoint", str(tmp_path / "lying.pt")]) == 1
    err = capsys.readouterr().err
    assert "lying.pt" in err and "shape mismatch" in err and "final" in err and "(3," in err and "(4," in err
    torch.save({"state_dict": {}}, tmp_path / "nomodel.pt")
    assert _main(cli_segment, ["segment", str(root / "images" / "brain.nii.gz"), str(out),
                               "--checkpoint", str(tmp_path / "nomodel.pt")]) == 1
    assert "model_config" in capsys.readouterr().err
    # NaN voxels, non-3D, unreadable: the file is named, nothing is written
    nan = img.copy()
    nan[3, 4, 5] = np.nan
    nib.Nifti1Image(nan, aff).to_filename(str(tmp_path / "nan.nii.gz"))
    nib.Nifti1Image(np.stack([img, img], -1), aff).to_filename(str(tmp_path / "four_d.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti" * 10)
    for name, msg in [("nan.nii.gz", "NaN or Inf"), ("four_d.nii.gz", "expected a 3D image"),
                      ("junk.nii.gz", "cannot read")]:
        assert _main(cli_segment, ["segment", str(tmp_path / name), str(out), "--checkpoint", str(ckpt)]) == 1
        err = capsys.readouterr().err
        assert name in err and msg in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # missing prediction for a ground-truth case
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _main(cli_evaluate, ["evaluate", str(empty), str(root / "labels")]) == 1
    assert "no prediction" in capsys.readouterr().err


def test_intensity_read_from_a_training_checkpoint_without_warning():
    """The trainer records its normalisation under 'preprocessing'; segment must use it (a CT
    window model normalised with percentiles would be silently wrong)."""
    import warnings

    from ahnet_fast.infer.segment import intensity_from_meta

    meta = {"preprocessing": {"intensity": {"mode": "ct", "window": [-100.0, 200.0]}, "num_classes": 3}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = intensity_from_meta(meta)
    assert cfg.mode == "ct" and tuple(cfg.window) == (-100.0, 200.0)
