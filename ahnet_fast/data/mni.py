"""Real demo data on every machine: the MNI152 2009a template shipped with nilearn.

nilearn bundles the ICBM 2009a symmetric template (T1, 197 x 233 x 189 at 1 mm,
skull-stripped) with grey- and white-matter probability maps in
``nilearn/datasets/data/`` (nothing is downloaded). :func:`build_mni_dataset`
turns it into a small anisotropic segmentation task written as NIfTI files
plus a ``dataset.json`` (Medical Segmentation Decathlon layout), so the demo
goes through exactly the file-based pipeline a user's data goes through:

* labels: 0 background (T1 <= 0.2 * max), inside the brain the argmax over
  ``[1 - GM - WM, GM, WM]``: 1 CSF/other, 2 grey matter, 3 white matter;
* anisotropy: keep every ``z_step``-th axial slice (default 4: a 1 x 1 x 4 mm
  volume; the affine's slice column is multiplied by ``z_step``);
* split: the template is exactly left/right symmetric, so the split runs along
  the anterior-posterior axis: training cases from the posterior part,
  the test case from the anterior part; and the test case takes its slices at a
  different z offset (``test_offset``) than the training cases
  (``train_offsets``), so no test slice was ever seen in training;
* validation: the posterior part at ``val_offset`` (slices never trained on,
  but from the training region; used only for model selection).

Volumes are cropped to the brain's bounding box plus ``margin`` voxels in-plane
to keep the demo small. The folder is written atomically: everything goes to a
temporary sibling folder that is renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["CLASS_NAMES", "template_paths", "make_labels", "build_mni_dataset"]

CLASS_NAMES = ["background", "csf_other", "grey_matter", "white_matter"]

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def template_paths() -> dict[str, Path]:
    """Paths of the T1, GM and WM files inside the installed nilearn package."""
    import importlib.util

    # locate the package without importing it: importing nilearn.datasets pulls in
    # scikit-learn and pandas and takes many seconds
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNI demo data comes with nilearn: pip install nilearn")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {k: root / v for k, v in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's bundled MNI152 2009a template files are missing: {missing}")
    return paths


def make_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The 4-class labelling (module docstring). Inputs share one shape; GM/WM in [0, 1].

    Returns uint8 labels of the same shape.
    """
    bg = t1 <= 0.2 * float(t1.max())
    lab = (np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0) + 1).astype(np.uint8)
    lab[bg] = 0
    return lab


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import nibabel as nib

    p = template_paths()
    imgs = {k: nib.load(str(v)) for k, v in p.items()}
    aff = np.asarray(imgs["t1"].affine, dtype=np.float64)
    t1 = np.asarray(imgs["t1"].get_fdata(dtype=np.float32))
    # the probability maps are stored as uint8 0..255 (scaled); get_fdata applies any scaling
    gm = np.asarray(imgs["gm"].get_fdata(dtype=np.float32))
    wm = np.asarray(imgs["wm"].get_fdata(dtype=np.float32))
    scale = max(float(gm.max()), float(wm.max()), 1.0)
    if scale > 1.0 + 1e-6:  # 0..255 maps
        gm, wm = gm / 255.0, wm / 255.0
    return t1, gm, wm, aff


def _save(arr: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr.astype(dtype)), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.to_filename(str(path))


