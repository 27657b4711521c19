"""The MyoPS converter on a few real MyoPS 2020 cases (NNUNETV2_CSA_REAL_DATA points at the
folder that holds ``myops2020/``)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import convert_myops
from nnunetv2_csa.modality import read_modality_tags

pytestmark = pytest.mark.realdata

CASES = ("Case3001", "Case3002", "Case3015", "Case3030")


@pytest.fixture
def real_myops_subset(real_data_root, tmp_path):
    """Four real cases; ``real_data_root`` (conftest.py) skips with a reason when the data are
    not there, and fails instead when NNUNETV2_CSA_REQUIRE_REAL_DATA=1 (CI)."""
    train = os.path.join(real_data_root, "myops2020", "train")
    subset = tmp_path / "myops2020" / "train"
    subset.mkdir(parents=True)
    for case in CASES:  # symbolic links: the real files are read, never copied or touched
        os.symlink(os.path.join(train, case), subset / case)
    return str(tmp_path / "myops2020"), train


def test_real_myops_cases_convert_and_pass_nnunet_integrity_check(real_myops_subset, tmp_path, monkeypatch):
    source, train = real_myops_subset
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(variable, raising=False)
    stamps = {c: os.stat(os.path.join(train, c, f"{c}_gd.nii.gz")).st_mtime_ns for c in CASES}

    folder = convert_myops(source, 601, str(tmp_path / "raw"), modalities=("C0", "LGE"), split="80-20")

    tags = read_modality_tags(folder)
    assert tags.modalities == ("C0", "LGE")
    assert sorted(tags.case_modality) == sorted(f"{c}_{m}" for c in CASES for m in ("C0", "LGE"))
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    assert dataset_json["numTraining"] == 2 * len(CASES)
    assert dataset_json["csa_conversion"]["phantom"] is None  # real data are not named synthetic
    assert dataset_json["description"].startswith("MyoPS 2020")
    gd = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(train, "Case3001", "Case3001_gd.nii.gz")))
    out = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "Case3001_LGE.nii.gz")))
    np.testing.assert_array_equal(out == 1, np.isin(gd, (200, 1220, 2221)))
    np.testing.assert_array_equal(out == 2, gd == 500)
    np.testing.assert_array_equal(out == 3, gd == 600)

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=1)  # raises on any problem
    assert stamps == {c: os.stat(os.path.join(train, c, f"{c}_gd.nii.gz")).st_mtime_ns for c in CASES}
    shutil.rmtree(folder)
