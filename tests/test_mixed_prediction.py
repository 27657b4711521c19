"""nnUNetv2_csa_predict without a model: which rules sort the cases, how nnU-Net's options pass
through, how a case's channels are grouped, and the checks of every input file (complete, finite:
nnU-Net's reader would predict on a truncated file's zeros) and of the output folder before
nnUNetv2_predict runs. End to end: tests/test_trainer_integration.py (a case no rule sorts) and
tests/test_lifecycle.py (a mixed folder, per modality and as fold ensembles)."""
import gzip
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_csa.errors import UserInputError
from nnunetv2_csa.image_files import IncompleteFileError, NonFiniteVoxelsError
from nnunetv2_csa.modality import ModalityTagError
from nnunetv2_csa.tools.inputs import InputFileError
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
        expected = r"holds files this command did not write \(p1_LGE\.nii\.gz\); give a new or empty folder$"
    with pytest.raises(MixedPredictionError, match=expected):
        predict_mixed_folder(str(inputs), str(out), ["-d", "907", "-c", "2d"], RULES)
    if occupied != "the input folder":
        assert (out / "p1_LGE.nii.gz").read_bytes() == b"another model's prediction"


def _model_folder(tmp_path, **dataset_json_entries):
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
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


# ---------------------------------------------------------------- hostile input, round three
def _write_image(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.mark.parametrize("name, expected", [
    ("p3_LGE_000.nii.gz", r"p3_LGE_000\.nii\.gz is not named CASE_XXXX\.nii\.gz"),
    ("p3_LGE_0001.nii.gz", r"case p3_LGE must have one image per channel of the model \(1: p3_LGE_0000\.nii\.gz\), "
                           r"but it has p3_LGE_0001\.nii\.gz"),
    ("p1_LGE_0001.nii.gz", r"case p1_LGE .* but it has p1_LGE_0001\.nii\.gz"),
], ids=["no channel suffix", "channel 1 only", "an extra channel"])
def test_a_file_the_model_cannot_read_as_a_channel_is_refused_before_anything_runs(model_and_inputs, name, expected):
    inputs, out = model_and_inputs
    _write_image(inputs / name, np.ones((2, 8, 8), np.float32))
    with pytest.raises(Exception, match=expected) as raised:
        predict_mixed_folder(str(inputs), str(out), ["-d", "907", "-c", "2d"], [("LGE", ".*LG.*"), ("C0", ".*C0")])
    assert isinstance(raised.value, UserInputError) and not out.exists()


def test_a_missing_channel_of_a_two_channel_model_is_refused(model_and_inputs, tmp_path):
    inputs, out = model_and_inputs
    model = tmp_path / "results" / "Dataset907_X" / "nnUNetTrainer__nnUNetPlans__2d"
    (model / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0},
                                                    "channel_names": {"0": "MR", "1": "MR"}}))
    with pytest.raises(InputFileError, match=r"case p1_LGE must have one image per channel of the model \(2: "
                                             r"p1_LGE_0000\.nii\.gz p1_LGE_0001\.nii\.gz\), but p1_LGE_0001\.nii\.gz "
                                             r"is missing"):
        _predict(inputs, out)


@pytest.mark.parametrize("content, expected", [
    (b"", r"p1_LGE_0000\.nii\.gz is empty \(0 bytes\)"),
    (b"not an image at all\n" * 40, r"p1_LGE_0000\.nii\.gz is not an image SimpleITK can read"),
    ("4D", r"p1_LGE_0000\.nii\.gz is a 4D image; expected 2D or 3D"),
], ids=["empty", "text", "4D"])
def test_an_unreadable_or_4d_image_is_one_line_naming_it(model_and_inputs, content, expected):
    inputs, out = model_and_inputs
    path = inputs / "p1_LGE_0000.nii.gz"
    if content == "4D":
        volume = sitk.GetImageFromArray(np.ones((2, 8, 8), np.float32))
        sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(IncompleteFileError, match=expected):
        _predict(inputs, out)


def test_a_file_name_that_is_not_utf8_and_a_dangling_link_are_one_line(model_and_inputs):
    inputs, out = model_and_inputs
    name = os.fsdecode(b"p\xff3_LGE_0000.nii.gz")
    # SimpleITK aborts the process on such a name: copied under it, not written
    (inputs / name).write_bytes((inputs / "p1_LGE_0000.nii.gz").read_bytes())
    with pytest.raises(IncompleteFileError, match=r"p\\xff3_LGE_0000\.nii\.gz: the file name is not UTF-8"):
        _predict(inputs, out)
    (inputs / name).unlink()
    (inputs / "p4_C0_0000.nii.gz").symlink_to(inputs / "gone.nii.gz")
    with pytest.raises(MixedPredictionError, match=r"holds link\(s\) to nothing: p4_C0_0000\.nii\.gz"):
        _predict(inputs, out)


