"""Segment a test folder that mixes modalities with one command.

    nnUNetv2_csa_predict -i MIXED_IMAGES -o OUT -d 501 -c 2d -tr nnUNetTrainerCSA -f 0 1 2 3 4

takes ``nnUNetv2_predict``'s options, sorts the input's cases by modality and runs
``nnUNetv2_predict`` once per modality with ``nnUNet_csa_modality`` set, all into ``-o``: the
result is what a user who sorted the folder by hand and called ``nnUNetv2_predict`` per
modality gets, voxel for voxel. Every option other than ``-i``, ``-o`` and the routing
options below reaches ``nnUNetv2_predict`` unchanged (folds, ``--save_probabilities``,
``-chk``, ``-step_size``, ``--disable_tta``, ``-device``, ``--continue_prediction`` ...).

A case's modality comes from, in this order:

1. ``--modality NAME REGEX`` (once per modality; the regular expression matches the whole
   case identifier) or ``--csv FILE`` (columns ``case``, ``modality``);
2. the model's own tags, for the cases its dataset.json tags (``csa_case_modality``, and the other
   modality's images of an ``--unpaired`` conversion);
3. for the other cases, the dataset's own tagging rules, which ``nnUNetv2_csa_tag_modalities
   --modality`` wrote into dataset.json (the model folder keeps a copy);
4. else the converters' naming, ``<patient>_<modality>``, for datasets written by this
   package's converters, unless the model's tags contradict it (a re-tagged dataset).

A case that no rule matches, or two, stops the command before anything is predicted, with
one line naming the case; so does an input that is not what the model reads (a file without a
``_XXXX`` channel suffix, a channel too many or too few, an empty, unreadable or 4D image).
``--dry-run`` prints the assignment and predicts nothing. Beside nnU-Net's own files the output
folder gets ``csa_prediction.json``: each case's modality and where the rule came from, written
before anything is predicted, so that ``--continue_prediction`` predicts again every case whose
modality differs from the record's (a file is never kept that was made with other norms).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from nnunetv2_csa.atomic_files import replace_file
from nnunetv2_csa.errors import UserInputError, first_few, one_line_errors
from nnunetv2_csa.image_files import check_finite, check_name_encoding, images_not_read
from nnunetv2_csa.modality import (CASE_MODALITY_KEY, CONVERSION_KEY, TAGGING_KEY, ModalityTagError,
                                   check_case_name, modalities_from_plans, other_modality_cases)
from nnunetv2_csa.modality_rules import (compile_rules, converter_naming_rules, modalities_from_rules,
                                         read_tag_csv, some)
from nnunetv2_csa.tools.inputs import (cases_in_folder, channel_count, check_case_images, check_output_folder,
                                      dataset_name, file_ending_of, read_json_file)
from nnunetv2_csa.training.inference_modality import INFERENCE_MODALITY_ENV

#: what the output folder records about the routing
RECORD_FILE = "csa_prediction.json"


class MixedPredictionError(UserInputError, ValueError):
    pass


def model_folder_of(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """The model folder ``nnUNetv2_predict`` reads for these options (nnU-Net's own lookup)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    # dataset_name refuses an unknown id in one line; with a dataset's name nnU-Net's lookup only joins paths
    folder = get_output_folder(dataset_name(dataset), trainer, plans, configuration)
    if not os.path.isfile(os.path.join(folder, "plans.json")):
        raise MixedPredictionError(f"{folder} holds no trained model (no plans.json): train it, or check -d, -tr, "
                                   f"-p and -c")
    return folder


def _load_json(path: str) -> dict:
    return read_json_file(path, "is the model folder complete?")


def rules_for(model_folder: str, modality_rules, csv_file: str | None,
              cases: list[str]) -> tuple[dict[str, str], str]:
    """(case -> modality, where the rules came from) for every case; see the module's docstring."""
    dataset_json = _load_json(os.path.join(model_folder, "dataset.json"))
    model_modalities = modalities_from_plans(_load_json(os.path.join(model_folder, "plans.json")),
                                             os.path.join(model_folder, "plans.json"))
    if csv_file:
        listed, _, _ = read_tag_csv(csv_file)
        missing = [c for c in cases if c not in listed]
        if missing:
            raise MixedPredictionError(f"{len(missing)} case(s) of the input are not in {csv_file}: {some(missing)}; "
                                       f"add a line per case")
        assignment, source = {c: listed[c] for c in cases}, f"--csv {csv_file}"
    elif modality_rules:
        rules = compile_rules(modality_rules, minimum=1)
        assignment, source = modalities_from_rules(cases, rules, told_by="rule of --modality"), "--modality"
    else:
        assignment, source = _assignment_from_the_dataset(dataset_json, model_folder, model_modalities, cases)
    unknown = sorted({m for m in assignment.values() if m not in model_modalities})
    if unknown:
        raise ModalityTagError(f"{source} names modalities {unknown} that the model does not know; it knows "
                               f"{model_modalities}")
    return assignment, source


def _model_tags(dataset_json: dict, source: str) -> dict[str, str]:
    """case -> modality of every case the model's dataset.json tags: its training cases and the other
    modality's images an ``--unpaired`` conversion left out."""
    tags = dataset_json.get(CASE_MODALITY_KEY) or {}
    if not (isinstance(tags, dict) and all(isinstance(m, str) for m in tags.values())):
        raise ModalityTagError(f"{source}: '{CASE_MODALITY_KEY}' must be an object case -> modality name")
    other = {case: tag["modality"] for case, tag in other_modality_cases(dataset_json, source).items()}
    return {**other, **tags}


def _assignment_from_the_dataset(dataset_json: dict, model_folder: str, model_modalities: list[str],
                                 cases: list[str]) -> tuple[dict[str, str], str]:
    """Without --modality or --csv: a case the model's tags know gets its tag; the others the dataset's
    tagging rules, else the converters' naming, which is used only where no tag contradicts it (a
    converted dataset re-tagged from a CSV keeps the converters' record, not their naming)."""
    dataset_file = os.path.join(model_folder, "dataset.json")
    tags = _model_tags(dataset_json, dataset_file)
    known = {c: tags[c] for c in cases if c in tags}
    rest = [c for c in cases if c not in tags]
    sources = [f"the model's own tags ({CASE_MODALITY_KEY}) for {len(known)} case(s)"] if known else []
    if not rest:
        return known, sources[0]
    if (dataset_json.get(TAGGING_KEY) or {}).get("rules"):
        rules = compile_rules(dataset_json[TAGGING_KEY]["rules"], minimum=1)
        rule_source = "the dataset's tagging rules (nnUNetv2_csa_tag_modalities, in dataset.json)"
    elif CONVERSION_KEY in dataset_json:
        rules = converter_naming_rules(model_modalities)
        rule_source = "the converters' naming (<patient>_<modality>)"
        named = {c: m for name, pattern in rules for c, m in tags.items() if pattern.fullmatch(c) and name != m}
        if named:
            contradicted = sorted(named)
            raise MixedPredictionError(
                f"{dataset_file} tags cases against the converters' naming (e.g. {contradicted[0]} is tagged "
                f"{tags[contradicted[0]]}; the dataset was re-tagged with nnUNetv2_csa_tag_modalities --csv?), so "
                f"the names of {len(rest)} case(s) the model does not know ({some(rest)}) do not tell their "
                f"modality: give --csv FILE or --modality NAME REGEX")
    else:
        raise MixedPredictionError(f"{dataset_file} has no tagging rules to sort the cases by (the dataset was tagged "
                                   f"with a CSV, or by hand), and {len(rest)} case(s) are not among its tagged cases "
                                   f"({some(rest)}): give --modality NAME REGEX (once per modality) or --csv FILE")
    assignment = {**known, **modalities_from_rules(rest, rules, told_by=f"rule of {rule_source}")}
    return assignment, "; ".join(sources + [f"{rule_source} for {len(rest)} case(s)"]) if known else rule_source


def cases_of_folder(folder: str, file_ending: str) -> dict[str, list[str]]:
    """case -> its files (every channel), as nnU-Net's predictor groups a folder; a file name that is
    not UTF-8 or has no channel suffix, and a link to nothing, are one error naming it."""
    if not os.path.isdir(folder):
        raise MixedPredictionError(f"-i {folder} is not a folder; give the folder of images to segment")
    entries = sorted(os.listdir(folder))
    for name in entries:
        check_name_encoding(os.path.join(folder, name))
    dangling = [f for f in entries
                if os.path.islink(os.path.join(folder, f)) and not os.path.exists(os.path.join(folder, f))]
    if dangling:
        raise MixedPredictionError(f"-i {folder} holds link(s) to nothing: {first_few(dangling, 5)}; restore what "
                                   f"they point to, or remove them")
    files = [f for f in entries if os.path.isfile(os.path.join(folder, f))]
    skipped = images_not_read(files, file_ending)
    if skipped:
        print(f"warning: {len(skipped)} image file(s) in -i {folder} do not end in {file_ending!r} and are not "
              f"predicted: {first_few(skipped, 10)}; convert or rename them", file=sys.stderr)
    cases = {check_case_name(case, folder): paths for case, paths in cases_in_folder(folder, files, file_ending).items()}
    if not cases:
        raise MixedPredictionError(f"-i {folder} holds no image named CASE_XXXX{file_ending}; give nnU-Net's "
                                   f"image layout (imagesTs)")
    return cases


#: nnUNetv2_predict's single-dash options other than those that locate the model: declared so that
#: argparse does not read ``-device`` as ``-d evice`` or ``-chk`` as ``-c hk``
_OTHER_PREDICT_OPTIONS = ("-f", "-step_size", "-chk", "-npp", "-nps", "-prev_stage_predictions", "-num_parts",
                          "-part_id", "-device")


def _nnunet_options(argv: list[str]) -> argparse.Namespace:
    """The options of nnUNetv2_predict that locate the model (the rest pass through unread)."""
    parser = argparse.ArgumentParser(prog="nnUNetv2_csa_predict", add_help=False, allow_abbrev=False)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-tr", default="nnUNetTrainer")
    parser.add_argument("-p", default="nnUNetPlans")
    for option in _OTHER_PREDICT_OPTIONS:
        parser.add_argument(option, nargs="+" if option == "-f" else None)
    known, _ = parser.parse_known_args(argv)
    return known


def predict_mixed_folder(input_folder: str, output_folder: str, predict_options: list[str], modality_rules=(),
                         csv_file: str | None = None, dry_run: bool = False) -> dict[str, str]:
    """Runs nnUNetv2_predict per modality; returns case -> modality."""
    from nnunetv2_csa.tools.commands import console_command

    for option in ("-i", "-o"):
        if option in predict_options:
            raise MixedPredictionError(f"give {option} once")
    located = _nnunet_options(predict_options)
    model_folder = model_folder_of(located.d, located.tr, located.p, located.c)
    dataset_file = os.path.join(model_folder, "dataset.json")
    model_dataset_json = _load_json(dataset_file)
    file_ending = file_ending_of(model_dataset_json, dataset_file)
    case_files = cases_of_folder(input_folder, file_ending)
    n_channels = channel_count(model_dataset_json, dataset_file)
    for case, files in case_files.items():  # nnU-Net's reader would predict on a truncated file's zeros, or on NaN
        check_case_images(case, files, n_channels, file_ending)
        for path in files:
            check_finite(path)
    assignment, source = rules_for(model_folder, modality_rules, csv_file, sorted(case_files))
    by_modality: dict[str, list[str]] = {}
    for case, modality in sorted(assignment.items()):
        by_modality.setdefault(modality, []).append(case)
    for modality, cases in by_modality.items():
        print(f"{modality}: {len(cases)} case(s), e.g. {some(cases)}")
    print(f"(modalities from {source})")
    if dry_run:
        print("dry run: nothing predicted")
        return assignment
    continuing = "--continue_prediction" in predict_options
    _check_output_folder(output_folder, input_folder, continuing)
    os.makedirs(output_folder, exist_ok=True)
    if continuing:
        _forget_predictions_made_with_other_norms(output_folder, assignment, file_ending)
    record = {"modality_source": source, "case_modality": assignment, "input_folder": os.path.abspath(input_folder),
              "model_folder": model_folder, "nnUNetv2_predict_options": predict_options, "complete": False}
    # before anything is predicted: every file in -o is made with the norms this record names
    _write_record(output_folder, record)
    for done, (modality, cases) in enumerate(by_modality.items()):
        with tempfile.TemporaryDirectory(prefix=f"csa_predict_{modality}_") as sorted_input:
            for case in cases:
                for path in case_files[case]:
                    os.symlink(os.path.abspath(path), os.path.join(sorted_input, os.path.basename(path)))
            command = console_command("nnUNetv2_predict") + ["-i", sorted_input, "-o", output_folder, *predict_options]
            print(f"\n{INFERENCE_MODALITY_ENV}={modality} nnUNetv2_predict -i <{len(cases)} {modality} case(s) of "
                  f"{input_folder}> -o {output_folder} {' '.join(predict_options)}", flush=True)
            finished = subprocess.run(command, env={**os.environ, INFERENCE_MODALITY_ENV: modality})
        if finished.returncode != 0:
            raise MixedPredictionError(f"nnUNetv2_predict stopped (exit {finished.returncode}) on the {modality} "
                                       f"cases (its message is above; modalities done: "
                                       f"{list(by_modality)[:done] or 'none'}); fix it and run the command again "
                                       f"with --continue_prediction to keep what is done")
    _write_record(output_folder, {**record, "complete": True})
    return assignment


def _write_record(output_folder: str, record: dict) -> None:
    def write(path):
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    replace_file(os.path.join(output_folder, RECORD_FILE), write)


def _prediction_files(output_folder: str, case: str, file_ending: str) -> list[str]:
    """What nnUNetv2_predict writes for ``case`` (the segmentation, and with --save_probabilities
    the probabilities and their properties) that exists in ``output_folder``."""
    names = [case + file_ending, f"{case}.npz", f"{case}.pkl"]
    return [os.path.join(output_folder, n) for n in names if os.path.isfile(os.path.join(output_folder, n))]


def _forget_predictions_made_with_other_norms(output_folder: str, assignment: dict[str, str],
                                              file_ending: str) -> None:
    """--continue_prediction keeps what nnUNetv2_predict made of a case only if the record says it was
    made with the modality the case is routed to now; the rest is removed and predicted again. Without a
    record the norms of the files in -o are unknown, and keeping them is refused."""
    record_file = os.path.join(output_folder, RECORD_FILE)
    predicted = {case: _prediction_files(output_folder, case, file_ending) for case in assignment}
    predicted = {case: files for case, files in predicted.items() if files}
    if not os.path.isfile(record_file):
        if predicted:
            raise MixedPredictionError(
                f"-o {output_folder} holds predictions of {len(predicted)} input case(s) ({some(sorted(predicted))}) "
                f"but no {RECORD_FILE}: with which modality's norms they were made is unknown, so "
                f"--continue_prediction cannot keep them; remove them, or give a new -o")
        return
    previous = read_json_file(record_file, f"remove {record_file} and the predictions beside it, or give a new -o")
    routed = previous.get("case_modality")
    if not isinstance(routed, dict):
        raise MixedPredictionError(f"{record_file} has no case_modality object; remove it and the predictions "
                                   f"beside it, or give a new -o")
    redone = sorted(case for case in predicted if routed.get(case) != assignment[case])
    for case in redone:
        for path in predicted[case]:
            os.remove(path)
    if redone:
        print(f"--continue_prediction: {len(redone)} case(s) were predicted with another modality's norms (or "
              f"none recorded) and are predicted again: {some(redone)}")


def _check_output_folder(output_folder: str, input_folder: str, continuing: bool) -> None:
    """-o can be written, is not the input folder, and is new or empty, or named for
    --continue_prediction: nnUNetv2_predict replaces files of the cases' names without a word, and
    an earlier run's other cases would stay beside the new ones."""
    check_output_folder(output_folder, "-o")
    if os.path.realpath(output_folder) == os.path.realpath(input_folder):
        raise MixedPredictionError(f"-o {output_folder} is the input folder -i: the predictions would mix with the "
                                   f"images; give another folder")
    if continuing or not os.path.isdir(output_folder) or not os.listdir(output_folder):
        return
    if os.path.isfile(os.path.join(output_folder, RECORD_FILE)):
        raise MixedPredictionError(f"-o {output_folder} holds an earlier run's predictions ({RECORD_FILE}), which "
                                   f"would stay beside the new ones; give a new or empty folder, or add "
                                   f"--continue_prediction to keep those made with the same modality's norms")
    raise MixedPredictionError(f"-o {output_folder} holds files this command did not write "
                               f"({first_few(sorted(os.listdir(output_folder)), 5)}); give a new or empty folder")


@one_line_errors()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_predict", allow_abbrev=False,
        description="nnUNetv2_predict for a folder that mixes modalities: sorts the cases by modality (rules below) "
                    "and runs nnUNetv2_predict once per modality, with that modality's norms, into one output "
                    "folder. All options not listed here go to nnUNetv2_predict (-d, -c, -tr, -p, -f, "
                    "--save_probabilities, -chk, -device ...).",
        epilog="Modalities come from --modality/--csv, else the dataset's tagging rules "
               "(nnUNetv2_csa_tag_modalities), else the converters' naming <patient>_<modality>.")
    parser.add_argument("-i", required=True, help="folder of images in nnU-Net's layout (CASE_0000.nii.gz), "
                                                  "any mix of modalities")
    parser.add_argument("-o", required=True, help="output folder (as nnUNetv2_predict's -o)")
    parser.add_argument("--modality", nargs=2, action="append", default=[], metavar=("NAME", "REGEX"),
                        help="a modality and the regular expression its case names match in full; once per modality")
    parser.add_argument("--csv", help="CSV file with the columns case and modality, one line per input case")
    parser.add_argument("--dry-run", action="store_true", help="print which case is which modality; predict nothing")
    args, predict_options = parser.parse_known_args(argv)
    if args.modality and args.csv:
        parser.error("give --modality or --csv, not both")
    predict_mixed_folder(args.i, args.o, predict_options, args.modality, args.csv, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
