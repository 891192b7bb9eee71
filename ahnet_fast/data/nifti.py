"""NIfTI volumes in and out, with orientation handling.

Every volume the networks see is in one layout: the closest canonical (RAS+)
orientation (``nibabel.as_closest_canonical`` / ``io_orientation``: axes are
only permuted and flipped, never resampled), with the coarsest axis (largest
voxel spacing, the slice axis of an anisotropic scan) moved last, so that an
array of shape ``(H, W, D)`` has D as AH-Net's low-resolution axis.

:func:`load_volume` returns a :class:`Volume` that remembers how it was
reoriented; :func:`save_like` undoes exactly that transform, so a
segmentation is written on the input's own voxel grid with the input's
affine and header.  :func:`load_label` loads a label map on the grid of an
image and applies the image's transform to it.

Bad input raises :class:`VolumeError` (a ``ValueError``) or
``FileNotFoundError``, always naming the file:

* a missing file, or one nibabel cannot read;
* not 3D: a 4D image whose 4th axis has length 1 is squeezed with a warning
  (common for single-frame scans), anything else is refused;
* NaN/Inf voxels: refused by default; ``nonfinite="zero"`` replaces them with
  0 (documented fix-up, with a warning giving the count), which is safe for
  masked-out background but not for voxels inside the anatomy.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from ahnet_fast._atomic import atomic_group, atomic_path

__all__ = [
    "Volume",
    "VolumeError",
    "load_volume",
    "load_label",
    "save_like",
    "save_all_like",
    "is_nifti_path",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A volume file that cannot be used; the message names the file."""


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


