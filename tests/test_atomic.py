"""ahnet_fast._atomic: temporary file in the destination folder, then os.replace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ahnet_fast._atomic import atomic_path, atomic_write_bytes, atomic_write_text, current_umask


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
        assert tmp.endswith(".nii.gz") and os.path.basename(tmp).startswith(".seg.nii.gz.")
        Path(tmp).write_bytes(b"z")
    assert (tmp_path / "seg.nii.gz").read_bytes() == b"z"


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
