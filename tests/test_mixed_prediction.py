"""nnUNetv2_csa_predict's routing, without a model: which rules sort the cases, how nnU-Net's
options pass through, how a case's channels are grouped. End to end: tests/test_trainer_integration.py
(equal to per-modality nnUNetv2_predict) and tests/test_lifecycle.py (fold ensembles)."""
import json

import pytest

from nnunetv2_csa.modality import ModalityTagError
from nnunetv2_csa.tools.mixed_prediction import MixedPredictionError, _nnunet_options, cases_of_folder, rules_for


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