@dataclass
class Volume:
    """A 3D image in network layout, plus what is needed to undo the layout.

    Attributes:
        array: ``(H, W, D)`` float32, canonical orientation, coarsest axis last.
        spacing: voxel size in mm along ``array``'s axes.
        affine: 4x4 voxel->world (mm) affine of ``array``.
        path: the file it came from.
        original_affine: affine of the file as stored.
        original_shape: 3D shape of the file's array (after squeezing a
            singleton 4th axis).
        header: the file's header (a copy; used to write outputs like it).
        ornt: ``(3, 2)`` nibabel orientation array taking the stored array
            to canonical orientation (``apply_orientation(stored, ornt)``).
        perm: axis permutation applied after reorientation
            (``array = canonical.transpose(perm)``).
        squeezed: True when a singleton 4th axis was dropped on load.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: str
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    header: Any
    ornt: np.ndarray
    perm: tuple[int, int, int]
    squeezed: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Network-layout shape ``(H, W, D)``, from the transform (valid even if ``array`` was dropped)."""
        canon = [0, 0, 0]
        for i, (ax, _) in enumerate(self.ornt):
            canon[int(ax)] = int(self.original_shape[i])
        return tuple(canon[p] for p in self.perm)  # type: ignore[return-value]

    def to_network(self, stored: np.ndarray) -> np.ndarray:
        """Apply this volume's transform to an array on the stored grid.

        ``stored`` has shape ``original_shape`` or ``original_shape + (C,)``;
        the result has shape ``self.shape`` (``+ (C,)``). Returns a view where
        possible (flips and transposes only).
        """
        from nibabel.orientations import apply_orientation

        _check_leading_shape(stored, self.original_shape, "stored-grid array")
        canon = apply_orientation(stored, self.ornt)
        extra = tuple(range(3, canon.ndim))
        return canon.transpose(tuple(self.perm) + extra)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_network`: network-layout array -> stored grid.

        ``array`` has shape ``self.shape`` or ``self.shape + (C,)``.
        """
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        _check_leading_shape(array, self.shape, "network-layout array")
        inv_perm = tuple(int(i) for i in np.argsort(self.perm))
        extra = tuple(range(3, array.ndim))
        canon = array.transpose(inv_perm + extra)
        back = ornt_transform(axcodes2ornt("RAS"), self.ornt)
        return apply_orientation(canon, back)


def _check_leading_shape(arr: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if arr.ndim not in (3, 4) or tuple(arr.shape[:3]) != tuple(shape):
        raise VolumeError(
            f"{what} has shape {tuple(arr.shape)}; expected {tuple(shape)} "
            f"or {tuple(shape)} + (channels,)"
        )


def _open(path: str | os.PathLike):
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise VolumeError(f"{p}: is a folder, expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types (ImageFileError, OSError, EOFError, ...)
        raise VolumeError(f"{p}: cannot read as a NIfTI/Analyze image ({type(exc).__name__}: {exc})") from exc
    if not hasattr(img, "affine") or img.affine is None or len(img.shape) < 3:
        raise VolumeError(f"{p}: not a 3D spatial image (shape {getattr(img, 'shape', '?')})")
    return img


def _spatial_shape(img, path: str) -> tuple[tuple[int, int, int], bool]:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 3:
        return shape, False  # type: ignore[return-value]
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        warnings.warn(f"{path}: shape {shape} has singleton axes after the 3rd; treating it as 3D {shape[:3]}",
                      stacklevel=3)
        return shape[:3], True  # type: ignore[return-value]
    raise VolumeError(
        f"{path}: expected a 3D image, got shape {shape} "
        "(4D images are accepted only when the 4th axis has length 1; split multi-channel "
        "or time series into separate 3D files)"
    )


def _read(img, path: str, shape3: tuple[int, int, int], dtype) -> np.ndarray:
    try:
        if dtype is None:
            data = np.asanyarray(img.dataobj)
        else:
            data = img.get_fdata(dtype=dtype)
    except Exception as exc:  # truncated/corrupt data blocks fail only here
        raise VolumeError(f"{path}: cannot read the voxel data ({type(exc).__name__}: {exc})") from exc
    return np.asarray(data).reshape(shape3)


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_voxel_data(img, path: str, shape3: tuple[int, int, int], what: str = "") -> None:
    """Refuse, from the header alone, voxel data that cannot be a usable 3D scalar volume."""
    name = f"{what}{path}"
    if min(shape3) < 1:
        raise VolumeError(f"{name}: shape {shape3} has an empty axis (no voxels); expected at least 1 voxel per axis")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind in "cV":
        raise VolumeError(
            f"{name}: voxels of type {dtype} (colour/RGB or complex) are not supported; convert the image to "
            "one real-valued (grey-scale) channel"
        )
    nvox = int(np.prod(shape3, dtype=np.int64))
    if path.lower().endswith(".nii"):  # uncompressed: the header's claim can be checked against the file
        offset = int(getattr(img.header, "get_data_offset", lambda: 0)() or 0)
        need = offset + nvox * dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise VolumeError(
                f"{name}: the header declares shape {shape3} of {dtype} ({need} bytes with the header) but the "
                f"file holds {have} bytes (truncated file or corrupt header)"
            )
    mem = _memory_bytes()
    need_mem = nvox * (4 + dtype.itemsize)  # the float32 array plus the stored data while converting
    if mem is not None and need_mem > mem:
        raise VolumeError(
            f"{name}: shape {shape3} needs about {need_mem / 2**30:.1f} GiB to load, more than this machine's "
            f"{mem / 2**30:.1f} GiB of memory (corrupt header, or crop/downsample the image first)"
        )


def _refuse_float32_overflow(img, path: str, shape3: tuple[int, int, int], nbad: int) -> None:
    """Finite values beyond float32's range become Inf on conversion: say so, instead of 'NaN/Inf'."""
    try:
        wide = np.asarray(img.get_fdata(dtype=np.float64)).reshape(shape3)
    except Exception:  # noqa: BLE001 - unreadable as float64: let the NaN/Inf report stand
        return
    big = np.isfinite(wide) & (np.abs(wide) > np.finfo(np.float32).max)
    if big.any():
        raise VolumeError(
            f"{path}: {int(big.sum())} voxels (e.g. {wide[big].flat[0]:.3g}) exceed float32's range "
            f"(|v| <= {np.finfo(np.float32).max:.3g}); rescale the image's values"
        )


def _layout(affine: np.ndarray, shape3: tuple[int, int, int]):
    """Orientation transform and permutation for the network layout."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    canon_aff = affine @ inv_ornt_aff(ornt, shape3)
    spacing = np.sqrt((canon_aff[:3, :3] ** 2).sum(axis=0))
    # coarsest axis last; among equal spacings keep the highest index (so an
    # isotropic or already slice-last volume is not permuted)
    coarsest = max(range(3), key=lambda i: (round(float(spacing[i]), 6), i))
    perm = tuple([i for i in range(3) if i != coarsest] + [coarsest])
    aff = canon_aff.copy()
    aff[:, :3] = canon_aff[:, list(perm)]
    return ornt, perm, aff, tuple(float(spacing[i]) for i in perm)


def load_volume(
    path: str | os.PathLike,
    nonfinite: Literal["raise", "zero"] = "raise",
) -> Volume:
    """Load a 3D NIfTI (or Analyze) image into network layout.

    Args:
        path: ``.nii``/``.nii.gz`` (or a ``.hdr``/``.img`` pair).
        nonfinite: ``"raise"`` (default) refuses NaN/Inf voxels; ``"zero"``
            replaces them with 0 and warns.

    Returns:
        A :class:`Volume` whose ``array`` is ``(H, W, D)`` float32 in closest
        canonical orientation with the coarsest axis last.
    """
    path = str(path)
    img = _open(path)
    shape3, squeezed = _spatial_shape(img, path)
    _check_voxel_data(img, path, shape3)
    data = _read(img, path, shape3, np.float32)
    bad = ~np.isfinite(data)
    nbad = int(bad.sum())
    if nbad:
        _refuse_float32_overflow(img, path, shape3, nbad)
        if nonfinite == "zero":
            warnings.warn(f"{path}: {nbad} NaN/Inf voxels replaced by 0", stacklevel=2)
            data[bad] = 0.0
        elif nonfinite == "raise":
            raise VolumeError(
                f"{path}: {nbad} of {data.size} voxels are NaN or Inf; fix the file or load it with "
                "nonfinite='zero' to replace them by 0"
            )
        else:
            raise ValueError(f"nonfinite must be 'raise' or 'zero', got {nonfinite!r}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: invalid (singular or non-finite) affine:\n{affine}")
    ornt, perm, aff, spacing = _layout(affine, shape3)
    vol = Volume(
        array=data,  # replaced below; to_network needs the dataclass fields
        spacing=spacing,  # type: ignore[arg-type]
        affine=aff,
        path=path,
        original_affine=affine,
        original_shape=shape3,
        header=img.header.copy(),
        ornt=ornt,
        perm=perm,  # type: ignore[arg-type]
        squeezed=squeezed,
        meta={"image_class": type(img).__name__},
    )
    vol.array = np.ascontiguousarray(vol.to_network(data), dtype=np.float32)
    return vol


def load_label(
    path: str | os.PathLike,
    like: Volume,
    affine_atol: float = 1e-3,
) -> np.ndarray:
    """Load an integer label map on the grid of ``like`` and put it in network layout.

    The label file must have the same stored shape as ``like``'s file and an
    affine equal within ``affine_atol`` (mm); it is transformed with ``like``'s
    orientation/permutation, so image and labels stay voxel-aligned.

    Returns:
        ``like.shape`` array of non-negative integers: ``np.int16`` when the
        largest label fits, else ``np.int32``.
    """
    path = str(path)
    img = _open(path)
    shape3, _ = _spatial_shape(img, path)
    _check_voxel_data(img, path, shape3, what="label ")
    if shape3 != tuple(like.original_shape):
        raise VolumeError(
            f"label {path} has shape {shape3} but image {like.path} has shape {tuple(like.original_shape)}"
        )
    aff = np.asarray(img.affine, dtype=np.float64)
    if not np.allclose(aff, like.original_affine, rtol=0.0, atol=affine_atol):
        raise VolumeError(
            f"label {path} and image {like.path} have different affines "
            f"(max difference {np.abs(aff - like.original_affine).max():.3g} > {affine_atol}):\n"
            f"label:\n{aff}\nimage:\n{like.original_affine}"
        )
    raw = _read(img, path, shape3, None)
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise VolumeError(f"label {path}: contains NaN/Inf voxels")
        rounded = np.rint(raw)
        if not np.array_equal(rounded, raw):
            raise VolumeError(f"label {path}: has non-integer values (e.g. {raw[rounded != raw].flat[0]!r})")
        raw = rounded
    elif raw.dtype.kind not in "iub":
        raise VolumeError(f"label {path}: unsupported data type {raw.dtype}")
    lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
    if lo < 0:
        raise VolumeError(f"label {path}: negative label {lo}; labels must be 0 (background), 1, 2, ...")
    out_dtype = np.int16 if hi <= np.iinfo(np.int16).max else np.int32
    if hi > np.iinfo(np.int32).max:
        raise VolumeError(f"label {path}: label {hi} too large")
    return np.ascontiguousarray(like.to_network(raw.astype(out_dtype, copy=False)))


def _output_image(data: np.ndarray, ref: Volume, dtype) -> Any:
    import nibabel as nib

    hdr = ref.header
    if isinstance(hdr, nib.Nifti2Header):
        cls, hdr = nib.Nifti2Image, hdr.copy()
    elif isinstance(hdr, nib.Nifti1Header):  # also covers a Nifti1Pair's header
        cls, hdr = nib.Nifti1Image, nib.Nifti1Header.from_header(hdr)
    else:  # Analyze/other: keep what translates (dims, zooms, dtype fields)
        cls, hdr = nib.Nifti1Image, nib.Nifti1Header.from_header(hdr)
    hdr.set_data_dtype(dtype)
    img = cls(data, ref.original_affine, header=hdr)
    # the output holds the values themselves: no intensity scaling, and the
    # input's display window / intent would be wrong for labels or probabilities
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    if hasattr(img.header, "set_intent"):
        img.header.set_intent("none")
    # keep the input's qform/sform codes (nibabel resets them to 'aligned' otherwise)
    if isinstance(ref.header, nib.Nifti1Header):
        qcode = int(ref.header["qform_code"])
        scode = int(ref.header["sform_code"])
        img.set_qform(ref.original_affine, code=qcode if qcode else 1)
        img.set_sform(ref.original_affine, code=scode if scode else 1)
    return img


def save_like(
    array: np.ndarray,
    ref: Volume,
    path: str | os.PathLike,
    dtype: Any = np.uint8,
) -> Path:
    """Write a network-layout array as NIfTI on ``ref``'s original grid.

    Undoes ``ref``'s permutation and reorientation, and writes with ``ref``'s
    original affine and (adjusted) header, atomically: the data goes to a
    temporary file in the destination folder which then replaces ``path``, so
    ``path`` is either absent/old or complete.

    Args:
        array: ``ref.shape`` (labels) or ``ref.shape + (C,)`` (e.g. class
            probabilities; written as a 4D NIfTI with C volumes).
        ref: the :class:`Volume` the array was computed from.
        path: output, must end in ``.nii`` or ``.nii.gz``.
        dtype: stored data type (e.g. ``np.uint8`` for labels, ``np.float32``
            for probabilities). Integer dtypes require values in range.
    """
    path = Path(path)
    img = _prepare_output(array, ref, path, dtype)
    # nibabel picks plain or gzip-compressed output from the file name, so keep the suffix
    with atomic_path(path, suffix=_suffix(path)) as tmp:
        img.to_filename(tmp)
    return path


def save_all_like(items: Sequence[tuple[np.ndarray, str | os.PathLike, Any]], ref: Volume) -> list[Path]:
    """Write several arrays of one case (e.g. probabilities, then labels) as :func:`save_like` does,
    published together: every file is complete before any is moved into place, and the last
    item is published last (see :func:`ahnet_fast._atomic.atomic_group`), so when the last
    file exists the others come from the same call.

    Args:
        items: ``(array, path, dtype)`` per output, the marker (labels) last.
        ref: the :class:`Volume` the arrays were computed from.
    """
    paths = [Path(p) for _, p, _ in items]
    imgs = [_prepare_output(a, ref, p, d) for (a, _, d), p in zip(items, paths)]
    with atomic_group(paths, [_suffix(p) for p in paths]) as tmps:
        for img, tmp in zip(imgs, tmps):
            img.to_filename(tmp)
    return paths


def _suffix(path: Path) -> str:
    return ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"


def _prepare_output(array: np.ndarray, ref: Volume, path: Path, dtype: Any) -> Any:
    """Checks of :func:`save_like` and the nibabel image to write (nothing written yet)."""
    if not is_nifti_path(path):
        raise VolumeError(f"{path}: output name must end in .nii or .nii.gz")
    arr = np.asarray(array)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise VolumeError(f"{path}: refusing to write NaN/Inf values as {dtype}")
        if arr.size:
            info = np.iinfo(dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise VolumeError(f"{path}: values in [{lo}, {hi}] do not fit {dtype}")
    data = np.ascontiguousarray(ref.to_original(arr)).astype(dtype, copy=False)
    img = _output_image(data, ref, dtype)
    if not path.parent.exists():
        raise FileNotFoundError(f"{path}: output folder {path.parent} does not exist")
    return img
