"""nnUNetv2_csa_predict without a model: which rules sort the cases, how nnU-Net's options pass
through, how a case's channels are grouped, and the checks of every input file (complete, finite:
nnU-Net's reader would predict on a truncated file's zeros) and of the output folder before
nnUNetv2_predict runs. End to end: tests/test_trainer_integration.py (a case no rule sorts) and
tests/test_lifecycle.py (a mixed folder, per modality and as fold ensembles)."""
import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_csa.image_files import IncompleteFileError, NonFiniteVoxelsError
from nnunetv2_csa.modality import ModalityTagError
from nnunetv2_csa.tools.mixed_prediction import (MixedPredictionError, _nnunet_options, cases_of_folder,
                                                 predict_mixed_folder, rules_for)

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


def _model_folder(tmp_path, **dataset_json_entries):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "plans.json").write_text(json.dumps({"csa_modalities": ["LGE", "C0"]}))
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", **dataset_json_entries}))
    return str(folder)


def test_options_that_start_like_the_locating_ones_pass_through_whole():
    located = _nnunet_options(["-d", "501", "-device", "cpu", "-chk", "checkpoint_best.pth", "-c", "2d",
                               "-part_id", "1", "-prev_stage_predictions", "x", "-tr", "T", "--save_probabilities"])
    assert (located.d, located.c, located.tr, located.p) == ("501", "2d", "T", "nnUNetPlans")


def test_rules_come_from_the_options_then_the_tagging_then_the_converters_naming(tmp_path):
    cases = ["a_LGE", "b_C0"]
    tagged = _model_folder(tmp_path, csa_tagging={"rules": [["LGE", "a.*"], ["C0", "b.*"]]}, csa_conversion={})
    # the user's rules win over the dataset's
    assert rules_for(tagged, [["C0", "a.*|b.*"]], None, cases)[0] == {"a_LGE": "C0", "b_C0": "C0"}
    assert rules_for(tagged, [], None, cases) == (
        {"a_LGE": "LGE", "b_C0": "C0"}, "the dataset's tagging rules (nnUNetv2_csa_tag_modalities, in dataset.json)")
    (tmp_path / "model" / "dataset.json").write_text(json.dumps({"csa_conversion": {}}))
    assert rules_for(tagged, [], None, ["x_C0", "y_LGE"])[0] == {"x_C0": "C0", "y_LGE": "LGE"}
    (tmp_path / "model" / "dataset.json").write_text(json.dumps({}))
    with pytest.raises(MixedPredictionError, match="give --modality NAME REGEX .* or --csv FILE"):
        rules_for(tagged, [], None, cases)
    table = tmp_path / "cases.csv"
    table.write_text("case,modality\na_LGE,C0\nb_C0,C0\nunused,LGE\n")
    assert rules_for(tagged, [], str(table), cases)[0] == {"a_LGE": "C0", "b_C0": "C0"}
    with pytest.raises(MixedPredictionError, match="1 case.* not in .*cases.csv: c_LGE"):
        rules_for(tagged, [], str(table), [*cases, "c_LGE"])
    with pytest.raises(ModalityTagError, match=r"names modalities \['T2'\] that the model does not know"):
        rules_for(tagged, [["T2", ".*"]], None, cases)


def test_a_case_keeps_all_its_channels_and_a_folder_without_images_is_refused(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_text("")
    cases = cases_of_folder(str(tmp_path), ".nii.gz")
    assert {case: [f.rsplit("/", 1)[1] for f in files] for case, files in cases.items()} == \
        {"a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b_0000.nii.gz"]}
    with pytest.raises(MixedPredictionError, match=r"holds no image named CASE_XXXX\.mha"):
        cases_of_folder(str(tmp_path), ".mha")
