"""NIfTI I/O: network layout (canonical + coarsest axis last), exact round trips, bad input."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ahnet_fast.data.nifti import Volume, VolumeError, load_label, load_volume, save_like

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def _canonical_world(vol: Volume, i, j, k) -> np.ndarray:
    return (vol.affine @ np.array([i, j, k, 1.0]))[:3]


def _write(path: Path, data: np.ndarray, affine: np.ndarray, cls=nib.Nifti1Image) -> Path:
    cls(data, affine).to_filename(str(path))
    return path


def _affines():
    """Flipped / permuted / anisotropic affines and the expected (spacing, coarsest-last) result."""
    rot = np.eye(4)
    # stored axes: 0 -> -y (2 mm), 1 -> x (1 mm), 2 -> z (4 mm) : permuted + flipped
    a1 = np.array([[0, 1.0, 0, 10], [-2.0, 0, 0, 20], [0, 0, 4.0, -5], [0, 0, 0, 1]])
    # coarsest axis stored first (5 mm along x), flipped z
    a2 = np.array([[5.0, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, -0.8, 3], [0, 0, 0, 1]])
    # oblique (small rotation) + LPS-like flips
    c, s = np.cos(0.1), np.sin(0.1)
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    a3 = rot @ np.diag([-1.5, -1.5, 3.0, 1.0])
    return [(a1, (1.0, 2.0, 4.0)), (a2, (0.8, 0.8, 5.0)), (a3, (1.5, 1.5, 3.0))]


@pytest.mark.parametrize("case", range(3))
def test_layout_and_round_trip(tmp_path, case):
    affine, spacing = _affines()[case]
    rng = np.random.default_rng(case)
    data = rng.standard_normal((5, 6, 7)).astype(np.float32)
    src = _write(tmp_path / "img.nii.gz", data, affine)
    vol = load_volume(src)
    assert vol.array.dtype == np.float32 and vol.array.ndim == 3
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-6)
    # the affine of the reoriented array maps each voxel to the same world point as the stored voxel
    for idx in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        w = (affine @ np.array([*idx, 1.0]))[:3]
        nidx = np.round(np.linalg.solve(vol.affine[:3, :3], w - vol.affine[:3, 3])).astype(int)
        assert vol.array[tuple(nidx)] == data[idx]
    # canonical: in-plane axes point +x then +y (after dropping the coarse one), slice axis last
    m = vol.affine[:3, :3]
    world_axis = np.argmax(np.abs(m), axis=0)  # world axis each array axis runs along
    assert all(m[world_axis[c], c] > 0 for c in range(3))  # pointing +x/+y/+z
    assert world_axis[0] < world_axis[1]  # in-plane axes keep canonical order
    out = tmp_path / "out.nii.gz"
    save_like(vol.array, vol, out, dtype=np.float32)
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert back.shape == data.shape


def test_coarsest_axis_moved_last_and_canonical(tmp_path):
    # LPS with slices along y (coarsest): stored (x, y, z) -> canonical RAS, then y moved last
    aff = np.diag([-1.0, -3.0, 1.0, 1.0])
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    vol = load_volume(_write(tmp_path / "a.nii", data, aff))
    assert vol.shape == (4, 6, 5)
    assert vol.spacing == (1.0, 1.0, 3.0)
    expected = data[::-1, ::-1, :].transpose(0, 2, 1)  # flip x,y to RAS; y last
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.perm == (0, 2, 1)
    # the shape comes from the transform, so a Volume whose voxels were dropped can still be saved to
    vol.array = np.empty((0, 0, 0), np.float32)
    assert vol.shape == (4, 6, 5)
    save_like(expected, vol, tmp_path / "b.nii", dtype=np.float32)
    np.testing.assert_array_equal(nib.load(str(tmp_path / "b.nii")).get_fdata(), data)


def test_segment_like_identity_orientation_round_trip(tmp_path):
    """Segment a flipped/permuted copy: the result equals the canonical result mapped to that grid."""
    rng = np.random.default_rng(3)
    canon = rng.standard_normal((6, 7, 5)).astype(np.float32)  # RAS, 1x1x3 mm
    canon_aff = np.diag([1.0, 1.0, 3.0, 1.0])
    v_can = load_volume(_write(tmp_path / "canon.nii.gz", canon, canon_aff))
    np.testing.assert_array_equal(v_can.array, canon)

    def segment(x: np.ndarray) -> np.ndarray:  # a position-dependent "segmenter"
        ramp = np.arange(x.shape[0])[:, None, None] + 2 * np.arange(x.shape[2])[None, None, :]
        return ((x + 0.1 * ramp) > 0.3).astype(np.uint8)

    # stored array: flip x, transpose to (z, y, x): voxel (k, j, i) = canon[5 - i, j, k]
    stored = np.ascontiguousarray(canon[::-1].transpose(2, 1, 0))
    m = np.zeros((4, 4))
    m[0, 2] = -1.0  # stored axis 2 -> -x
    m[1, 1] = 1.0
    m[2, 0] = 3.0
    m[3, 3] = 1.0
    m[0, 3] = 5.0  # so the world grid is the same as canon's
    vol = load_volume(_write(tmp_path / "flipped.nii.gz", stored, m))
    np.testing.assert_array_equal(vol.array, canon)
    np.testing.assert_allclose(vol.affine, canon_aff)
    out = tmp_path / "seg.nii.gz"
    save_like(segment(vol.array), vol, out)
    seg = nib.load(str(out))
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, m)
    expected_stored = np.ascontiguousarray(segment(canon)[::-1].transpose(2, 1, 0))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected_stored)


def test_probabilities_written_4d(tmp_path):
    aff = np.diag([-2.0, 1.0, 1.0, 1.0])
    data = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    vol = load_volume(_write(tmp_path / "a.nii.gz", data, aff))
    probs = np.stack([vol.array, 1 - vol.array], axis=-1)
    save_like(probs, vol, tmp_path / "p.nii.gz", dtype=np.float32)
    p = nib.load(str(tmp_path / "p.nii.gz"))
    assert p.shape == (3, 4, 5, 2)
    np.testing.assert_allclose(p.get_fdata()[..., 0], data, rtol=1e-6)
    np.testing.assert_allclose(p.get_fdata()[..., 1], 1 - data, rtol=1e-6)


def test_load_label_aligned_and_checked(tmp_path):
    aff = np.array([[0, 2.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    img = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8) * 2
    vol = load_volume(_write(tmp_path / "i.nii.gz", img, aff))
    lab_net = load_label(_write(tmp_path / "l.nii.gz", lab, aff), vol)
    assert lab_net.dtype == np.int16 and lab_net.shape == vol.shape
    np.testing.assert_array_equal(lab_net, (vol.array > 0.5) * 2)
    # mismatches name both files
    _write(tmp_path / "bad_shape.nii.gz", lab[:, :, :5], aff)
    with pytest.raises(VolumeError, match=r"bad_shape.*i\.nii\.gz"):
        load_label(tmp_path / "bad_shape.nii.gz", vol)
    aff2 = aff.copy()
    aff2[0, 3] = 1.0
    _write(tmp_path / "bad_aff.nii.gz", lab, aff2)
    with pytest.raises(VolumeError, match=r"bad_aff.*i\.nii\.gz.*different affines"):
        load_label(tmp_path / "bad_aff.nii.gz", vol)
    _write(tmp_path / "frac.nii.gz", lab.astype(np.float32) + 0.5, aff)
    with pytest.raises(VolumeError, match="non-integer"):
        load_label(tmp_path / "frac.nii.gz", vol)
    _write(tmp_path / "neg.nii.gz", lab.astype(np.int16) - 1, aff)
    with pytest.raises(VolumeError, match="negative"):
        load_label(tmp_path / "neg.nii.gz", vol)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_volume(tmp_path / "nope.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(VolumeError, match="junk.nii.gz"):
        load_volume(junk)
    # truncated data block: header reads, data does not
    full = _write(tmp_path / "full.nii", np.random.rand(8, 8, 8).astype(np.float32), np.eye(4))
    trunc = tmp_path / "trunc.nii"
    trunc.write_bytes(full.read_bytes()[:600])
    with pytest.raises(VolumeError, match="trunc.nii"):
        load_volume(trunc)
    four = _write(tmp_path / "four.nii.gz", np.zeros((3, 3, 3, 2), np.float32), np.eye(4))
    with pytest.raises(VolumeError, match=r"four.nii.gz.*3D"):
        load_volume(four)
    two = _write(tmp_path / "two.nii.gz", np.zeros((3, 3), np.float32), np.eye(4))
    with pytest.raises(VolumeError, match="two.nii.gz"):
        load_volume(two)
    data = np.random.rand(3, 4, 5).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    nan = _write(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(VolumeError, match=r"nan.nii.gz: 2 of 60 voxels are NaN or Inf"):
        load_volume(nan)
    with pytest.warns(UserWarning, match="2 NaN/Inf voxels replaced"):
        v = load_volume(nan, nonfinite="zero")
    assert np.isfinite(v.array).all() and v.array[1, 2, 3] == 0


def test_singleton_4d_squeezed_and_written_3d(tmp_path):
    data = np.random.rand(3, 4, 5, 1).astype(np.float32)
    p = _write(tmp_path / "s.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.warns(UserWarning, match="singleton"):
        vol = load_volume(p)
    assert vol.shape == (3, 4, 5) and vol.squeezed
    save_like(vol.array, vol, tmp_path / "o.nii.gz", dtype=np.float32)
    out = nib.load(str(tmp_path / "o.nii.gz"))
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out.get_fdata(), data[..., 0])


def test_save_is_atomic_and_validates(tmp_path):
    vol = load_volume(_write(tmp_path / "a.nii.gz", np.random.rand(3, 4, 5).astype(np.float32), np.eye(4)))
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(VolumeError, match="do not fit uint8"):
        save_like(np.full(vol.shape, 300), vol, target, dtype=np.uint8)
    with pytest.raises(VolumeError, match="shape"):
        save_like(np.zeros((2, 2, 2)), vol, target)
    with pytest.raises(VolumeError, match=r"\.nii or \.nii\.gz"):
        save_like(np.zeros(vol.shape), vol, tmp_path / "seg.png")
    assert target.read_bytes() == b"old"  # failed writes leave the old file
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "seg.nii.gz"]  # and no temporary files
    save_like(np.ones(vol.shape, np.uint8), vol, target)
    assert np.asarray(nib.load(str(target)).dataobj).sum() == 60
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "seg.nii.gz"]


# --- nibabel's own small real files (edge cases of the format) --------------------------------

def _nib_file(name: str) -> Path:
    p = NIB_DATA / name
    if not p.exists():
        pytest.skip(f"nibabel test file {name} not installed")
    return p


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz", "nifti1.hdr~", "nifti2.nii.gz~"]
)
def test_nibabel_files_round_trip(tmp_path, name):
    if name == "nifti2.nii.gz~":  # NIfTI-2: first frame of nibabel's 4D example, with its header
        ex = nib.load(str(_nib_file("example_nifti2.nii.gz")))
        src = tmp_path / "n2.nii.gz"
        nib.Nifti2Image(ex.get_fdata()[..., 0].astype(np.int16), ex.affine, ex.header).to_filename(str(src))
    elif name == "nifti1.hdr~":  # a NIfTI-1 .hdr/.img pair (nibabel ships the header only)
        ex = nib.load(str(_nib_file("anatomical.nii")))
        src = tmp_path / "pair.hdr"
        nib.Nifti1Pair(ex.get_fdata().astype(np.float32), ex.affine).to_filename(str(src))
    else:
        src = _nib_file(name)
    img = nib.load(str(src))
    vol = load_volume(src)
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    assert sorted(vol.spacing) == pytest.approx(sorted(zooms.tolist()), rel=1e-5)
    assert vol.spacing[2] == max(vol.spacing)
    cls = nib.Nifti2Image if isinstance(img.header, nib.Nifti2Header) else nib.Nifti1Image
    out = tmp_path / "out.nii.gz"
    save_like(vol.array, vol, out, dtype=np.float32)
    back = nib.load(str(out))
    assert isinstance(back, cls)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    np.testing.assert_allclose(back.get_fdata(), img.get_fdata(), rtol=1e-6, atol=1e-6)
    assert back.header.get_zooms()[:3] == pytest.approx(tuple(zooms), rel=1e-6)


def test_nibabel_big_endian_file(tmp_path):
    src = _nib_file("anatomical.nii")
    img = nib.load(str(src))
    assert img.header.endianness == ">"
    vol = load_volume(src)
    np.testing.assert_array_equal(np.sort(vol.array.ravel()), np.sort(img.get_fdata().astype(np.float32).ravel()))
    labels = (vol.array > vol.array.mean()).astype(np.uint8)
    save_like(labels, vol, tmp_path / "lab.nii.gz")
    back = nib.load(str(tmp_path / "lab.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), (img.get_fdata() > vol.array.mean()).astype(np.uint8))


def test_nibabel_nan_and_header_only_files():
    with pytest.raises(VolumeError, match=r"resampled_anat_moved.nii: 153 of 1071 voxels are NaN"):
        load_volume(_nib_file("resampled_anat_moved.nii"))
    with pytest.raises(VolumeError, match=r"nifti2.hdr: cannot read the voxel data.*nifti2.img"):
        load_volume(_nib_file("nifti2.hdr"))


def test_nibabel_4d_refused(tmp_path):
    src = _nib_file("example4d.nii.gz")
    with pytest.raises(VolumeError, match=r"example4d.nii.gz.*\(128, 96, 24, 2\)"):
        load_volume(src)


def test_unusable_voxel_data_is_named_before_reading(tmp_path):
    """Volumes that used to fail with raw numpy/allocator messages (or a wrong 'NaN/Inf' report)."""
    aff = np.eye(4)
    empty = _write(tmp_path / "empty.nii.gz", np.zeros((64, 64, 0), np.float32), aff)
    rgb_dtype = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = _write(tmp_path / "rgb.nii.gz", np.zeros((8, 8, 4), rgb_dtype), aff)
    big = _write(tmp_path / "f64.nii.gz", np.full((8, 8, 4), 1e300), aff)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((32767, 32767, 32767))
    hdr.set_data_dtype(np.int16)
    huge = tmp_path / "huge.nii"
    huge.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 100)  # header claims 70 TB, file holds 100 bytes
    huge_gz = tmp_path / "huge.nii.gz"
    import gzip

    huge_gz.write_bytes(gzip.compress(huge.read_bytes()))
    for path, msg in [(empty, "has an empty axis"), (rgb, "colour/RGB"), (big, "exceed float32's range"),
                      (huge, "truncated file or corrupt header"), (huge_gz, "more than this machine's")]:
        with pytest.raises(VolumeError, match=msg) as info:
            load_volume(path)
        assert str(path) in str(info.value)
    with pytest.raises(VolumeError, match="label .*has an empty axis"):
        load_label(empty, load_volume(_write(tmp_path / "ok.nii.gz", np.zeros((4, 4, 4), np.float32), aff)))
