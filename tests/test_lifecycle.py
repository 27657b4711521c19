"""After cross-validation: nnU-Net's own lifecycle commands with a model of this package, as a
user runs them. A CSA model (one epoch, a narrow copy of the tiny phantom's plans, norms
marked apart so that a case given the other modality's norms is segmented differently)
trained on all five folds with --npz; then nnUNetv2_find_best_configuration, this package's
per-modality view and instructions, the instructions run as printed on a mixed folder, the
fold ensemble against its per-fold predictions, nnUNetv2_ensemble and
nnUNetv2_apply_postprocessing on its outputs, and sharing: the zip round trip and the export
of one modality for all folds.

The ensemble that find_best_configuration considers has a second member that is a copy of the
five trained folds under a second plans name (training a second model would double the
cost): what is tested is that nnU-Net's ensembling path runs on this package's models, not
whether an ensemble helps."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import (TINY_DATASET_ID, plans_variant, predict_in_process, read_labels, read_probabilities,
                      run_command, with_test_trainers)

pytestmark = pytest.mark.integration

TRAINER = "nnUNetTrainerCSA_1epochs_5its_DistinctNorms_NoMirroring"
PLANS = "nnUNetPlansLifecycle"
MEMBER_PLANS = "nnUNetPlansLifecycleCopy"
FOLDS = ("0", "1", "2", "3", "4")
# narrow and small: the five trainings and the many predictions stay cheap on 2 cores
NARROW = dict(batch_size=4, width_divisor=8)
PREDICT_ON_CPU = ["-device", "cpu", "-npp", "1", "-nps", "1"]


def _model_folder(env, dataset_name, plans=PLANS):
    return os.path.join(env["nnUNet_results"], dataset_name, f"{TRAINER}__{plans}__2d")


# five folds in two processes, one thread each (tests/conftest.py; 2 cores); nnU-Net's own run_training, as nnUNetv2_train
# --npz calls it (the command itself is tested in tests/test_trainer_integration.py): nnUNetv2_train sets
# as many torch threads as there are cores, and two such processes beside nnU-Net's worker pools took
# three times as long here (90 s instead of 28 s)
_TRAIN_FOLDS = """
import sys, torch
from nnunetv2.run.run_training import run_training
trainer, plans, *folds = sys.argv[1:]
for fold in folds:
    run_training({dataset!r}, "2d", int(fold), trainer, plans, export_validation_probabilities=True,
                 device=torch.device("cpu"))
