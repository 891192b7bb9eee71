"""`ahnet-fast segment --nproc 2` (torch's elastic launcher, gloo on CPU): the volumes are split
over the ranks, each output is written once, by one rank, and equals the single-process output."""
from __future__ import annotations

import argparse
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from ahnet_fast.cli import segment as cli_segment

CONFIG = {"layers": (1, 1, 1, 1), "in_channels": 1, "out_channels": 3, "psp_block_num": 0,
          "upsample_mode": "trilinear"}


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ahnet-fast")
    cli_segment.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_shard_round_robin_covers_every_pair_once():
    pairs = [(f"in{i}", f"out{i}") for i in range(7)]
    shards = [cli_segment.shard(pairs, r, 3) for r in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(pairs)
    assert [len(s) for s in shards] == [3, 2, 2]


@pytest.mark.timeout(240)
def test_segment_folder_over_two_processes(tmp_path, capfd):
    from ahnet_fast.data.mni import template_paths
    from ahnet_fast.infer.model_io import save_model_checkpoint
    from ahnet_fast.reference import AHNet

    t1 = nib.load(str(template_paths()["t1"]))
    aff = t1.affine.copy()
    aff[:3, :3] *= 4
    src = tmp_path / "in"
    src.mkdir()
    for i, z0 in enumerate((60, 70, 80)):  # three real crops of the MNI152 T1, 24 x 28 x 10 voxels
        vol = np.asarray(t1.dataobj[40:136:4, 50:162:4, z0:z0 + 40:4], dtype=np.float32)
        nib.Nifti1Image(vol, aff).to_filename(str(src / f"case{i}.nii.gz"))
    torch.manual_seed(3)
    ckpt = save_model_checkpoint(tmp_path / "model.pt", AHNet(**CONFIG).eval(), CONFIG,
                                 intensity={"mode": "percentile"})
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--window", "32", "32", "32"]
    assert _main(["segment", str(src), str(tmp_path / "one"), *common]) == 0
    capfd.readouterr()
    assert _main(["segment", str(src), str(tmp_path / "two"), *common, "--nproc", "2", "--dist-timeout", "60"]) == 0
    out = capfd.readouterr().out
    # every input was segmented by exactly one rank, and both ranks worked
    written = re.findall(r"(case\d)\.nii\.gz -> ", out)
    assert sorted(written) == ["case0", "case1", "case2"], out
    assert "[rank 0/2] segmented 2 of its 2 case(s) (3 in all)" in out
    assert "[rank 1/2] segmented 1 of its 1 case(s) (3 in all)" in out
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    for i in range(3):
        a = nib.load(str(tmp_path / "one" / f"case{i}.nii.gz"))
        b = nib.load(str(tmp_path / "two" / f"case{i}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
        np.testing.assert_allclose(b.affine, a.affine)
