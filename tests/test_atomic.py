"""ahnet_fast._atomic: temporary file in the destination folder, then os.replace."""

from __future__ import annotations

import fnmatch
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ahnet_fast._atomic import (
    atomic_group,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temps,
    current_umask,
    is_temp_name,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_success_replaces_and_leaves_only_the_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with atomic_path(dest) as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).exists()
        assert dest.read_bytes() == b"old"  # the destination is untouched until the body ends
        Path(tmp).write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_old_file_and_removes_temporary(tmp_path: Path, exc: BaseException) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_path(dest) as tmp:
            Path(tmp).write_bytes(b"partial")
            raise exc
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_failure_when_writer_already_removed_temporary(tmp_path: Path) -> None:
    # a writer that deletes its own partial output must not turn the error into FileNotFoundError
    with pytest.raises(ValueError, match="bad"):
        with atomic_path(tmp_path / "x.txt") as tmp:
            os.unlink(tmp)
            raise ValueError("bad")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_mode_follows_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_text(tmp_path / "b.txt", "y", fsync=True)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == 0o666 & ~mask
    assert _mode(tmp_path / "b.txt") == 0o666 & ~mask


def test_suffix_is_kept_for_format_sniffing_writers(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "seg.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.endswith(".nii.gz")
        # what the folder shows while writing: one hidden entry of the destination's name that no
        # input pattern matches (a hidden "*.nii.gz" was taken as an input by `segment FOLDER`)
        (entry,) = os.listdir(tmp_path)
        assert entry.startswith(".seg.nii.gz.") and is_temp_name(entry)
        assert not any(fnmatch.fnmatch(entry, pat) for pat in ("*.nii.gz", "*.nii", "*.pt", "*.png", "*.json"))
        Path(tmp).write_bytes(b"z")
    assert (tmp_path / "seg.nii.gz").read_bytes() == b"z"
    assert os.listdir(tmp_path) == ["seg.nii.gz"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_writers_are_cleaned_on_the_next_write(tmp_path: Path) -> None:
    """kill -9 leaves temporaries behind; the next write (or clean_stale_temps) removes those whose
    process is gone, and keeps a live writer's and another host's."""
    from ahnet_fast._atomic import _host

    dead, host = _dead_pid(), _host()
    stale_file = tmp_path / f".last.pt.{host}-{dead}.abc123_x.tmp"
    stale_file.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".seg.nii.gz.{host}-{dead}.q1w2e3r4.tmpd"
    stale_dir.mkdir()
    (stale_dir / "out.nii.gz").write_bytes(b"y")
    live = tmp_path / f".last.pt.{host}-{os.getppid()}.zzzzzzzz.tmp"
    other_host = tmp_path / f".last.pt.{host}x-{dead}.zzzzzzzz.tmp"
    live.write_bytes(b"")
    other_host.write_bytes(b"")
    # names earlier versions used (the 140 MB ".last.pt.*.tmp" of a killed run): removed once an hour old
    legacy_old = tmp_path / ".last.pt.k2j4h5g6.tmp"
    legacy_new = tmp_path / ".seg.nii.gz.a1b2c3d4.tmp.nii.gz"
    legacy_old.write_bytes(b"z")
    legacy_new.write_bytes(b"z")
    os.utime(legacy_old, (1e9, 1e9))
    atomic_write_bytes(tmp_path / "last.pt", b"new")  # cleans only its own destination's leftovers
    assert not stale_file.exists() and not legacy_old.exists() and stale_dir.exists()
    assert clean_stale_temps(tmp_path) == [stale_dir.name]
    assert sorted(os.listdir(tmp_path)) == sorted(["last.pt", live.name, other_host.name, legacy_new.name])


def test_group_publishes_the_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probabilities and labels of one case: a failure between the two renames never leaves new
    probabilities beside old labels (the labels, published last, are removed first)."""
    prob, lab = tmp_path / "c_probabilities.nii.gz", tmp_path / "c.nii.gz"
    prob.write_bytes(b"old-p")
    lab.write_bytes(b"old-l")
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # killed between the probability and the label rename
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_group([prob, lab], [".nii.gz", ".nii.gz"]) as (tp, tl):
            Path(tp).write_bytes(b"new-p")
            Path(tl).write_bytes(b"new-l")
    monkeypatch.setattr(os, "replace", real_replace)
    assert prob.read_bytes() == b"new-p" and not lab.exists()  # no label: the case reads as not done
    with atomic_group([prob, lab], [".nii.gz", ".nii.gz"]) as (tp, tl):
        Path(tp).write_bytes(b"p2")
        Path(tl).write_bytes(b"l2")
    assert prob.read_bytes() == b"p2" and lab.read_bytes() == b"l2"
    assert sorted(os.listdir(tmp_path)) == ["c.nii.gz", "c_probabilities.nii.gz"]
    # a writer that fails before publishing leaves both old files and no temporary
    with pytest.raises(OSError):
        with atomic_group([prob, lab], [".nii.gz", ".nii.gz"]) as (tp, tl):
            Path(tp).write_bytes(b"p3")
            raise OSError("disk full")
    assert prob.read_bytes() == b"p2" and lab.read_bytes() == b"l2"
    assert sorted(os.listdir(tmp_path)) == ["c.nii.gz", "c_probabilities.nii.gz"]


def test_missing_folder_raises_unless_mkdir(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "c.txt"
    with pytest.raises(FileNotFoundError):
        atomic_write_text(dest, "x")
    atomic_write_text(dest, "héllo", mkdir=True)
    assert dest.read_text(encoding="utf-8") == "héllo"
    assert os.listdir(dest.parent) == ["c.txt"]


def test_relative_destination_in_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    atomic_write_bytes("rel.bin", b"r", fsync=True)
    assert (tmp_path / "rel.bin").read_bytes() == b"r"
    assert os.listdir(tmp_path) == ["rel.bin"]


def test_users_keep_umask_mode(tmp_path: Path) -> None:
    """Checkpoints and NIfTI outputs are written through the helper: readable per umask, not 0600."""
    import numpy as np
    import torch

    from ahnet_fast.data.nifti import load_volume, save_like
    from ahnet_fast.train.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        ck = save_checkpoint(tmp_path / "ck" / "last.pt", {"w": torch.ones(2)})
        import nibabel as nib

        src = tmp_path / "a.nii"
        nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), str(src))
        seg = save_like(np.ones((2, 3, 4), np.uint8), load_volume(src), tmp_path / "seg.nii.gz")
    finally:
        os.umask(old)
    assert _mode(ck) == 0o644 and _mode(seg) == 0o644
    assert seg.read_bytes()[:2] == b"\x1f\x8b"  # gzip: the writer saw the .nii.gz suffix
    assert sorted(os.listdir(tmp_path)) == ["a.nii", "ck", "seg.nii.gz"]