"""


@pytest.fixture(scope="module")
def cross_validated(tiny_preprocessed_dataset, tmp_path_factory):
    env, dataset_name = tiny_preprocessed_dataset
    # results of their own: find_best_configuration looks at every model of the dataset
    env = dict(with_test_trainers(env), nnUNet_results=str(tmp_path_factory.mktemp("lifecycle_results")),
               nnUNet_n_proc_DA="0")
    plans_variant(env, dataset_name, PLANS, **NARROW)
    script = _TRAIN_FOLDS.format(dataset=str(TINY_DATASET_ID))
    running = [subprocess.Popen([sys.executable, "-c", script, TRAINER, PLANS, *folds],
                                env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for folds in (FOLDS[0::2], FOLDS[1::2])]
    for process in running:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-6000:]
    plans_variant(env, dataset_name, MEMBER_PLANS, **NARROW)
    shutil.copytree(_model_folder(env, dataset_name), _model_folder(env, dataset_name, MEMBER_PLANS))
    return env, dataset_name


@pytest.fixture(scope="module")
def best_configuration(cross_validated):
    env, dataset_name = cross_validated
    found = run_command(["nnUNetv2_find_best_configuration", TINY_DATASET_ID, "-c", "2d", "-tr", TRAINER,
                         "-p", PLANS, MEMBER_PLANS, "-np", "1"], env)
    ours = run_command(["nnUNetv2_csa_inference_instructions", "-d", TINY_DATASET_ID], env)
    return found, ours


@pytest.fixture(scope="module")
def test_images(cross_validated, tmp_path_factory):
    """Two training images of each modality (any images do: the tests compare predictions), in one
    mixed folder and in a folder of the C0 ones alone."""
    env, dataset_name = cross_validated
    root = tmp_path_factory.mktemp("test_images")
    images = sorted(os.listdir(os.path.join(env["nnUNet_raw"], dataset_name, "imagesTr")))
    chosen = {modality: [name[:-len("_0000.nii.gz")] for name in images if f"_{modality}_" in name][:2]
              for modality in ("LGE", "C0")}
    for folder, modalities in (("mixed", ("LGE", "C0")), ("C0", ("C0",))):
        os.makedirs(root / folder)
        for modality in modalities:
            for case in chosen[modality]:
                shutil.copyfile(os.path.join(env["nnUNet_raw"], dataset_name, "imagesTr", f"{case}_0000.nii.gz"),
                                root / folder / f"{case}_0000.nii.gz")
    return root / "mixed", root / "C0", chosen


def _printed_commands(text: str, replacements: dict) -> list[list[str]]:
    """The command lines of printed instructions, placeholders (regular expressions) replaced."""
    commands = []
    for line in text.splitlines():
        if line.startswith("nnUNetv2_"):
            for placeholder, value in replacements.items():
                line = re.sub(rf"\b{placeholder}\b", value, line)
            commands.append(shlex.split(line))
    return commands


@pytest.fixture(scope="module")
def instructions_run(cross_validated, best_configuration, test_images, tmp_path_factory):
    """This package's inference instructions run as printed on the mixed folder (nnUNetv2_csa_predict
    also saving the probabilities, an option that passes through to nnUNetv2_predict)."""
    env, dataset_name = cross_validated
    root = tmp_path_factory.mktemp("instructions_run")
    instructions = open(os.path.join(env["nnUNet_results"], dataset_name, "inference_instructions_csa.txt")).read()
    commands = _printed_commands(instructions, {"INPUT_FOLDER": str(test_images[0]), "OUTPUT_FOLDER_PP": str(root / "pp"),
                                                "OUTPUT_FOLDER_MODEL_([0-9])": str(root / r"member\1"),
                                                "OUTPUT_FOLDER": str(root / "final")})
    for command in commands:
        extra = [*PREDICT_ON_CPU, "--save_probabilities"] if command[0] == "nnUNetv2_csa_predict" else []
        run_command(command + extra, env)
    return root, commands


def test_find_best_configuration_scores_the_csa_model_as_this_package_does(cross_validated, best_configuration):
    env, dataset_name = cross_validated
    found, ours = best_configuration
    assert "ensemble___" in found.stdout  # the ensemble was considered
    table = pd.read_csv(os.path.join(env["nnUNet_results"], dataset_name, "crossval_per_modality.csv"))
    assert len(table) == 3 and (table["cases"] == 10).all()
    # nnU-Net's pooled cross-validation Dice equals this package's on the same predictions ...
    np.testing.assert_allclose(table["nnU-Net Dice (pooled)"], table["Dice (pooled)"], rtol=1e-6)
    # ... which is the mean of the per-modality ones (five cases of each modality)
    np.testing.assert_allclose(table["Dice (pooled)"], (table["Dice LGE"] + table["Dice C0"]) / 2, rtol=1e-6)
    assert table["Dice LGE"].iloc[0] != table["Dice C0"].iloc[0]
    assert re.search(r"Dice LGE +Dice C0", ours.stdout)


def test_inference_instructions_work_as_printed_on_a_mixed_folder(cross_validated, best_configuration, test_images,
                                                                  instructions_run, tmp_path):
    env, dataset_name = cross_validated
    mixed, _, chosen = test_images
    results = os.path.join(env["nnUNet_results"], dataset_name)
    stock = open(os.path.join(results, "inference_instructions.txt")).read()
    ours = open(os.path.join(results, "inference_instructions_csa.txt")).read()
    assert ours.strip() == stock.strip().replace("nnUNetv2_predict ", "nnUNetv2_csa_predict ")
    assert "nnUNetv2_csa_predict" in ours and ours.strip() in best_configuration[1].stdout
    # nnU-Net's own instruction stops on this model, in one line
    stock_predict = next(c for c in _printed_commands(stock, {"INPUT_FOLDER": str(mixed),
                                                              "OUTPUT_FOLDER[_A-Z0-9]*": str(tmp_path / "stock")})
                         if c[0] == "nnUNetv2_predict")
    refused = run_command(stock_predict + ["-device", "cpu"], env, check=False)
    assert refused.returncode != 0 and "error: this model has modality-specific normalization" in refused.stderr
    root, commands = instructions_run
    assert [c[0] for c in commands] == ["nnUNetv2_csa_predict", "nnUNetv2_apply_postprocessing"]  # a tie: one model
    expected = {f"{case}.nii.gz" for cases in chosen.values() for case in cases}
    assert set(read_labels(str(root / "final"))) == expected and set(read_labels(str(root / "pp"))) == expected
    with open(root / "final" / "csa_prediction.json") as f:
        assert json.load(f)["case_modality"] == {c: m for m, cases in chosen.items() for c in cases}
    # each case as nnU-Net's predictor told its modality segments it (the folder sorted by hand), and
    # differently from the other modality's norms (the control)
    final = read_labels(str(root / "final"))
    for modality, other in (("LGE", "C0"), ("C0", "LGE")):
        alone = tmp_path / modality
        alone.mkdir()
        for case in chosen[modality]:
            shutil.copyfile(mixed / f"{case}_0000.nii.gz", alone / f"{case}_0000.nii.gz")
        told = predict_in_process(env, _model_folder(env, dataset_name), alone, tmp_path / f"told_{modality}",
                                  modality, folds=FOLDS)
        assert len(told) == 2
        for name, segmentation in told.items():
            np.testing.assert_array_equal(final[name], segmentation, err_msg=name)
        misrouted = predict_in_process(env, _model_folder(env, dataset_name), alone, tmp_path / f"as_{other}",
                                       other, folds=FOLDS)
        assert any(not np.array_equal(final[name], misrouted[name]) for name in told)


def _softmax_of_mean_log(per_fold: list[dict]) -> dict:
    """What the fold ensemble must give: nnU-Net averages the folds' logits, and the mean of the
    folds' log-probabilities differs from that mean only by a constant per voxel."""
    ensemble = {}
    for name in per_fold[0]:
        log_mean = np.mean([np.log(np.maximum(p[name], 1e-30)) for p in per_fold], axis=0)
        exp = np.exp(log_mean - log_mean.max(axis=0, keepdims=True))
        ensemble[name] = exp / exp.sum(axis=0, keepdims=True)
    return ensemble


