"""Finding and loading image/label pairs.

Accepted sources (:func:`read_dataset`):

* a Medical Segmentation Decathlon folder: ``dataset.json`` whose ``"training"``
  list holds ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``
  (paths relative to the json's folder), optional ``"labels"``
  (``{"0": "background", "1": "liver", ...}``) and ``"modality"``
  (``{"0": "CT"}``). A folder without ``dataset.json`` but with ``imagesTr/`` and
  ``labelsTr/`` is paired by file name. Our demo also writes ``"validation"``
  and ``"test"`` lists of the same form (MSD's own ``"test"`` list holds image
  paths only; those are accepted too, with no label).
* an nnU-Net v2 raw dataset (``DatasetXXX_Name/``): ``dataset.json`` with
  ``"channel_names"`` (``{"0": "T1"}``; one channel), ``"labels"``
  (``{"background": 0, "tumour": 1}``) and ``"file_ending"`` (``".nii.gz"``),
  images ``imagesTr/<case>_0000.nii.gz``, labels ``labelsTr/<case>.nii.gz``,
  and optionally ``imagesTs/<case>_0000.nii.gz`` (the test list, unlabelled
  unless ``labelsTs/<case>`` exists);
* the ``dataset.json`` file itself (of either kind);
* a CSV file with a header row naming the columns ``image`` and ``label``
  (paths relative to the CSV's folder; ``label`` may be empty for unlabelled cases).

:func:`load_case` reads one pair into network layout (closest canonical
orientation, coarsest axis last; see :mod:`ahnet_fast.data.nifti`) and checks it:
missing/unreadable files, 4D images, NaN/Inf voxels, image/label shape or affine
mismatch and labels outside the declared classes all raise an error that names
the file and the problem (:class:`~ahnet_fast.data.errors.DataError`,
:class:`~ahnet_fast.data.nifti.VolumeError` or ``FileNotFoundError``).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ahnet_fast.data.errors import DataError
from ahnet_fast.data.intensity import IntensityConfig, normalise_with_stats, training_window
from ahnet_fast.data.nifti import is_nifti_path, load_label, load_volume

__all__ = ["CaseRef", "DatasetSpec", "Case", "read_dataset", "load_case", "check_headers", "require_labels",
           "training_intensity"]


@dataclass(frozen=True)
class CaseRef:
    """Paths of one case. ``label`` is None for an unlabelled (inference-only) case."""

    image: str
    label: str | None
    name: str


@dataclass
class DatasetSpec:
    """What :func:`read_dataset` found.

    Attributes:
        source: the folder/json/csv it was read from.
        training / validation / test: the case lists (validation and test may be empty).
        class_names: one name per class, index = label value; background first.
            ``None`` when the source does not declare classes (CSV): the number
            of classes is then given by the user (``num_classes``).
        modality: e.g. ``"CT"`` or ``"MRI"`` when declared, else ``None``.
    """

    source: str
    training: list[CaseRef]
    validation: list[CaseRef] = field(default_factory=list)
    test: list[CaseRef] = field(default_factory=list)
    class_names: list[str] | None = None
    modality: str | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


@dataclass
class Case:
    """One loaded case in network layout.

    Attributes:
        image: ``(H, W, D)`` float32, intensity-normalised.
        label: ``(H, W, D)`` uint8 class indices, or None.
        spacing: voxel size (mm) along H, W, D.
        name: case name (file stem).
        image_path / label_path: source files (for error messages).
        volume: the :class:`~ahnet_fast.data.nifti.Volume` (header, affine,
            transform) the image came from, with its ``array`` dropped to save
            memory (use it with ``save_like``).
        intensity_stats: what the normalisation used (mode, the values mapped to 0
            and 1, the foreground rule; see
            :func:`~ahnet_fast.data.intensity.normalise_with_stats`), for logs.
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    name: str
    image_path: str
    label_path: str | None
    volume: Any = None
    intensity_stats: dict[str, Any] | None = None


def _case_name(path: str) -> str:
    base = os.path.basename(path)
    for suf in (".nii.gz", ".nii", ".img", ".hdr"):
        if base.lower().endswith(suf):
            return base[: -len(suf)]
    return base


