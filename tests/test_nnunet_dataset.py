"""nnU-Net v2 raw datasets (DatasetXXX_Name/ with imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz and a
dataset.json holding channel_names/labels/file_ending) are read like Decathlon folders."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ahnet_fast.data.dataset import load_case, read_dataset
from ahnet_fast.data.errors import DataError
from ahnet_fast.data.intensity import IntensityConfig
from ahnet_fast.data.spacing import describe_preprocessing
from ahnet_fast.infer.segment import collect_inputs


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(arr, np.diag([1.0, 1.0, 4.0, 1.0])).to_filename(str(path))


def _nnunet(root: Path, cases=("brain_001", "brain_002"), test=("brain_101",), meta=None) -> Path:
    rng = np.random.default_rng(0)
    ds = root / "Dataset042_Brain"
    for c in cases:
        _write(ds / "imagesTr" / f"{c}_0000.nii.gz", rng.random((8, 8, 4)).astype(np.float32))
        _write(ds / "labelsTr" / f"{c}.nii.gz", rng.integers(0, 3, (8, 8, 4)).astype(np.uint8))
    for c in test:
        _write(ds / "imagesTs" / f"{c}_0000.nii.gz", rng.random((8, 8, 4)).astype(np.float32))
    js = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
          "numTraining": len(cases), "file_ending": ".nii.gz"}
    js.update(meta or {})
    (ds / "dataset.json").write_text(json.dumps(js))
    return ds


def test_nnunet_v2_folder_and_json_are_read(tmp_path):
    ds = _nnunet(tmp_path)
    for source in (ds, ds / "dataset.json"):
        spec = read_dataset(source)
        assert [r.name for r in spec.training] == ["brain_001", "brain_002"]
        assert spec.training[0].image.endswith("imagesTr/brain_001_0000.nii.gz")
        assert spec.training[0].label.endswith("labelsTr/brain_001.nii.gz")
        assert spec.class_names == ["background", "grey_matter", "white_matter"]
        assert spec.modality == "T1"
        assert [r.name for r in spec.test] == ["brain_101"] and spec.test[0].label is None
    case = load_case(spec.training[1], spec.num_classes, IntensityConfig.for_modality(spec.modality))
    assert case.image.shape == (8, 8, 4) and case.label.max() <= 2
    # what training records in its checkpoint for such a dataset
    pre = describe_preprocessing(spec, IntensityConfig.for_modality(spec.modality), spec.num_classes)
    assert pre["class_names"] == ["background", "grey_matter", "white_matter"] and pre["spacing"] == [1.0, 1.0, 4.0]
    # CT datasets get the CT window, as for a Decathlon "modality"
    ct = _nnunet(tmp_path / "ct", meta={"channel_names": {"0": "CT"}})
    assert IntensityConfig.for_modality(read_dataset(ct).modality).mode == "ct"
    # segment on imagesTs (folder or dataset.json): outputs are named like nnU-Net's labels
    for source in (ds / "imagesTs", ds / "dataset.json"):
        pairs = collect_inputs(source, tmp_path / "pred")
        assert [(Path(a).name, b.name) for a, b in pairs] == [("brain_101_0000.nii.gz", "brain_101.nii.gz")]


def test_imagestr_labelstr_folder_without_json_pairs_nnunet_names(tmp_path):
    ds = _nnunet(tmp_path)
    (ds / "dataset.json").unlink()
    spec = read_dataset(ds)
    assert [(r.name, Path(r.label).name) for r in spec.training] == [
        ("brain_001", "brain_001.nii.gz"), ("brain_002", "brain_002.nii.gz")]


@pytest.mark.parametrize("meta, msg", [
    ({"channel_names": {"0": "T1", "1": "T2"}}, "only single-channel datasets are supported"),
    ({"labels": {"background": 0, "tumour": [1, 2]}}, "region-based training"),
    ({"labels": {"background": 0, "tumour": 2}}, "without gaps, got [0, 2]"),
    ({"labels": {"background": 0, "a": 1, "b": 1}}, "share the value 1"),
    ({"file_ending": ".mha"}, '"file_ending" \'.mha\' is not supported'),
    ({"numTraining": 5}, '"numTraining" is 5 but imagesTr/ holds 2'),
    ({"labels": "tumour"}, '"labels" must be a non-empty object'),
])
def test_malformed_nnunet_datasets_are_refused_naming_the_problem(tmp_path, meta, msg):
    ds = _nnunet(tmp_path, meta=meta)
    with pytest.raises(DataError) as err:
        read_dataset(ds)
    assert msg in str(err.value) and "dataset.json" in str(err.value)


def test_missing_label_and_second_channel_files_are_refused(tmp_path):
    ds = _nnunet(tmp_path)
    (ds / "labelsTr" / "brain_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"no label file .*labelsTr/brain_002.nii.gz"):
        read_dataset(ds)
    ds2 = _nnunet(tmp_path / "two")
    _write(ds2 / "imagesTr" / "brain_001_0001.nii.gz", np.zeros((8, 8, 4), np.float32))
    with pytest.raises(DataError, match="a second input channel"):
        read_dataset(ds2)
    # neither format: the message names both
    (tmp_path / "x.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DataError, match="Medical Segmentation Decathlon.*nnU-Net v2"):
        read_dataset(tmp_path / "x.json")
