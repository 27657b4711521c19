"""nnUNetv2_csa_predict checks every input file as the converters do (complete, finite) before
nnUNetv2_predict reads it: nnU-Net's reader would predict on a truncated file's zeros."""
import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_csa.image_files import IncompleteFileError, NonFiniteVoxelsError
from nnunetv2_csa.tools.mixed_prediction import predict_mixed_folder

RULES = [("LGE", r".*LGE"), ("C0", r".*C0")]


@pytest.fixture
def model_and_inputs(tmp_path, monkeypatch):
    """A model folder as nnUNetv2_predict finds it (plans and dataset.json only: nothing is predicted
    here) and an input folder of two small float images."""
    results = tmp_path / "results"
    model = results / "Dataset907_X" / "nnUNetTrainer__nnUNetPlans__2d"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"csa_modalities": ["LGE", "C0"]}))
    (model / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0}}))
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(results))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in ("p1_LGE", "p2_C0"):
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 8, 8), np.float32)), str(inputs / f"{case}_0000.nii.gz"))
    return inputs, tmp_path / "out"


def _predict(inputs, out):
    return predict_mixed_folder(str(inputs), str(out), ["-d", "907", "-c", "2d"], RULES, dry_run=True)


def test_complete_finite_inputs_pass_the_checks(model_and_inputs):
    # the negative control of the two tests below
    assert _predict(*model_and_inputs) == {"p1_LGE": "LGE", "p2_C0": "C0"}


def test_a_truncated_input_is_an_error_naming_it(model_and_inputs):
    inputs, out = model_and_inputs
    path = inputs / "p2_C0_0000.nii.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) - 64]))
    with pytest.raises(IncompleteFileError, match=r"p2_C0_0000\.nii\.gz is truncated"):
        _predict(inputs, out)


def test_nan_in_an_input_is_an_error_naming_it(model_and_inputs):
    inputs, out = model_and_inputs
    array = np.ones((2, 8, 8), np.float32)
    array[0, 0, :3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(inputs / "p1_LGE_0000.nii.gz"))
    with pytest.raises(NonFiniteVoxelsError, match=r"p1_LGE_0000\.nii\.gz holds 3 NaN/Inf voxel"):
        _predict(inputs, out)


@pytest.mark.parametrize("occupied", ["the input folder", "a folder of other files"])
def test_an_output_folder_it_did_not_write_is_refused_before_predicting(model_and_inputs, occupied):
    from nnunetv2_csa.tools.mixed_prediction import MixedPredictionError

    inputs, out = model_and_inputs
    if occupied == "the input folder":
        out, expected = inputs, "is the input folder -i"
    else:
        out.mkdir()
        (out / "p1_LGE.nii.gz").write_bytes(b"another model's prediction")
        expected = r"holds files this command did not write \(p1_LGE\.nii\.gz\).*--continue_prediction"
    with pytest.raises(MixedPredictionError, match=expected):
        predict_mixed_folder(str(inputs), str(out), ["-d", "907", "-c", "2d"], RULES)
    if occupied != "the input folder":
        assert (out / "p1_LGE.nii.gz").read_bytes() == b"another model's prediction"
