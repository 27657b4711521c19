"""What ``nnUNetv2_find_best_configuration`` leaves a user of this package to do, said for
models with modality-specific norms:

    nnUNetv2_find_best_configuration 501 -c 2d 3d_fullres -tr nnUNetTrainerCSA
    nnUNetv2_csa_inference_instructions -d 501

nnU-Net pools the modalities in its cross-validation Dice and prints inference commands
(``nnUNetv2_predict ...``) that stop on a model of this package until they are told the
modality. This command reads what nnU-Net wrote (``inference_information.json``), scores
each considered model's (and ensemble's) cross-validation predictions per modality with this
package's evaluation, beside nnU-Net's pooled number, and prints nnU-Net's instructions with
``nnUNetv2_csa_predict`` in place of ``nnUNetv2_predict`` where the model needs a modality
(it takes the same options and sorts a mixed folder by modality). The instructions are
written to ``inference_instructions_csa.txt`` beside nnU-Net's ``inference_instructions.txt``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

import pandas as pd

from nnunetv2_csa.errors import UserInputError, one_line_errors
from nnunetv2_csa.modality import MODALITIES_KEY, modality_tags_from_dataset_json
from nnunetv2_csa.tools.inputs import dataset_folder, file_ending_of, integer_at_least, read_json_file, read_splits

INSTRUCTIONS_FILE = "inference_instructions_csa.txt"
PER_MODALITY_FILE = "crossval_per_modality.csv"


class InstructionsError(UserInputError, RuntimeError):
    pass


def _results_folder(dataset: str) -> str:
    return dataset_folder("nnUNet_results", dataset, "train the model and run nnUNetv2_find_best_configuration "
                                                     "first")


def _needs_modality(model: dict) -> bool:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folder = get_output_folder(model["dataset"], model["trainer"], model["plans_identifier"], model["configuration"])
    return MODALITIES_KEY in read_json_file(os.path.join(folder, "plans.json"), "is the model folder complete?")


def rewritten_instructions(information: dict) -> str:
    """nnU-Net's printed instructions, ``nnUNetv2_predict`` → ``nnUNetv2_csa_predict`` for
    the models that need a modality."""
    from nnunetv2.evaluation.find_best_configuration import print_inference_instructions

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_inference_instructions(information, instructions_file=None)
    selected = information["best_model_or_ensemble"]["selected_model_or_models"]
    csa_trainers = {m["trainer"] for m in selected
                    if _needs_modality({**m, "dataset": information["dataset_name_or_id"]})}
    lines = []
    for line in printed.getvalue().splitlines():
        trainer = re.search(r" -tr (\S+)", line)
        if line.startswith("nnUNetv2_predict ") and trainer and trainer.group(1) in csa_trainers:
            line = "nnUNetv2_csa_predict " + line.removeprefix("nnUNetv2_predict ")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def per_modality_crossval(results_folder: str, information: dict, num_processes: int) -> pd.DataFrame:
    """Mean Dice over cases and foreground classes, per modality and pooled, of every model and
    ensemble find_best_configuration scored, from the same cross-validation predictions."""
    from nnunetv2_csa.tools.evaluation import evaluate_folder

    reference = os.path.join(dataset_folder("nnUNet_preprocessed", os.path.basename(results_folder),
                                            "set nnUNet_preprocessed as during training"), "gt_segmentations")
    if not os.path.isdir(reference):
        raise InstructionsError(f"{reference} does not exist: nnU-Net's cross-validation references are needed "
                                f"(set nnUNet_preprocessed as during training)")
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string

    scored = validation_cases_of_folds(os.path.dirname(reference), information["folds"])
    rows = []
    for identifier, pooled in information["all_results"].items():
        if identifier.startswith("ensemble___"):
            predictions = os.path.join(results_folder, "ensembles", identifier)
        else:  # where find_best_configuration gathered the folds' validation predictions
            predictions = os.path.join(results_folder, identifier,
                                       f"crossval_results_folds_{folds_tuple_to_string(information['folds'])}")
        dataset_json_file = os.path.join(predictions, "dataset.json")
        dataset_json = read_json_file(dataset_json_file, "run nnUNetv2_find_best_configuration again")
        tags = modality_tags_from_dataset_json(dataset_json, dataset_json_file)
        try:
            df = evaluate_folder(predictions, reference, dataset_json["labels"],
                                 case_modality=dict(tags.case_modality), num_processes=num_processes,
                                 file_ending=file_ending_of(dataset_json, dataset_json_file), cases=scored)
        except FileNotFoundError as e:
            raise InstructionsError(f"{e}; the cross-validation predictions of {identifier} are incomplete: run "
                                    f"nnUNetv2_find_best_configuration again with the folds it was given") from None
        # nnU-Net's number: the mean over classes of each class's mean over cases; with every class in
        # every case, the mean over all rows here
        row = {"model": identifier, "nnU-Net Dice (pooled)": pooled, "Dice (pooled)": df["dice"].mean()}
        for modality in tags.modalities:
            row[f"Dice {modality}"] = df.loc[df["modality"] == modality, "dice"].mean()
        row["cases"] = df["case"].nunique()
        rows.append(row)
    return pd.DataFrame(rows)


def validation_cases_of_folds(preprocessed_folder: str, folds) -> list[str]:
    """The validation cases of ``folds`` in the dataset's splits_final.json: what nnU-Net's
    cross-validation of those folds predicted, and so what is scored."""
    splits_file = os.path.join(preprocessed_folder, "splits_final.json")
    splits = read_splits(splits_file, "set nnUNet_preprocessed as during training")
    cases = []
    for fold in folds:
        if not (isinstance(fold, int) and 0 <= fold < len(splits)):
            raise InstructionsError(f"fold {fold!r} of the cross-validation is not in {splits_file} ({len(splits)} "
                                    f"folds): run nnUNetv2_find_best_configuration again with -f naming its folds")
        cases.extend(splits[fold]["val"])
    return sorted(set(cases))


def _check_information(information: dict, source: str) -> None:
    """What this command reads of nnU-Net's inference_information.json, or one line naming it."""
    fix = "run nnUNetv2_find_best_configuration again"
    folds = information.get("folds")
    if not (isinstance(folds, list) and folds and all(isinstance(f, int) and not isinstance(f, bool) for f in folds)):
        raise InstructionsError(f"{source}: 'folds' must be a non-empty list of fold numbers, not {folds!r}; {fix}")
    if not (isinstance(information.get("all_results"), dict) and information["all_results"]):
        raise InstructionsError(f"{source}: 'all_results' must be an object model -> Dice; {fix}")
    best = information.get("best_model_or_ensemble")
    selected = best.get("selected_model_or_models") if isinstance(best, dict) else None
    if not (isinstance(selected, list) and selected and all(
            isinstance(m, dict) and {"trainer", "plans_identifier", "configuration"} <= set(m) for m in selected)):
        raise InstructionsError(f"{source}: 'best_model_or_ensemble' must name its selected_model_or_models "
                                f"(trainer, plans_identifier, configuration); {fix}")