def test_fold_ensemble_gives_every_fold_the_requested_modality_and_feeds_ensemble_and_postprocessing(
        cross_validated, best_configuration, test_images, instructions_run, tmp_path):
    env, dataset_name = cross_validated
    c0_images = test_images[1]

    def predicted(folds, modality, output):
        return predict_in_process(env, _model_folder(env, dataset_name), c0_images, output, modality, folds,
                                  probabilities=True)

    per_fold = [predicted(int(fold), "C0", tmp_path / f"fold{fold}_C0") for fold in FOLDS]
    # the mixed folder's C0 cases, predicted by nnUNetv2_csa_predict -f 0 1 2 3 4 (the instructions)
    ensemble = {n: p for n, p in read_probabilities(instructions_run[0] / "final").items() if "_C0" in n}
    expected = _softmax_of_mean_log(per_fold)
    assert ensemble.keys() == expected.keys() and len(ensemble) == 2
    for name in ensemble:
        np.testing.assert_allclose(ensemble[name], expected[name], atol=2e-3, err_msg=name)
    # the control: the same folds with the LGE norms give other probabilities
    misrouted = predicted(FOLDS, "LGE", tmp_path / "ensemble_LGE")
    assert max(np.abs(ensemble[n] - misrouted[n]).max() for n in ensemble) > 0.05

    # nnUNetv2_ensemble averages the probabilities of its inputs (here folds 0 and 1)
    run_command(["nnUNetv2_ensemble", "-i", tmp_path / "fold0_C0", tmp_path / "fold1_C0", "-o", tmp_path / "ensembled",
                 "--save_npz", "-np", "1"], env)
    ensembled = read_probabilities(tmp_path / "ensembled")
    for name in ensemble:
        np.testing.assert_allclose(ensembled[name], (per_fold[0][name] + per_fold[1][name]) / 2,
                                   atol=2e-3)
    # with the postprocessing find_best_configuration chose
    with open(os.path.join(env["nnUNet_results"], dataset_name, "inference_information.json")) as f:
        chosen = json.load(f)["best_model_or_ensemble"]
    run_command(["nnUNetv2_apply_postprocessing", "-i", tmp_path / "ensembled", "-o", tmp_path / "postprocessed",
                 "-pp_pkl_file", chosen["postprocessing_file"], "-plans_json", chosen["some_plans_file"], "-np", "1"],
                env)
    assert set(read_labels(str(tmp_path / "postprocessed"))) == set(read_labels(str(tmp_path / "ensembled")))


