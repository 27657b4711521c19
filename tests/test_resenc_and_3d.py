"""Beyond the paper's path, end to end on CPU: the residual-encoder presets
(nnUNetPlannerResEncM) and the 3d_fullres configuration, planned and trained with nnU-Net's
own commands, then exported and predicted (nnU-Net's predictor) in the test's process."""
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATASET_ID, VOLUME_DATASET_ID, plans_variant, predict_in_process, run_command
from nnunetv2_csa.tools.export import export_modality

pytestmark = pytest.mark.integration

TRAINER = "nnUNetTrainerCSA_1epochs_5its"
RESENC_PLANS = "nnUNetResEncUNetMPlans"


def _validation_inputs(env, dataset_name, modality, destination):
    """The fold-0 validation images of one modality, in a folder of their own."""
    with open(os.path.join(env["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        cases = [c for c in json.load(f)[0]["val"] if c.endswith(f"_{modality}") or c.startswith(f"{modality}_")]
    assert cases, f"fold 0 validates no {modality} case"
    os.makedirs(destination)
    for case in cases:
        shutil.copy(os.path.join(env["nnUNet_raw"], dataset_name, "imagesTr", f"{case}_0000.nii.gz"), destination)
    return destination, cases


def _predict_and_export(env, dataset_name, configuration, plans, modality, tmp_path):
    """Predicts one modality's validation cases with the trained CSA model and with its stock
    export; returns the model's fold folder and both predictions."""
    model_folder = os.path.join(env["nnUNet_results"], dataset_name, f"{TRAINER}__{plans}__{configuration}")
    inputs, cases = _validation_inputs(env, dataset_name, modality, str(tmp_path / "inputs"))
    predicted = predict_in_process(env, model_folder, inputs, str(tmp_path / "predicted"), modality)
    assert sorted(predicted) == sorted(f"{c}.nii.gz" for c in cases)
    exported = str(tmp_path / "exported")
    export_modality(model_folder, modality, exported)  # the command: tests/test_trainer_integration.py
    stock_env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    stock = predict_in_process(stock_env, exported, inputs, str(tmp_path / "stock"))
    return os.path.join(model_folder, "fold_0"), predicted, stock


def _log_text(fold_folder):
    return "".join(open(os.path.join(fold_folder, f)).read() for f in sorted(os.listdir(fold_folder))
                   if f.startswith("training_log_"))


def test_resenc_m_plans_train_predict_and_export_with_taps_inside_a_residual_block(tiny_preprocessed_dataset,
                                                                                   tmp_path):
    env, dataset_name = tiny_preprocessed_dataset
    run_command(["nnUNetv2_plan_experiment", "-d", str(TINY_DATASET_ID), "-pl", "nnUNetPlannerResEncM"], env)
    run_command(["nnUNetv2_preprocess", "-d", str(TINY_DATASET_ID), "-plans_name", RESENC_PLANS, "-c", "2d",
                 "-np", "2"], env)
    with open(os.path.join(env["nnUNet_preprocessed"], dataset_name, f"{RESENC_PLANS}.json")) as f:
        architecture = json.load(f)["configurations"]["2d"]["architecture"]["network_class_name"]
    assert architecture.endswith("ResidualEncoderUNet")
    # the preset's stages and residual blocks at an eighth of their width and a batch a CPU runs (the
    # preset's for an 8 GB GPU is 180 slices of 48 x 48 here): the taps' placement is the architecture's
    plans = plans_variant(env, dataset_name, f"{RESENC_PLANS}Narrow", batch_size=4, source=RESENC_PLANS,
                          width_divisor=8)

    run_command(["nnUNetv2_train", str(TINY_DATASET_ID), "2d", "0", "-tr", TRAINER, "-p", plans, "-device",
                 "cpu"], env)
    fold, predicted, stock = _predict_and_export(env, dataset_name, "2d", plans, "LGE", tmp_path)
    # the two convolutions of the first residual block of the middle encoder stage
    assert re.search(r"csa consistency between layers \('encoder\.stages\.(\d+)\.blocks\.0\.conv1', "
                     r"'encoder\.stages\.\1\.blocks\.0\.conv2'\)", _log_text(fold))
    with open(os.path.join(fold, "validation", "summary_per_modality.json")) as f:
        assert set(json.load(f)) == {"LGE", "C0"}
    for name in predicted:
        np.testing.assert_array_equal(stock[name], predicted[name])


def test_3d_fullres_benchmark_trains_with_the_affinity_over_volumes_scores_predicts_and_exports(
        coronal_volume_dataset, tmp_path):
    env, dataset_name, _ = coronal_volume_dataset
    with open(os.path.join(env["nnUNet_preprocessed"], dataset_name, "nnUNetPlans.json")) as f:
        assert len(json.load(f)["configurations"]["3d_fullres"]["patch_size"]) == 3
    # trained through the benchmark (the demo's -c 3d_fullres runs the same), scored there
    report = tmp_path / "report"
    run_command(["nnUNetv2_csa_benchmark", "-d", str(VOLUME_DATASET_ID), "-c", "3d_fullres", "-f", "0", "--rows", "CSA",
                 "--budget", "1", "5", "-device", "cpu", "--timing-iterations", "0", "-o", str(report)], env)
    assert "configuration `3d_fullres`" in (report / "report.md").read_text()
    scores = pd.read_csv(report / "results.csv")
    assert set(scores["row"]) == {"CSA"} and set(scores["modality"]) == {"CT", "MR"}
    assert scores["dice"].between(0, 1).all()

    fold, predicted, stock = _predict_and_export(env, dataset_name, "3d_fullres", "nnUNetPlans", "CT", tmp_path)
    log = _log_text(fold)
    assert re.search(r"train_consistency_loss \d", log), "the CSA term was not computed on the 3D features"
    assert re.search(r"Pseudo dice per modality \{'CT': ", log)
    with open(os.path.join(fold, "validation", "summary_per_modality.json")) as f:
        assert set(json.load(f)) == {"CT", "MR"}
    for name, segmentation in predicted.items():
        assert segmentation.ndim == 3
        np.testing.assert_array_equal(stock[name], segmentation)