def inference_instructions(dataset: str, num_processes: int = 1) -> tuple[pd.DataFrame, str, str]:
    """(the per-modality table, the instructions, the dataset's results folder they are written to)."""
    results_folder = _results_folder(dataset)
    information_file = os.path.join(results_folder, "inference_information.json")
    if not os.path.isfile(information_file):
        raise InstructionsError(f"{information_file} does not exist: run nnUNetv2_find_best_configuration "
                                f"{dataset} first (with the trainers and configurations you trained)")
    information = read_json_file(information_file, f"run nnUNetv2_find_best_configuration {dataset} again")
    _check_information(information, information_file)
    table = per_modality_crossval(results_folder, information, num_processes)
    instructions = rewritten_instructions(information)
    table.to_csv(os.path.join(results_folder, PER_MODALITY_FILE), index=False)
    with open(os.path.join(results_folder, INSTRUCTIONS_FILE), "w") as f:
        f.write(instructions)
    return table, instructions, results_folder


@one_line_errors()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_inference_instructions",
        description="After nnUNetv2_find_best_configuration: the cross-validation Dice per modality of every model "
                    "it considered, and its inference instructions with the commands a model of this package "
                    "needs (nnUNetv2_csa_predict, which sorts a mixed folder by modality).")
    parser.add_argument("-d", required=True, help="dataset id or name, as given to nnUNetv2_find_best_configuration")
    parser.add_argument("-np", type=integer_at_least(1), default=1, help="processes for the evaluation (default 1)")
    args = parser.parse_args(argv)
    table, instructions, folder = inference_instructions(args.d, args.np)
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
        print("Cross-validation Dice (mean over cases and foreground classes), per modality:")
        print(table.to_string(index=False))
    print()
    print(instructions)
    print(f"wrote {os.path.join(folder, PER_MODALITY_FILE)} and {os.path.join(folder, INSTRUCTIONS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