def test_zip_round_trip_and_the_all_fold_export_predict_like_the_model(cross_validated, test_images, instructions_run,
                                                                        tmp_path):
    env, dataset_name = cross_validated
    c0_images = test_images[1]
    # what the model predicts: the mixed folder's C0 cases (nnUNetv2_csa_predict -f 0 1 2 3 4, the instructions)
    original = {n: s for n, s in read_labels(str(instructions_run[0] / "final")).items() if "_C0" in n}
    assert len(original) == 2

    archive = tmp_path / "model.zip"
    run_command(["nnUNetv2_export_model_to_zip", "-d", TINY_DATASET_ID, "-o", archive, "-c", "2d", "-tr", TRAINER,
                 "-p", PLANS, "-f", *FOLDS], env)
    receiver = dict(env, nnUNet_results=str(tmp_path / "receiver_results"))
    os.makedirs(receiver["nnUNet_results"])
    run_command(["nnUNetv2_install_pretrained_model_from_zip", archive], receiver)
    installed = os.path.join(receiver["nnUNet_results"], dataset_name, f"{TRAINER}__{PLANS}__2d")
    received = predict_in_process(receiver, installed, c0_images, tmp_path / "received", "C0", folds=FOLDS)
    assert received.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(received[name], original[name], err_msg=name)
    # without this package's trainers nnU-Net cannot build the model: it names the trainer it misses
    without_package = {k: v for k, v in receiver.items() if k != "nnUNet_extTrainer"}
    missing = run_command(["nnUNetv2_predict", "-i", c0_images, "-o", tmp_path / "without", "-d", TINY_DATASET_ID,
                           "-c", "2d", "-tr", TRAINER, "-p", PLANS, "-f", *FOLDS, "-device", "cpu"],
                          dict(without_package, nnUNet_csa_modality="C0"), check=False)
    assert missing.returncode != 0 and TRAINER in missing.stdout + missing.stderr

    # C0 of all five folds as a stock model: stock nnU-Net's fold ensemble predicts what the model predicts
    exported = tmp_path / "exported_C0"
    run_command(["nnUNetv2_csa_export_modality", "-m", _model_folder(env, dataset_name), "--modality", "C0", "-o",
                 exported], env)
    assert sorted(d for d in os.listdir(exported) if d.startswith("fold_")) == [f"fold_{f}" for f in FOLDS]
    stock = predict_in_process(without_package, exported, c0_images, tmp_path / "stock_C0", folds=FOLDS)
    assert stock.keys() == original.keys()
    for name in stock:
        np.testing.assert_array_equal(stock[name], original[name], err_msg=name)