def _resolve(root: Path, p: str, where: str) -> str:
    if not isinstance(p, str) or not p:
        raise DataError(where, f"expected a file path string, got {p!r}")
    q = Path(p)
    return str(q if q.is_absolute() else (root / q))


def _refs_from_json_list(items: Any, root: Path, where: str, key: str) -> list[CaseRef]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise DataError(where, f'"{key}" must be a list, got {type(items).__name__}')
    refs = []
    for i, it in enumerate(items):
        if isinstance(it, str):  # MSD "test": plain image paths
            img, lab = _resolve(root, it, where), None
        elif isinstance(it, dict) and "image" in it:
            img = _resolve(root, it["image"], where)
            lab = _resolve(root, it["label"], where) if it.get("label") else None
        else:
            raise DataError(where, f'"{key}"[{i}] must be {{"image": ..., "label": ...}} or a path, got {it!r}')
        refs.append(CaseRef(img, lab, _case_name(img)))
    return refs


def _read_json(path: Path) -> DatasetSpec:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read as JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(path, "expected a JSON object with a \"training\" list")
    root = path.parent
    if "training" not in meta:
        if "channel_names" in meta or "file_ending" in meta:
            return _read_nnunet(path, meta)
        raise DataError(path, 'no "training" list (Medical Segmentation Decathlon) and no "channel_names"/'
                              '"file_ending" (nnU-Net v2): expected the dataset.json of one of those formats')
    training = _refs_from_json_list(meta["training"], root, str(path), "training")
    validation = _refs_from_json_list(meta.get("validation"), root, str(path), "validation")
    test = _refs_from_json_list(meta.get("test"), root, str(path), "test")
    class_names = None
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not labels:
            raise DataError(path, '"labels" must be a non-empty object {"0": "background", "1": ...}')
        try:
            idx = sorted(int(k) for k in labels)
        except ValueError:
            raise DataError(path, f'"labels" keys must be integers, got {list(labels)}') from None
        if idx != list(range(len(idx))):
            raise DataError(path, f'"labels" keys must be 0, 1, ..., n-1 without gaps, got {idx}')
        class_names = [str(labels[str(i)]) for i in idx]
    modality = None
    mod = meta.get("modality")
    if isinstance(mod, dict) and mod:
        modality = str(mod.get("0", next(iter(mod.values()))))
    elif isinstance(mod, str):
        modality = mod
    return DatasetSpec(str(path), training, validation, test, class_names, modality)


#: nnU-Net's channel suffix of single-channel image files (``case_0000.nii.gz``)
NNUNET_CHANNEL = "_0000"


