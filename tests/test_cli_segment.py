"""CLI plumbing on a small real volume (a crop of nilearn's MNI152 template) with a random tiny AH-Net.

Quality is the training tests' business; here: files in, files out, on the input's grid, orientation
restored, atomic, and clear errors for bad input.
"""
from __future__ import annotations

import argparse
import json
import re
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


def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_outputs_never_overwrite_inputs_or_each_other(data, tmp_path, capsys):
    """Checked before the model loads (the checkpoint named here does not even exist): same path,
    the same file through a symbolic or hard link, a folder into itself, two cases with one name."""
    import os
    import shutil

    root = data[0]
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(root / "images" / "brain.nii.gz", src / "brain.nii.gz")
    img = src / "brain.nii.gz"
    before = _bytes_of(src)
    os.symlink(img, tmp_path / "soft.nii.gz")
    os.link(img, tmp_path / "hard.nii.gz")
    missing = str(tmp_path / "no_such_checkpoint.pt")
    for out in (img, tmp_path / "soft.nii.gz", tmp_path / "hard.nii.gz"):
        assert _main(cli_segment, ["segment", str(img), str(out), "--checkpoint", missing]) == 1
        err = capsys.readouterr().err
        assert "would overwrite the input" in err and str(img) in err and "checkpoint" not in err
    # a folder into itself, also through a link to the folder
    os.symlink(src, tmp_path / "src_link")
    for out in (src, tmp_path / "src_link"):
        assert _main(cli_segment, ["segment", str(src), str(out), "--checkpoint", missing]) == 1
        assert "would overwrite the input" in capsys.readouterr().err
    # --probabilities: x's probabilities would land on the input named x_probabilities
    shutil.copy(img, src / "brain_probabilities.nii.gz")
    out_dir = tmp_path / "pred"
    assert _main(cli_segment, ["segment", str(src), str(out_dir), "--probabilities", "--checkpoint", missing]) == 1
    assert "both" in capsys.readouterr().err and not out_dir.exists()
    (src / "brain_probabilities.nii.gz").unlink()
    # a dataset.json whose test cases share a file name
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(img, tmp_path / sub / "img.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "a/img.nii.gz", "label": "a/img.nii.gz"}], "test": ["a/img.nii.gz", "b/img.nii.gz"]}))
    assert _main(cli_segment, ["segment", str(tmp_path / "dataset.json"), str(out_dir), "--checkpoint", missing]) == 1
    err = capsys.readouterr().err
    assert "a/img.nii.gz and " in err and "b/img.nii.gz would be written" in err and not out_dir.exists()
    assert _bytes_of(src) == before


def test_option_and_device_errors_come_first_and_name_the_option(tmp_path, capsys):
    img, out, missing = str(tmp_path / "none.nii.gz"), str(tmp_path / "o.nii.gz"), str(tmp_path / "none.pt")
    cases = [(["--overlap", "1"], "--overlap 1: expected a fraction in [0, 1)"),
             (["--window", "0", "0", "0"], "--window 0 0 0: expected 3 positive sizes"),
             (["--sw-batch-size", "0"], "--sw-batch-size 0: expected an integer >= 1"),
             (["--device", "gpu7"], "--device gpu7: not a device name"),
             (["--stitch-device", "cuda:99"], "--stitch-device cuda:99: ")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    for opts, msg in cases:
        assert _main(cli_segment, ["segment", img, out, "--checkpoint", missing, *opts]) == 2
        err = capsys.readouterr().err
        assert msg in err and "none.nii.gz" not in err and "none.pt" not in err, err


def _corrupt_tensor_bytes(path: Path, tensor: torch.Tensor, n: int = 4096) -> None:
    blob = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = bytes(blob).find(raw[:256])
    assert at > 0 and len(raw) > n
    blob[at + 128:at + 128 + n] = bytes(b ^ 0x5A for b in blob[at + 128:at + 128 + n])
    path.write_bytes(bytes(blob))


def test_checkpoints_are_checked_before_anything_is_built(data, tmp_path, capsys):
    import pickle
    import time

    from ahnet_fast.infer.model_io import CheckpointError, load_model, save_model_checkpoint
    from ahnet_fast.reference import AHNet

    root, img, lab, aff, ckpt = data
    state = torch.load(ckpt, weights_only=True)["model"]
    seg = [str(root / "images" / "brain.nii.gz"), str(tmp_path / "seg.nii.gz")]
    # model_config out of the constructor's ranges, or naming a file to open: refused at once
    t0 = time.perf_counter()
    for bad, msg in [({"out_channels": 2_000_000}, "model_config['out_channels'] = 2000000 is not accepted"),
                     ({"layers": (20000, 1, 1, 1)}, "model_config['layers'] = (20000, 1, 1, 1)"),
                     ({"pretrained": "/etc/shadow"}, "model_config['pretrained'] = '/etc/shadow'"),
                     ({"hidden_hook": 1}, "unknown entries ['hidden_hook']")]:
        torch.save({"model_config": {**CONFIG, **bad}, "model": state}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=re.escape(msg)):
            load_model(tmp_path / "bad.pt")
    assert time.perf_counter() - t0 < 5
    # 4 KB flipped inside a weight tensor: torch.load reads it without complaint; the hash does not
    torch.manual_seed(1)
    model = AHNet(**CONFIG)
    save_model_checkpoint(tmp_path / "flip.pt", model, CONFIG)
    load_model(tmp_path / "flip.pt")  # intact: loads
    key = max(model.state_dict(), key=lambda k: model.state_dict()[k].numel())
    _corrupt_tensor_bytes(tmp_path / "flip.pt", model.state_dict()[key])
    assert _main(cli_segment, ["segment", *seg, "--checkpoint", str(tmp_path / "flip.pt")]) == 1
    assert "flip.pt: the checkpoint is corrupted" in capsys.readouterr().err
    # NaN weights (hash intact): refused, not an all-background segmentation
    nan_model = AHNet(**CONFIG)
    with torch.no_grad():
        nan_model.final.conv.weight[0, 0].fill_(float("nan"))
    save_model_checkpoint(tmp_path / "nan.pt", nan_model, CONFIG)
    assert _main(cli_segment, ["segment", *seg, "--checkpoint", str(tmp_path / "nan.pt")]) == 1
    err = capsys.readouterr().err
    assert "nan.pt: the weights hold NaN/Inf values in 1 tensor(s): final.conv.weight" in err
    # random bytes: not a checkpoint, and no advice to unpickle it
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    assert _main(cli_segment, ["segment", *seg, "--checkpoint", str(tmp_path / "noise.pt")]) == 1
    err = capsys.readouterr().err
    assert "noise.pt: not a PyTorch checkpoint" in err and "pickle" not in err.replace("legacy pickle", "")
    # a pickle with code in it: still refused on every path, with the advice where it applies
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        torch.save({"model_config": CONFIG, "model": state, "x": Evil()}, fh, pickle_module=pickle)
    assert _main(cli_segment, ["segment", *seg, "--checkpoint", str(tmp_path / "evil.pt")]) == 1
    out = capsys.readouterr()
    assert "safe loader" in out.err and "--allow-pickle" in out.err and "pwned" not in out.out
    assert not (tmp_path / "seg.nii.gz").exists()


def test_nonfinite_logits_are_reported():
    from ahnet_fast.infer.segment import NonFiniteOutputError, SegmentOptions, predict_volume

    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[..., 0] = float("nan")
            return out

    with pytest.raises(NonFiniteOutputError, match="NaN/Inf logits"):
        predict_volume(np.zeros((8, 8, 4), np.float32), Broken(), SegmentOptions(window=(8, 8, 4)))


def test_output_failures_name_the_output_and_leave_nothing(data, tmp_path, capsys, monkeypatch):
    import errno
    import shutil
    import tempfile

    from ahnet_fast._atomic import _host

    root, img, lab, aff, ckpt = data
    src = str(root / "images" / "brain.nii.gz")
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real_tf = tempfile.TemporaryFile

    def read_only(*a, **k):
        if str(k.get("dir")) == str(out_dir):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_tf(*a, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert _main(cli_segment, ["segment", src, str(out_dir / "s.nii.gz"), "--checkpoint",
                               str(tmp_path / "missing.pt")]) == 1
    err = capsys.readouterr().err
    assert f"{out_dir}: output folder is not writable (Read-only file system)" in err and "brain" not in err
    monkeypatch.setattr(tempfile, "TemporaryFile", real_tf)
    # a full disk while writing: the output is named, not the input; no file, no temporary left
    real_write = nib.Nifti1Image.to_filename

    def disk_full(self, name, **kw):
        real_write(self, name, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", disk_full)
    # an input folder holding what an interrupted write of an older version (or another tool) left:
    # a hidden *.nii.gz, which is not an input
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    shutil.copy(src, in_dir / "s.nii.gz")
    (in_dir / ".s.nii.gz.x1y2z3.tmp.nii.gz").write_bytes(b"partial")
    out_dir = tmp_path / "full"
    out_dir.mkdir()
    # a temporary left in the output folder by a run killed with SIGKILL is cleaned
    stale = out_dir / f".s.nii.gz.{_host()}-{_dead_pid()}.abcdefgh.tmpd"
    stale.mkdir()
    (stale / "out.nii.gz").write_bytes(b"x" * 1000)
    assert _main(cli_segment, ["segment", str(in_dir), str(out_dir), "--checkpoint", str(ckpt),
                               "--probabilities", "--window", "32", "32", "32"]) == 1
    err = capsys.readouterr().err
    out = out_dir / "s.nii.gz"
    assert f"{out}: cannot write the output (No space left on device)" in err and f"error: {in_dir}" not in err
    assert ".s.nii.gz.x1y2z3" not in err and "1 of 1 case(s) failed" in err
    assert list(out_dir.iterdir()) == []


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_any_unexpected_failure_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    import ahnet_fast.infer.segment as seg_mod
    from ahnet_fast.cli import main

    def broken(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(seg_mod, "collect_inputs", broken)
    (tmp_path / "a.nii.gz").write_bytes(b"")  # paths are checked before anything else: let it pass
    argv = ["segment", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--checkpoint", "c.pt"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "ahnet-fast: error: KeyError: 'boom' (`ahnet-fast --debug segment ...` shows the traceback)\n"
    with pytest.raises(KeyError):
        main([*argv, "--debug"])
    with pytest.raises(KeyError):
        main(["--debug", *argv])
    if not torch.cuda.is_available():  # train and demo check --device before reading anything
        for cmd in (["train", str(tmp_path / "none"), "--out", str(tmp_path / "o")], ["demo"]):
            assert main([*cmd, "--device", "cuda"]) == 2
            assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_compiled_inference_is_built_once_and_reused(monkeypatch, capsys):
    """--compile: the model is compiled once per process and model and reused for every volume
    (torch.compile replaced by a counting stand-in: a real inductor build takes minutes here);
    --no-compile and the default never compile; the two flags exclude each other."""
    import ahnet_fast.infer.compiled as compiled
    from ahnet_fast.infer.segment import SegmentOptions, predict_volume

    calls = []

    def fake_compile(model, **kw):
        calls.append(kw)
        return model

    monkeypatch.setattr(compiled.torch, "compile", fake_compile)
    monkeypatch.setattr(compiled, "compile_available", lambda: (True, ""))

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x], 1)

    net = Net().eval()
    image = np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float32)
    plain = predict_volume(image, net, SegmentOptions(window=(8, 8, 4)))
    assert calls == [] and "compile_seconds" not in plain.stats
    predict_volume(image, net, SegmentOptions(window=(8, 8, 4), compile=False))
    assert calls == []
    for _ in range(2):
        res = predict_volume(image, net, SegmentOptions(window=(8, 8, 4), compile=True))
        np.testing.assert_array_equal(res.labels, plain.labels)
        assert "compile_seconds" in res.stats
    assert len(calls) == 1 and calls[0]["options"] == {"freezing": True}
    compiled.forget(net)

    with pytest.raises(SystemExit):
        _main(cli_segment, ["segment", "in.nii.gz", "out.nii.gz", "--checkpoint", "m.pt", "--compile", "--no-compile"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_paths_are_checked_first_and_a_missing_output_folder_is_created(data, tmp_path, capsys):
    root, img, _, aff, ckpt = data
    src = str(root / "images" / "brain.nii.gz")
    (tmp_path / "afile").write_text("")
    for args, msg in (([src, str(tmp_path / "afile" / "x.nii.gz")], "is a file, not a folder"),
                      ([src, str(tmp_path / "x.png")], "must end in .nii or .nii.gz"),
                      ([str(tmp_path / "nothing.nii.gz"), str(tmp_path / "x.nii.gz")], "no such file or folder")):
        assert _main(cli_segment, ["segment", *args, "--checkpoint", str(ckpt)]) == 1
        assert msg in capsys.readouterr().err
    assert _main(cli_segment, ["segment", src, str(tmp_path / "y.nii.gz"), "--checkpoint", str(tmp_path)]) == 1
    assert "--checkpoint must be a file" in capsys.readouterr().err and not (tmp_path / "y.nii.gz").exists()
    out = tmp_path / "new" / "deeper" / "seg.nii.gz"
    assert _main(cli_segment, ["segment", src, str(out), "--checkpoint", str(ckpt)]) == 0
    written = nib.load(str(out))
    assert written.shape == img.shape and np.allclose(written.affine, aff)


def test_segment_resamples_to_the_training_spacing_and_says_what_it_did(data, tmp_path, capsys):
    """The checkpoint's training spacing (8 x 8 x 8 mm) against a 4 x 4 x 8 mm input: resampled there and
    back, said on stdout with the normalisation's statistics, warned as far; --no-resample and
    --train-spacing (for checkpoints that record none) work."""
    from ahnet_fast.data.spacing import LAYOUT
    from ahnet_fast.infer.model_io import save_model_checkpoint
    from ahnet_fast.reference import AHNet

    root, img, _, aff, old_ckpt = data
    torch.manual_seed(2)
    ckpt = save_model_checkpoint(tmp_path / "sp.pt", AHNet(**CONFIG).eval(), CONFIG, preprocessing={
        "intensity": {"mode": "percentile"}, "spacing": [8.0, 8.0, 8.0], "layout": LAYOUT})
    src = str(root / "images" / "brain.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert _main(cli_segment, ["segment", src, str(out), "--checkpoint", str(ckpt)]) == 0
    cap = capsys.readouterr()
    assert "resampled 28x32x12 at 4 x 4 x 8 mm to 14x16x12 at 8 x 8 x 8 mm (training spacing 8 x 8 x 8 mm)" \
        in cap.out
    assert "intensity: percentiles 0.5-99.5 of voxels > " in cap.out and "foreground" in cap.out
    assert "far from the training spacing 8 x 8 x 8 mm (H 4 vs 8 mm, W 4 vs 8 mm)" in cap.err
    written = nib.load(str(out))
    assert written.shape == img.shape and np.allclose(written.affine, aff)

    assert _main(cli_segment, ["segment", src, str(tmp_path / "n.nii.gz"), "--checkpoint", str(ckpt),
                               "--no-resample"]) == 0
    cap = capsys.readouterr()
    assert "not resampled (--no-resample)" in cap.out and "the model sees structures at the wrong size" in cap.err

    # a checkpoint from before spacing was recorded (its warning: test_spacing.py): --train-spacing supplies it
    assert _main(cli_segment, ["segment", src, str(tmp_path / "o2.nii.gz"), "--checkpoint", str(old_ckpt),
                               "--train-spacing", "4", "4", "8"]) == 0
    cap = capsys.readouterr()
    assert "matches the training spacing 4 x 4 x 8 mm: not resampled" in cap.out and cap.err == ""
    # options and paths are checked before anything loads
    for opts, msg in ((["--train-spacing", "1", "0", "4"], "--train-spacing 1 0 4: expected 3 positive sizes"),
                      (["--train-spacing", "1", "1", "4", "--no-resample"], "contradict")):
        assert _main(cli_segment, ["segment", src, str(tmp_path / "x.nii.gz"), "--checkpoint", str(ckpt),
                                   *opts]) == 2
        assert msg in capsys.readouterr().err


def test_window_and_mirroring_follow_the_checkpoint(data, tmp_path, capsys):
    """A checkpoint written by training records its patch and augmentation: `segment` windows
    with that patch and mirrors along the trained flips (saying so); --no-tta runs one pass;
    --tta forces H and W on a checkpoint that records nothing; --window wins over the record."""
    from ahnet_fast.infer.model_io import save_model_checkpoint
    from ahnet_fast.infer.segment import DEFAULT_WINDOW, SegmentOptions
    from ahnet_fast.reference import AHNet

    meta = {"patch_size": [32, 32, 32], "augment": {"flip_axes": [1], "enabled": True}}
    opts = SegmentOptions.from_checkpoint(meta)
    assert tuple(opts.window) == (32, 32, 32) and tuple(opts.mirror_axes) == (1,)
    assert SegmentOptions.from_checkpoint(meta, tta=False).mirror_axes == ()
    assert tuple(SegmentOptions.from_checkpoint(meta, window=(64, 64, 32)).window) == (64, 64, 32)
    off = {"patch_size": [32, 32, 32], "augment": {"flip_axes": [0, 1], "enabled": False}}
    assert SegmentOptions.from_checkpoint(off).mirror_axes == ()
    assert tuple(SegmentOptions.from_checkpoint({}).window) == DEFAULT_WINDOW
    assert SegmentOptions.from_checkpoint({}).mirror_axes == ()
    assert tuple(SegmentOptions.from_checkpoint({}, tta=True).mirror_axes) == (0, 1)

    root, img, lab, aff, ckpt = data
    torch.manual_seed(1)
    trained = save_model_checkpoint(tmp_path / "trained.pt", AHNet(**CONFIG).eval(), CONFIG,
                                    intensity={"mode": "percentile"}, patch_size=[32, 32, 32],
                                    augment={"flip_axes": [0, 1], "enabled": True})
    image = str(root / "images" / "brain.nii.gz")
    outs = {}
    for name, extra, line in (
            ("tta", [], "inference: 32x32x32 windows (the checkpoint's training patch), overlap 0.25, gaussian "
                        "blend, mirrored along H,W (4 passes per window; --no-tta for one)"),
            ("one", ["--no-tta"], "32x32x32 windows (the checkpoint's training patch), overlap 0.25, gaussian "
                                  "blend, no test-time mirroring"),
            ("given", ["--window", "64", "64", "32"], "inference: 64x64x32 windows (--window)")):
        outs[name] = tmp_path / f"{name}.nii.gz"
        assert _main(cli_segment, ["segment", image, str(outs[name]), "--checkpoint", str(trained), *extra]) == 0
        assert line in capsys.readouterr().out
    assert _main(cli_segment, ["segment", image, str(tmp_path / "plain.nii.gz"), "--checkpoint", str(ckpt)]) == 0
    assert "(the default: the checkpoint records no training patch)" in capsys.readouterr().out
    assert _main(cli_segment, ["segment", image, str(tmp_path / "forced.nii.gz"), "--checkpoint", str(ckpt),
                               "--tta"]) == 0
    assert "mirrored along H,W" in capsys.readouterr().out
    assert all(nib.load(str(p)).shape == img.shape for p in outs.values())
