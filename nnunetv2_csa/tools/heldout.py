"""``nnUNetv2_csa_heldout``: a fold's held-out cases, one folder per modality, ready for
``nnUNetv2_predict`` (images with nnU-Net's ``_0000`` suffix) and ``nnUNetv2_csa_evaluate``
(labels under the case name)::

    nnUNetv2_csa_heldout -d 501 -f 0 -o heldout
    # heldout/LGE/images/patient003_LGE_0000.nii.gz, heldout/LGE/labels/patient003_LGE.nii.gz, ...
    nnUNet_csa_modality=LGE nnUNetv2_predict -d 501 -c 2d -f 0 -tr nnUNetTrainerCSA \\
        -i heldout/LGE/images -o pred_LGE -device cpu
    nnUNetv2_csa_evaluate -pred pred_LGE -ref heldout/LGE/labels -djfile $nnUNet_raw/Dataset501_X/dataset.json

The held-out cases are the fold's validation cases in ``splits_final.json`` and, for an
``--unpaired`` conversion, the other modality of the same patients (as the benchmark scores
them). Files are copied from the raw dataset; the output folder is written all or nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Sequence

from nnunetv2_csa.atomic_files import staging_folder
from nnunetv2_csa.errors import UserInputError, first_few, one_line_errors
from nnunetv2_csa.modality import modality_tags_from_dataset_json
from nnunetv2_csa.tools.commands import sigterm_unwinds
from nnunetv2_csa.image_files import check_file_complete
from nnunetv2_csa.tools.inputs import (channel_count, check_output_folder, dataset_folder, file_ending_of,
                                      integer_at_least, read_json_file, read_splits)


class HeldOutError(UserInputError, ValueError):
    """Bad request; the message names the file or folder and the fix."""


def write_held_out(dataset_id: str, fold: int, output_folder: str) -> dict[str, list[str]]:
    """Copy fold ``fold``'s held-out images and labels into ``output_folder``/<modality>/{images,labels};
    returns the cases per modality."""
    from nnunetv2_csa.tools.benchmark.scoring import fold_test_set

    raw = dataset_folder("nnUNet_raw", dataset_id, "convert the dataset with nnUNetv2_csa_convert_*")
    if not os.environ.get("nnUNet_preprocessed"):
        raise HeldOutError("nnUNet_preprocessed is not set: export it as for nnUNetv2_train")
    preprocessed = os.path.join(os.environ["nnUNet_preprocessed"], os.path.basename(raw))
    if os.path.exists(output_folder):
        raise HeldOutError(f"{output_folder} exists already; choose a new output folder")
    dataset_json = read_json_file(os.path.join(raw, "dataset.json"), "convert the dataset again")
    tags = modality_tags_from_dataset_json(dataset_json, os.path.join(raw, "dataset.json"))
    splits_file = os.path.join(preprocessed, "splits_final.json")
    if not os.path.isfile(splits_file):
        splits_file = os.path.join(raw, "splits_final.json")
    if not os.path.isfile(splits_file):
        raise HeldOutError(f"no splits_final.json in {preprocessed} or {raw}: convert with nnUNetv2_csa_convert_*")
    splits = read_splits(splits_file, "convert the dataset again, or tag it with nnUNetv2_csa_tag_modalities")
    if not 0 <= fold < len(splits):
        raise HeldOutError(f"fold {fold} is not in {splits_file} ({len(splits)} folds)")
    ending = file_ending_of(dataset_json, os.path.join(raw, "dataset.json"))
    validation = sorted(splits[fold]["val"])
    test_set = fold_test_set(validation, {c: tags.modality_of_case(c) for c in validation},
                             dataset_json.get("csa_case_patient", {}), os.path.join(raw, "labelsTr"), raw, ending)
    copies = _files_to_copy(test_set, raw, ending, channel_count(dataset_json, os.path.join(raw, "dataset.json")))
    parent = os.path.dirname(os.path.abspath(output_folder))
    if not os.path.isdir(parent):
        raise HeldOutError(f"the folder {parent} that -o {output_folder} would go into does not exist; create it first")
    check_output_folder(output_folder, "-o")
    for source, _ in copies:  # nnUNetv2_predict and nnUNetv2_csa_evaluate would stop on them later, with a traceback
        check_file_complete(source)
    staging = staging_folder(parent, os.path.basename(os.path.abspath(output_folder)))
    try:
        for source, target in copies:
            os.makedirs(os.path.dirname(os.path.join(staging, target)), exist_ok=True)
            shutil.copyfile(source, os.path.join(staging, target))
        os.chmod(staging, 0o755)
        os.replace(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    by_modality: dict[str, list[str]] = {}
    for case in test_set.cases:
        by_modality.setdefault(test_set.case_modality[case], []).append(case)
    return by_modality


def _files_to_copy(test_set, raw: str, ending: str, n_channels: int) -> list[tuple[str, str]]:
    """(source, path in the output folder) of every file to copy: each held-out case's image of every
    channel (_0000, _0001, ...: nnUNetv2_predict needs them all) and its label; a missing one is an
    error before anything is written."""
    copies = []
    for case in test_set.cases:
        modality = test_set.case_modality[case]
        first = test_set.other_modality_images.get(case, os.path.join(raw, "imagesTr", f"{case}_0000{ending}"))
        for channel in range(n_channels):
            name = f"{case}_{channel:04d}{ending}"
            copies.append((os.path.join(os.path.dirname(first), name), os.path.join(modality, "images", name)))
        copies.append((test_set.references[case], os.path.join(modality, "labels", f"{case}{ending}")))
    missing = [source for source, _ in copies if not os.path.isfile(source)]
    if missing:
        raise HeldOutError(f"{len(missing)} file(s) of the held-out cases are missing ({first_few(missing, 3)}); the "
                           f"dataset has {n_channels} channel(s) (channel_names of dataset.json), each case one image "
                           f"file per channel and a label: restore them, or convert the dataset again")
    return copies


@one_line_errors(ValueError, OSError)
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_heldout",
        description="Copy a fold's held-out cases (its validation cases and, for --unpaired conversions, the other "
                    "modality of the same patients) into one folder per modality: <out>/<modality>/images (inputs "
                    "for nnUNetv2_predict) and <out>/<modality>/labels (references for nnUNetv2_csa_evaluate).")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-f", type=integer_at_least(0), default=0, help="fold of splits_final.json (default 0)")
    parser.add_argument("-o", required=True, help="new output folder")
    args = parser.parse_args(argv)
    with sigterm_unwinds():  # a terminated run removes its staging folder too
        by_modality = write_held_out(args.d, args.f, args.o)
    for modality, cases in sorted(by_modality.items()):
        print(f"{modality}: {len(cases)} case(s) in {os.path.join(args.o, modality)}/images and /labels; predict with "
              f"nnUNet_csa_modality={modality} nnUNetv2_predict -i {os.path.join(args.o, modality, 'images')} ...")


if __name__ == "__main__":
    main()