def _nnunet_cases(images: Path, labels: Path | None, ending: str, where: Path, need_labels: bool) -> list[CaseRef]:
    refs = []
    if not images.is_dir():
        return refs
    for img in sorted(p for p in images.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")):
        stem = img.name[: -len(ending)]
        if not stem.endswith(NNUNET_CHANNEL):
            if stem[-5:-4] == "_" and stem[-4:].isdigit():  # another channel (case_0001): refused below
                continue
            raise DataError(img, f"nnU-Net image names end in {NNUNET_CHANNEL}{ending} (channel 0000), got {img.name}")
        case = stem[: -len(NNUNET_CHANNEL)]
        lab = labels / (case + ending) if labels is not None else None
        if lab is not None and not lab.is_file():
            if need_labels:
                raise DataError(img, f"no label file {lab} (nnU-Net: labelsTr/<case>{ending})")
            lab = None
        refs.append(CaseRef(str(img), str(lab) if lab is not None else None, case))
    return refs


def _read_nnunet(path: Path, meta: dict[str, Any]) -> DatasetSpec:
    """An nnU-Net v2 raw dataset (see the module docstring) from its ``dataset.json``."""
    root = path.parent
    chans = meta.get("channel_names", meta.get("modality"))
    if not isinstance(chans, dict) or not chans:
        raise DataError(path, '"channel_names" must be a non-empty object like {"0": "T1"} (nnU-Net v2)')
    if len(chans) != 1:
        raise DataError(path, f"{len(chans)} input channels {dict(chans)}; only single-channel datasets are "
                              "supported (one image per case, <case>_0000)")
    modality = str(next(iter(chans.values())))
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not is_nifti_path("x" + ending):
        raise DataError(path, f'"file_ending" {ending!r} is not supported; expected ".nii.gz" or ".nii" (NIfTI)')
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, '"labels" must be a non-empty object {"background": 0, "name": 1, ...} (nnU-Net v2)')
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(path, f'label "{name}" is a region {value} (region-based training); only plain '
                                  "classes (one integer each) are supported")
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
            raise DataError(path, f'label "{name}" has value {value!r}; expected an integer')
        if int(value) in by_value:
            raise DataError(path, f'labels "{by_value[int(value)]}" and "{name}" share the value {int(value)}')
        by_value[int(value)] = str(name)
    idx = sorted(by_value)
    if idx != list(range(len(idx))):
        raise DataError(path, f'"labels" values must be 0, 1, ..., n-1 without gaps, got {idx}')
    class_names = [by_value[i] for i in idx]
    training = _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, path, need_labels=True)
    if not (root / "imagesTr").is_dir():
        raise DataError(path, f"no imagesTr/ folder beside it (nnU-Net v2: imagesTr/<case>_0000{ending})")
    extra = sorted({p.name for p in (root / "imagesTr").iterdir() if p.name.endswith(ending)}
                   - {Path(r.image).name for r in training})
    if extra:
        raise DataError(root / "imagesTr" / extra[0], f"a second input channel ({len(extra)} file(s) like it); "
                                                      "only single-channel datasets are supported")
    n = meta.get("numTraining")
    if isinstance(n, int) and n != len(training):
        raise DataError(path, f'"numTraining" is {n} but imagesTr/ holds {len(training)} case(s)')
    test = _nnunet_cases(root / "imagesTs", root / "labelsTs", ending, path, need_labels=False)
    return DatasetSpec(str(path), training, [], test, class_names, modality)


def _read_csv(path: Path) -> DatasetSpec:
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read as CSV ({type(exc).__name__}: {exc})") from exc
    if "image" not in fields:
        raise DataError(path, f'CSV needs a header row with columns "image" and "label"; found columns {fields}')
    root = path.parent
    refs = []
    for i, row in enumerate(rows, start=2):
        if None in row:  # DictReader files surplus fields under the key None
            n = len(fields) + len(row[None] or [])
            raise DataError(path, f"line {i}: {n} fields but the header has {len(fields)} ({', '.join(fields)}); "
                                  "quote paths that contain commas")
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row.get("image"):
            raise DataError(path, f"line {i}: empty image path")
        img = _resolve(root, row["image"], f"{path}:{i}")
        lab = _resolve(root, row["label"], f"{path}:{i}") if row.get("label") else None
        refs.append(CaseRef(img, lab, _case_name(img)))
    return DatasetSpec(str(path), refs)


def _read_folder(path: Path) -> DatasetSpec:
    js = path / "dataset.json"
    if js.is_file():
        return _read_json(js)
    images, labels = path / "imagesTr", path / "labelsTr"
    if not images.is_dir():
        raise DataError(path, "folder has neither dataset.json nor imagesTr/ (expected a Medical Segmentation "
                              "Decathlon or nnU-Net v2 dataset folder)")
    refs = []
    for img in sorted(p for p in images.iterdir() if is_nifti_path(p) and not p.name.startswith(".")):
        lab = labels / img.name
        name = _case_name(str(img))
        if not lab.is_file() and name.endswith(NNUNET_CHANNEL):  # nnU-Net naming without a dataset.json
            name = name[: -len(NNUNET_CHANNEL)]
            lab = labels / (name + img.name[len(name) + len(NNUNET_CHANNEL):])
        if not lab.is_file():
            raise DataError(img, f"no label file {lab} with the same name")
        refs.append(CaseRef(str(img), str(lab), name))
    return DatasetSpec(str(path), refs)


