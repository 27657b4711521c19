"""End to end through nnU-Net's own commands on CPU: train a short CSA variant, resume it
with --c, predict each modality told it (nnUNetv2_predict; nnU-Net's predictor in process),
export one modality and predict it with stock nnU-Net (same segmentation), and the one-line
refusals of a missing modality, a swapped modality order, a too small batch and a mixed test
folder with a case no rule sorts (its predictions: tests/test_lifecycle.py)."""
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_DATASET_ID, predict_in_process, read_labels, run_command, with_test_trainers
from nnunetv2_csa.checkpoints import load_checkpoint
from nnunetv2_csa.modality import read_modality_tags

pytestmark = pytest.mark.integration

# the short CSA trainer whose modalities' norms start apart (tests/ext_trainers): a case that met the other
# modality's norms would be segmented differently, so the comparisons of predictions below can fail
TRAINER = "nnUNetTrainerCSA_2epochs_5its_DistinctNorms"


@pytest.fixture(scope="module")
def trained_csa_model(tiny_preprocessed_dataset):
    env, dataset_name = tiny_preprocessed_dataset
    # one background augmentation worker: the unpaired loader must survive nnU-Net's
    # multiprocess augmenter (it is pickled into the worker)
    env = dict(with_test_trainers(env), nnUNet_n_proc_DA="1")
    run_command(["nnUNetv2_train", str(TINY_DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    model_folder = os.path.join(env["nnUNet_results"], dataset_name, f"{TRAINER}__nnUNetPlans__2d")
    return env, dataset_name, model_folder


def _training_logs(fold_folder):
    return sorted(f for f in os.listdir(fold_folder) if f.startswith("training_log_"))


def test_training_writes_model_with_modalities_and_consistency_log(trained_csa_model):
    env, dataset_name, model_folder = trained_csa_model
    fold = os.path.join(model_folder, "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "progress.png"))
    with open(os.path.join(model_folder, "plans.json")) as f:
        assert json.load(f)["csa_modalities"] == ["LGE", "C0"]
    # the model folder alone is enough to recover the case -> modality map
    tags = read_modality_tags(model_folder)
    assert tags.modalities == ("LGE", "C0") and set(tags.case_modality.values()) == {"LGE", "C0"}
    assert all(tags.modality_of_case(case) == case.rsplit("_", 1)[1] for case in tags.case_modality)

    # a real checkpoint of the CSA trainer loads without full pickle (nothing outside the allow-list)
    checkpoint = load_checkpoint(os.path.join(fold, "checkpoint_final.pth"))
    logged = checkpoint["logging"]
    assert len(logged["train_consistency_losses"]) == 2
    assert np.all(np.isfinite(logged["train_consistency_losses"]))
    assert np.array(logged["mean_fg_dice_per_modality"]).shape == (2, 2)
    # each norm exists once per modality, convolutions once
    norm_keys = [k for k in checkpoint["network_weights"] if ".norm.norms." in k]
    assert any(".norm.norms.0." in k for k in norm_keys) and any(".norm.norms.1." in k for k in norm_keys)
    assert not any(".norm.norms.2." in k for k in norm_keys)

    with open(os.path.join(fold, "validation", "summary_per_modality.json")) as f:
        per_modality = json.load(f)
    assert set(per_modality) == {"LGE", "C0"}
    for entry in per_modality.values():
        assert entry["n_cases"] >= 1 and 0.0 <= entry["mean_Dice"] <= 1.0

    log_text = open(os.path.join(fold, _training_logs(fold)[0])).read()
    assert "Pseudo dice per modality" in log_text and "consistency_loss" in log_text


def _model_copy_in_results_of_its_own(model_folder, dataset_name, tmp_path):
    """A copy of the model folder under a results folder of its own (a resume rewrites its model
    folder; the other tests keep the trained model); returns (results folder, fold folder)."""
    results = tmp_path / "nnUNet_results"
    shutil.copytree(model_folder, results / dataset_name / os.path.basename(model_folder))
    return results, results / dataset_name / os.path.basename(model_folder) / "fold_0"


def test_resume_with_continue_flag_restores_norms_and_logs(trained_csa_model, tmp_path):
    env, dataset_name, model_folder = trained_csa_model
    results, fold = _model_copy_in_results_of_its_own(model_folder, dataset_name, tmp_path)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # pretend the run stopped after epoch 0: keep a checkpoint of that state as 'latest'
    stopped = dict(final, current_epoch=1)
    stopped["logging"] = {k: v[:1] for k, v in final["logging"].items()}
    # make each modality's norm scales recognisable: a resume must continue from exactly these, per modality
    marked = {0: 2.0, 1: 3.0}
    stopped["network_weights"] = {
        k: (torch.full_like(v, marked[int(k.split(".norms.")[1].split(".")[0])])
            if ".norms." in k and k.endswith(".weight") else v)
        for k, v in final["network_weights"].items()}
    assert any(".norms.1.weight" in k for k in stopped["network_weights"])
    os.remove(fold / "checkpoint_final.pth")
    if os.path.exists(fold / "checkpoint_best.pth"):
        os.remove(fold / "checkpoint_best.pth")
    torch.save(stopped, fold / "checkpoint_latest.pth")
    logs_before = set(_training_logs(fold))

    # one background augmentation worker: the unpaired loader must survive nnU-Net's
    # multiprocess augmenter (it is pickled into the worker)
    run_command(["nnUNetv2_train", str(TINY_DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu", "--c"],
                dict(env, nnUNet_results=str(results), nnUNet_n_proc_DA="1"))

    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 2
    # one more epoch of 5 small steps moves them a little, not back to their trained values or across
    for key, value in resumed["network_weights"].items():
        if ".norms." in key and key.endswith(".weight"):
            modality = int(key.split(".norms.")[1].split(".")[0])
            assert (value - marked[modality]).abs().max() < 0.5, key
    assert len(resumed["logging"]["train_consistency_losses"]) == 2
    assert resumed["logging"]["train_consistency_losses"][0] == final["logging"]["train_consistency_losses"][0]
    new_log = [f for f in _training_logs(fold) if f not in logs_before]
    text = open(fold / new_log[0]).read()
    assert "Epoch 1" in text and "Epoch 0\n" not in text


def _predict(env, trainer, input_folder, output_folder, modality=None, check=True):
    env = dict(env)
    env.pop("nnUNet_csa_modality", None)
    if modality is not None:
        env["nnUNet_csa_modality"] = modality
    return run_command(["nnUNetv2_predict", "-i", input_folder, "-o", output_folder, "-d", str(TINY_DATASET_ID),
                        "-c", "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-chk", "checkpoint_final.pth",
                        "-npp", "1", "-nps", "1"], env, check=check)


@pytest.fixture(scope="module")
def heldout_predictions(trained_csa_model, tmp_path_factory):
    """The fold's held-out cases as ``nnUNetv2_csa_heldout`` writes them (one folder per
    modality), each modality predicted told that modality (with nnU-Net's default test-time
    mirroring, as its final validation): C0 by ``nnUNetv2_predict`` as the README's workflow
    does (whose own test predicts LGE so), LGE by the same predictor in this process."""
    env, _, model_folder = trained_csa_model
    heldout = tmp_path_factory.mktemp("heldout") / "heldout"
    printed = run_command(["nnUNetv2_csa_heldout", "-d", str(TINY_DATASET_ID), "-f", "0", "-o", str(heldout)], env)
    predictions = {modality: heldout.parent / f"predicted_{modality}" for modality in ("LGE", "C0")}
    _predict(env, TRAINER, str(heldout / "C0" / "images"), str(predictions["C0"]), "C0")
    predict_in_process(env, model_folder, str(heldout / "LGE" / "images"), str(predictions["LGE"]), "LGE")
    return heldout, predictions, printed.stdout


@pytest.fixture(scope="module")
def misrouted_c0_predictions(trained_csa_model, heldout_predictions):
    """The held-out C0 images predicted with the LGE norms: what a misrouted C0 case would get."""
    env, _, model_folder = trained_csa_model
    heldout, predictions, _ = heldout_predictions
    return predict_in_process(env, model_folder, str(heldout / "C0" / "images"),
                              str(predictions["C0"].parent / "misrouted_C0"), "LGE")


def _differs_somewhere(segmentations: dict, others: dict) -> bool:
    assert segmentations.keys() == others.keys() and segmentations
    return any(not np.array_equal(segmentations[name], others[name]) for name in segmentations)


def test_predicting_each_modality_equals_the_final_validation_of_its_cases(trained_csa_model, heldout_predictions,
                                                                          misrouted_c0_predictions):
    # the final validation must predict every case with its own modality's norms: its
    # segmentations equal nnU-Net's predictor (same checkpoint, same mirroring) told the modality
    _, _, model_folder = trained_csa_model
    heldout, predictions, _ = heldout_predictions
    # the control: the modalities' norms differ enough that a misrouted case would be segmented differently
    assert _differs_somewhere(read_labels(str(predictions["C0"])), misrouted_c0_predictions)
    validation = read_labels(os.path.join(model_folder, "fold_0", "validation"))
    compared, predicted_cases = 0, 0
    for modality, folder in predictions.items():
        predicted = read_labels(str(folder))
        assert sorted(predicted) == sorted(os.listdir(heldout / modality / "labels"))
        predicted_cases += len(predicted)
        for name, segmentation in predicted.items():
            assert set(np.unique(segmentation)) <= {0, 1, 2, 3}
            if name in validation:  # the others are the held-out patients' other modality (--unpaired)
                np.testing.assert_array_equal(validation[name], segmentation, err_msg=f"{name} ({modality})")
                compared += 1
    assert compared == len(validation) and compared >= 2 and predicted_cases > compared


def test_exported_modality_predicts_with_stock_nnunet_what_the_model_predicts(trained_csa_model, heldout_predictions,
                                                                              misrouted_c0_predictions, tmp_path):
    # C0, the second modality (its norms are the second of each pair); the README's workflow test
    # exports LGE and predicts it with nnUNetv2_predict_from_modelfolder
    env, _, model_folder = trained_csa_model
    heldout, predictions, _ = heldout_predictions
    exported = str(tmp_path / "exported_C0")
    export = run_command(["nnUNetv2_csa_export_modality", "-m", model_folder, "--modality", "C0", "-o", exported],
                         env)
    # the printed hint works as printed: it names the exported fold
    assert f"nnUNetv2_predict_from_modelfolder -m {exported} -f 0 -i INPUT -o OUTPUT" in export.stdout
    checkpoint = torch.load(os.path.join(exported, "fold_0", "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert not any(".norms." in k for k in checkpoint["network_weights"])

    stock_env = {k: v for k, v in env.items() if k not in ("nnUNet_extTrainer", "nnUNet_csa_modality")}
    stock = predict_in_process(stock_env, exported, heldout / "C0" / "images", tmp_path / "stock_C0")
    predicted = read_labels(str(predictions["C0"]))
    assert stock.keys() == predicted.keys() and stock
    for name in stock:
        np.testing.assert_array_equal(stock[name], predicted[name])
    # the control: an export that folded the LGE norms would segment these images differently
    assert _differs_somewhere(stock, misrouted_c0_predictions)


def test_predict_without_a_modality_names_the_choices_in_one_line(heldout_predictions, trained_csa_model,
                                                                 tmp_path):
    env, _, _ = trained_csa_model
    images = str(heldout_predictions[0] / "LGE" / "images")
    missing = _predict(env, TRAINER, images, str(tmp_path / "o1"), None, check=False)
    assert missing.returncode != 0
    assert "nnUNet_csa_modality" in missing.stderr and "LGE" in missing.stderr and "C0" in missing.stderr
    # nnU-Net's own command, this package's error: one line, no traceback (an unknown modality takes the
    # same path: its message is test_inference_network_needs_a_known_modality's, tests/test_trainer_units.py)
    assert re.search(r"(^|\n)error: this model has modality-specific normalization", missing.stderr)
    assert "Traceback" not in missing.stderr


def _model_copy_with_plans_modalities(model_folder, destination, modalities):
    shutil.copytree(model_folder, destination)
    plans_file = os.path.join(destination, "plans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    plans["csa_modalities"] = modalities
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    return destination


def test_predict_and_export_refuse_a_model_folder_whose_plans_swap_the_modalities(trained_csa_model,
                                                                                   heldout_predictions, tmp_path,
                                                                                   monkeypatch):
    env, dataset_name, model_folder = trained_csa_model
    swapped = _model_copy_with_plans_modalities(model_folder, str(tmp_path / "swapped"), ["C0", "LGE"])
    images = str(heldout_predictions[0] / "LGE" / "images")
    result = run_command(["nnUNetv2_predict_from_modelfolder", "-i", images, "-o", str(tmp_path / "out"),
                          "-m", swapped, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                         dict(env, nnUNet_csa_modality="LGE"), check=False)
    assert result.returncode != 0
    assert "['LGE', 'C0']" in result.stderr and "['C0', 'LGE']" in result.stderr
    assert "--modalities LGE C0" in result.stderr
    assert not os.path.exists(tmp_path / "out") or not read_labels(str(tmp_path / "out"))
    # the export's command turns this error into one line (tests/test_cli.py); here its cause
    from nnunetv2_csa.modality_order import ModalityOrderError
    from nnunetv2_csa.tools.export import export_modality
    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])  # the test trainer, as for the commands
    with pytest.raises(ModalityOrderError, match="modality order mismatch"):
        export_modality(swapped, "LGE", str(tmp_path / "exported"))
    assert not os.path.exists(tmp_path / "exported")


def test_resume_refuses_a_dataset_reconverted_with_another_modality_order(trained_csa_model, tmp_path):
    env, dataset_name, model_folder = trained_csa_model
    # a copy of the preprocessed dataset whose dataset.json lists the modalities the other way round
    preprocessed = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(os.path.join(env["nnUNet_preprocessed"], dataset_name), preprocessed / dataset_name)
    dataset_json_file = preprocessed / dataset_name / "dataset.json"
    dataset_json = json.loads(dataset_json_file.read_text())
    dataset_json["csa_modalities"] = ["C0", "LGE"]
    dataset_json_file.write_text(json.dumps(dataset_json))
    results, fold = _model_copy_in_results_of_its_own(model_folder, dataset_name, tmp_path)
    shutil.copy(fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    os.remove(fold / "checkpoint_final.pth")
    resumed = run_command(["nnUNetv2_train", str(TINY_DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu",
                           "--c"], dict(env, nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results),
                                        nnUNet_n_proc_DA="0"), check=False)
    assert resumed.returncode != 0
    assert "modality order mismatch" in resumed.stderr and "['LGE', 'C0']" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert not (fold / "checkpoint_final.pth").exists()


def test_batch_smaller_than_the_number_of_modalities_is_refused_before_training(tiny_preprocessed_dataset):
    env, dataset_name = tiny_preprocessed_dataset
    env = with_test_trainers(env)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], dataset_name)
    with open(os.path.join(preprocessed, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = "nnUNetPlansBatch1"
    plans["configurations"]["2d"]["batch_size"] = 1
    with open(os.path.join(preprocessed, "nnUNetPlansBatch1.json"), "w") as f:
        json.dump(plans, f)
    result = run_command(["nnUNetv2_train", str(TINY_DATASET_ID), "2d", "0", "-tr", TRAINER, "-p",
                          "nnUNetPlansBatch1", "-device", "cpu"], dict(env, nnUNet_n_proc_DA="1"), check=False)
    assert result.returncode != 0
    assert "batch size 1 is smaller than the number of modalities (2" in result.stderr
    assert "background workers" not in result.stderr
    assert "error: " in result.stderr and "Traceback" not in result.stderr


def test_heldout_folders_feed_predict_and_evaluate_as_the_readme_says(trained_csa_model, heldout_predictions,
                                                                      tmp_path):
    env, dataset_name, _ = trained_csa_model
    heldout, predictions, printed = heldout_predictions
    with open(os.path.join(env["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        validation = json.load(f)[0]["val"]
    # the fold's validation cases and, as the dataset is unpaired, the other modality of their patients
    with open(os.path.join(env["nnUNet_raw"], dataset_name, "dataset.json")) as f:
        dataset_json = json.load(f)
    patients = {dataset_json["csa_case_patient"][c] for c in validation}
    heldout_cases = sorted(validation + [c for c, tag in dataset_json["csa_other_modality_cases"].items()
                                         if tag["patient"] in patients])
    assert len(heldout_cases) == 2 * len(validation)
    for modality in ("LGE", "C0"):
        cases = [c for c in heldout_cases if c.endswith(f"_{modality}")]
        assert sorted(os.listdir(heldout / modality / "images")) == [f"{c}_0000.nii.gz" for c in cases]
        assert sorted(os.listdir(heldout / modality / "labels")) == [f"{c}.nii.gz" for c in cases]
        assert f"nnUNet_csa_modality={modality} nnUNetv2_predict -i {heldout / modality / 'images'}" in printed
    run_command(["nnUNetv2_csa_evaluate", "-pred", str(predictions["LGE"]), "-ref", str(heldout / "LGE" / "labels"),
                 "-djfile", os.path.join(env["nnUNet_raw"], dataset_name, "dataset.json"), "-o",
                 str(tmp_path / "eval")], env)
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert set(metrics["modality"]) == {"LGE"} and len(metrics["case"].unique()) == len(
        os.listdir(heldout / "LGE" / "images"))
    again = run_command(["nnUNetv2_csa_heldout", "-d", str(TINY_DATASET_ID), "-o", str(heldout)], env, check=False)
    assert again.returncode == 2 and "exists already" in again.stderr


def _mixed_folder(heldout, destination):
    """The held-out images of both modalities in one folder, as a hospital's test set comes."""
    os.makedirs(destination)
    for modality in ("LGE", "C0"):
        for name in os.listdir(heldout / modality / "images"):
            shutil.copyfile(heldout / modality / "images" / name, os.path.join(destination, name))
    return destination


def test_mixed_folder_with_a_case_no_rule_matches_stops_before_predicting(trained_csa_model, heldout_predictions,
                                                                          tmp_path):
    env, _, _ = trained_csa_model
    mixed = _mixed_folder(heldout_predictions[0], tmp_path / "mixed")
    lge_image = next(n for n in os.listdir(mixed) if "_LGE_" in n)
    shutil.copyfile(os.path.join(mixed, lge_image), os.path.join(mixed, "scan7_T2_0000.nii.gz"))
    output = tmp_path / "out"
    options = ["-o", output, "-d", TINY_DATASET_ID, "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu"]
    unmatched = run_command(["nnUNetv2_csa_predict", "-i", mixed, *options], env, check=False)
    assert unmatched.returncode == 2 and not output.exists()
    assert unmatched.stderr.strip().splitlines() == [
        "error: 1 case(s) match no rule of the converters' naming (<patient>_<modality>): scan7_T2. Each regular "
        "expression must match whole case names; fix them until every case matches exactly one (check with "
        "--dry-run)"]
    # rules of the user's own route it; two rules matching one case stop it
    ambiguous = run_command(["nnUNetv2_csa_predict", "-i", mixed, *options, "--modality", "LGE", ".*_LGE|scan.*",
                             "--modality", "C0", ".*_C0|scan7.*"], env, check=False)
    assert ambiguous.returncode == 2 and not output.exists()
    assert "1 match two or more: scan7_T2 (LGE/C0)" in ambiguous.stderr and "Traceback" not in ambiguous.stderr
    dry = run_command(["nnUNetv2_csa_predict", "-i", mixed, *options, "--modality", "LGE", ".*_LGE|scan.*",
                       "--modality", "C0", ".*_C0", "--dry-run"], env)
    assert re.search(r"^LGE: 3 case\(s\)", dry.stdout, re.M) and "dry run: nothing predicted" in dry.stdout
    assert not output.exists()