def build_mni_dataset(
    out_dir: str | os.PathLike,
    z_step: int = 4,
    train_offsets: Sequence[int] = (0,),
    val_offset: int | None = 1,
    test_offset: int = 2,
    split_fraction: float = 0.55,
    margin: int = 4,
    inplane_step: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write the demo dataset (module docstring) and return the ``dataset.json`` path.

    Args:
        out_dir: folder to create (``imagesTr/``, ``labelsTr/``, ``imagesTs/``,
            ``labelsTs/``, ``dataset.json``). If it already holds a complete
            dataset with the same parameters it is reused unless ``overwrite``.
        z_step: keep every ``z_step``-th axial slice (voxel size 1 x 1 x z_step mm).
        train_offsets: slice offsets (in ``[0, z_step)``) of the training cases.
        val_offset: slice offset of the validation case (posterior part), or None.
        test_offset: slice offset of the test case (anterior part); must differ
            from every training offset.
        split_fraction: share of the brain's anterior-posterior extent given to
            the posterior (training) part.
        margin: in-plane voxels kept around the brain's bounding box.
        inplane_step: keep every n-th voxel in-plane too (2: a 2 x 2 x z_step mm
            volume; for quick tests).
    """
    if inplane_step < 1:
        raise ValueError(f"inplane_step must be >= 1, got {inplane_step}")
    if z_step < 1:
        raise ValueError(f"z_step must be >= 1, got {z_step}")
    offs = list(train_offsets) + ([val_offset] if val_offset is not None else []) + [test_offset]
    if any(not 0 <= o < z_step for o in offs):
        raise ValueError(f"slice offsets must lie in [0, {z_step}), got {offs}")
    if test_offset in train_offsets:
        raise ValueError(f"test_offset {test_offset} must differ from the training offsets {list(train_offsets)}")
    if not 0.1 <= split_fraction <= 0.9:
        raise ValueError(f"split_fraction must be in [0.1, 0.9], got {split_fraction}")
    out = Path(out_dir)
    params = {
        "z_step": z_step, "train_offsets": list(train_offsets), "val_offset": val_offset,
        "test_offset": test_offset, "split_fraction": split_fraction, "margin": margin,
        "inplane_step": inplane_step,
    }
    js = out / "dataset.json"
    if js.is_file() and not overwrite:
        try:
            meta = json.loads(js.read_text())
            if meta.get("ahnet_fast_mni_params") == params:
                return js
        except (OSError, json.JSONDecodeError):
            pass
        raise FileExistsError(f"{out} already holds a different dataset; pass overwrite=True to replace it")

    t1, gm, wm, aff = _load_template()
    lab = make_labels(t1, gm, wm)
    # crop in-plane (x: left-right, y: anterior-posterior) to the brain plus a margin
    nz = np.nonzero(lab)
    x0, x1 = max(int(nz[0].min()) - margin, 0), min(int(nz[0].max()) + margin + 1, lab.shape[0])
    y0, y1 = max(int(nz[1].min()) - margin, 0), min(int(nz[1].max()) + margin + 1, lab.shape[1])
    z0, z1 = int(nz[2].min()), int(nz[2].max()) + 1
    ysplit = y0 + int(round(split_fraction * (y1 - y0)))
    # RAS: +y is anterior, so low y is posterior
    parts = {"posterior": (y0, ysplit), "anterior": (ysplit, y1)}

    def piece(part: str, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ya, yb = parts[part]
        zs = np.arange(z0 + ((offset - z0) % z_step), z1, z_step)
        img = t1[x0:x1:inplane_step, ya:yb:inplane_step][:, :, zs]
        lb = lab[x0:x1:inplane_step, ya:yb:inplane_step][:, :, zs]
        a = aff.copy()
        a[:3, 3] = aff[:3, :3] @ np.array([x0, ya, zs[0]]) + aff[:3, 3]
        a[:3, :2] = aff[:3, :2] * inplane_step
        a[:3, 2] = aff[:3, 2] * z_step
        return img, lb, a

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
        jobs = [("training", "posterior", o, "Tr") for o in train_offsets]
        if val_offset is not None:
            jobs.append(("validation", "posterior", val_offset, "Tr"))
        jobs.append(("test", "anterior", test_offset, "Ts"))
        for split, part, o, tag in jobs:
            img, lb, a = piece(part, o)
            name = f"mni_{part}_z{o}.nii.gz"
            _save(img, a, tmp / f"images{tag}" / name, np.float32)
            _save(lb, a, tmp / f"labels{tag}" / name, np.uint8)
            entries[split].append({"image": f"./images{tag}/{name}", "label": f"./labels{tag}/{name}"})
        meta = {
            "name": "MNI152-2009a-tissue-anisotropic",
            "description": (
                "nilearn's MNI152 2009a template (T1, GM/WM maps) with a 4-class tissue labelling, "
                f"every {z_step}th axial slice (1x1x{z_step} mm); train/validation posterior, test anterior "
                "at a different slice offset"
            ),
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
            "numTraining": len(entries["training"]),
            "numTest": len(entries["test"]),
            **entries,
            "ahnet_fast_mni_params": params,
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=str(out.parent)))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "dataset.json"