def test_the_models_own_tags_route_the_cases_it_knows_and_a_retagged_dataset_refuses_the_naming(tmp_path):
    # converted (csa_conversion), then re-tagged from a CSV that calls a_C0 LGE
    retagged = _model_folder(tmp_path, csa_conversion={}, csa_case_modality={"a_C0": "LGE", "b_LGE": "LGE"},
                             csa_other_modality_cases={"c_C0": {"modality": "C0", "patient": "c"}})
    assignment, source = rules_for(retagged, [], None, ["a_C0", "c_C0"])
    assert assignment == {"a_C0": "LGE", "c_C0": "C0"} and "the model's own tags" in source
    with pytest.raises(MixedPredictionError, match=r"tags cases against the converters' naming \(e\.g\. a_C0 is "
                                                   r"tagged LGE.*1 case\(s\) the model does not know \(new_C0\)"):
        rules_for(retagged, [], None, ["a_C0", "new_C0"])
    # tags that agree with the naming: the naming sorts the cases the model does not know
    agreeing = _model_folder(tmp_path / "2", csa_conversion={}, csa_case_modality={"a_C0": "C0", "b_LGE": "LGE"})
    assert rules_for(agreeing, [], None, ["a_C0", "new_LGE"])[0] == {"a_C0": "C0", "new_LGE": "LGE"}


@pytest.fixture
def predicted_runs(model_and_inputs, monkeypatch):
    """``run(rules, continuing)``: predict_mixed_folder with nnUNetv2_predict replaced by a stand-in that
    writes each routed case's segmentation and records the modality it was told (``told``)."""
    import nnunetv2_csa.tools.mixed_prediction as mixed_prediction
    inputs, out = model_and_inputs
    told = []

    class Finished:
        returncode = 0

    def stand_in(command, env):
        folder = command[command.index("-i") + 1]
        for name in os.listdir(folder):
            case = name[:-len("_0000.nii.gz")]
            target = out / f"{case}.nii.gz"
            if not target.exists():  # as nnU-Net's --continue_prediction (and the record is there already)
                assert json.loads((out / "csa_prediction.json").read_text())["case_modality"][case] == \
                    env["nnUNet_csa_modality"]
                target.write_text(env["nnUNet_csa_modality"])
                told.append((case, env["nnUNet_csa_modality"]))
        return Finished()
    monkeypatch.setattr(mixed_prediction.subprocess, "run", stand_in)

    def run(rules, continuing=False):
        options = ["-d", "907", "-c", "2d"] + (["--continue_prediction"] if continuing else [])
        return predict_mixed_folder(str(inputs), str(out), options, rules)
    return run, out, told


def test_continue_prediction_never_keeps_a_file_made_with_other_norms(predicted_runs):
    run, out, told = predicted_runs
    run([("LGE", ".*"), ("C0", "none")])  # wrong rules: both cases predicted as LGE
    assert (out / "p2_C0.nii.gz").read_text() == "LGE"
    with pytest.raises(MixedPredictionError, match="holds an earlier run's predictions"):
        run(RULES)  # without --continue_prediction the old files would stay beside the new ones
    told.clear()
    run(RULES, continuing=True)
    assert told == [("p2_C0", "C0")]  # p1_LGE was made with its own norms and is kept
    assert (out / "p2_C0.nii.gz").read_text() == "C0"
    record = json.loads((out / "csa_prediction.json").read_text())
    assert record["case_modality"] == {"p1_LGE": "LGE", "p2_C0": "C0"} and record["complete"]


def test_continue_prediction_refuses_predictions_without_a_record(predicted_runs):
    run, out, told = predicted_runs
    out.mkdir()
    (out / "p1_LGE.nii.gz").write_text("made by someone")
    with pytest.raises(MixedPredictionError, match=r"holds predictions of 1 input case\(s\) \(p1_LGE\) but no "
                                                   r"csa_prediction\.json"):
        run(RULES, continuing=True)
    assert (out / "p1_LGE.nii.gz").read_text() == "made by someone" and not told