def read_dataset(source: str | os.PathLike) -> DatasetSpec:
    """Read the case list from a MSD or nnU-Net v2 folder, a ``dataset.json`` or a CSV file.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataError: unreadable or malformed list, or an empty training list.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a dataset folder, dataset.json or CSV)")
    if path.is_dir():
        spec = _read_folder(path)
    elif path.suffix.lower() == ".json":
        spec = _read_json(path)
    elif path.suffix.lower() == ".csv":
        spec = _read_csv(path)
    else:
        raise DataError(path, "expected a dataset folder, a dataset.json or a .csv file")
    if not spec.training:
        raise DataError(spec.source, "the dataset has no training cases (empty list)")
    return spec


def require_labels(spec: DatasetSpec) -> None:
    """Every training case needs a label map (validation and test cases may have none).

    Raises:
        DataError: naming the dataset, the first unlabelled case and how many there are.
    """
    missing = [r for r in spec.training if r.label is None]
    if missing:
        raise DataError(
            spec.source,
            f"{len(missing)} training case(s) have no label, e.g. {missing[0].image}; every training case needs "
            "a label file (a CSV \"label\" column / a dataset.json \"label\" entry); put unlabelled images in "
            "the \"test\" list instead",
        )


def check_headers(refs: list[CaseRef]) -> None:
    """Cheap up-front check of every case: files exist, are readable 3D images,
    and image/label headers agree in shape and affine (no voxel data read).

    Raises the same errors as :func:`load_case` would, but before training starts.
    """
    import nibabel as nib

    for ref in refs:
        shapes = {}
        for what, p in (("image", ref.image), ("label", ref.label)):
            if p is None:
                continue
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p}: {what} file not found (case {ref.name})")
            try:
                img = nib.load(p)
            except Exception as exc:
                raise DataError(p, f"cannot read {what} as NIfTI ({type(exc).__name__}: {exc})") from exc
            shape = tuple(int(s) for s in img.shape)
            if len(shape) != 3 and not (len(shape) > 3 and all(s == 1 for s in shape[3:])):
                raise DataError(p, f"{what} must be 3D, got shape {shape}")
            shapes[what] = (shape[:3], np.asarray(img.affine))
        if "label" in shapes:
            (si, ai), (sl, al) = shapes["image"], shapes["label"]
            if si != sl:
                raise DataError(ref.label, f"label shape {sl} differs from image {ref.image} shape {si}")
            if not np.allclose(ai, al, rtol=0, atol=1e-3):
                raise DataError(ref.label, f"label affine differs from image {ref.image} affine")


def load_case(ref: CaseRef, num_classes: int | None, intensity: IntensityConfig) -> Case:
    """Load, check and normalise one case.

    Args:
        ref: the paths.
        num_classes: labels must lie in ``[0, num_classes)``; None skips that check.
        intensity: how to normalise the image (:mod:`ahnet_fast.data.intensity`).

    Returns:
        A :class:`Case` with ``image`` ``(H, W, D)`` float32 and ``label``
        ``(H, W, D)`` uint8 (or None).
    """
    vol = load_volume(ref.image)
    label = None
    if ref.label is not None:
        lab = load_label(ref.label, vol)
        hi = int(lab.max()) if lab.size else 0
        if num_classes is not None and hi >= num_classes:
            bad = sorted(int(v) for v in np.unique(lab[lab >= num_classes]))[:10]
            raise DataError(
                ref.label,
                f"label values {bad} outside the declared classes 0..{num_classes - 1} "
                f"(declare more classes or fix the label map)",
            )
        if hi > 255:
            raise DataError(ref.label, f"label value {hi} too large (at most 255 classes are supported)")
        label = lab.astype(np.uint8)
    image, stats = normalise_with_stats(vol.array, intensity, where=ref.image)
    vol.array = np.empty((0, 0, 0), np.float32)  # keep the header/transform, drop the voxels
    return Case(image, label, tuple(vol.spacing), ref.name, ref.image, ref.label, vol, stats)


def training_intensity(spec: DatasetSpec, cfg: IntensityConfig) -> IntensityConfig:
    """``cfg`` ready for :func:`load_case`: percentile or z-score scaling with ``stats="training"`` becomes the
    fixed window of ``spec``'s training images (:func:`~ahnet_fast.data.intensity.training_window`;
    they are read for it); any other setting is returned as it is."""
    if cfg.stats != "training":
        return cfg
    return training_window([load_volume(r.image).array for r in spec.training], cfg)
