"""Export one modality of a trained CSA-family model as a stock nnU-Net model folder.

The modality-specific norms of the chosen modality are folded into a plain network of
nnU-Net's own class, so plain nnU-Net (without this package) predicts it::

    nnUNetv2_csa_export_modality -m $nnUNet_results/Dataset501_X/nnUNetTrainerCSA__nnUNetPlans__2d \\
        --modality LGE -o exported_LGE
    nnUNetv2_predict_from_modelfolder -m exported_LGE -f 0 -i imgs -o out

Its predictions equal those of ``nnUNet_csa_modality=LGE nnUNetv2_predict ... -tr nnUNetTrainerCSA``.
"""
from __future__ import annotations

import argparse
import os
import shutil

from batchgenerators.utilities.file_and_folder_operations import join, save_json

from nnunetv2_csa.atomic_files import staging_folder
from nnunetv2_csa.errors import UserInputError, one_line_errors
from nnunetv2_csa.modality import MODALITIES_KEY, ModalityTagError, is_plain_name, modalities_from_plans
from nnunetv2_csa.tools.commands import sigterm_unwinds
from nnunetv2_csa.tools.inputs import check_output_folder, read_json_file

# torch, nnU-Net and the modules that need them are imported where they are used, so that
# `nnUNetv2_csa_export_modality --help` and argument errors answer at once


class ExportError(UserInputError, RuntimeError):
    pass


def _fold_folders(model_folder: str, folds) -> list[str]:
    if folds is None:
        folds = sorted(d.removeprefix("fold_") for d in os.listdir(model_folder)
                       if d.startswith("fold_") and os.path.isdir(join(model_folder, d)))
    if not folds:
        raise ExportError(f"{model_folder} has no fold_* folders: is it a trained nnU-Net model folder?")
    repeated = sorted({f for f in folds if list(folds).count(f) > 1})
    if repeated:
        raise ExportError(f"-f names fold(s) {' '.join(repeated)} more than once; name each fold once")
    missing = [f for f in folds if not os.path.isdir(join(model_folder, f"fold_{f}"))]
    if missing:
        raise ExportError(f"{model_folder} has no fold_{missing[0]} folder; -f takes the folds it holds")
    return [f"fold_{f}" for f in folds]


def _trainer_class(name: str):
    """The trainer class ``name``: this package's own trainers are found without
    ``nnUNet_extTrainer`` (the export knows them), others through nnU-Net's search."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import nnunetv2_csa.training.trainers as own_trainers

    found = getattr(own_trainers, name, None) or recursive_find_trainer_class_by_name(name)
    if found is None:
        raise ExportError(f"trainer {name} (named by the checkpoint) was found neither in nnunetv2_csa nor by "
                          f"nnU-Net's search; if it is a trainer of your own, add its folder to nnUNet_extTrainer")
    return found


def export_modality(model_folder: str, modality: str, output_folder: str, folds=None,
                    checkpoint_name: str = "checkpoint_final.pth", trust_checkpoint: bool = False) -> str:
    """Write a stock nnU-Net model folder for ``modality``; returns ``output_folder``.

    Checkpoints are read without executing code from them (``nnunetv2_csa.checkpoints``);
    ``trust_checkpoint`` lifts that for a file from a trusted source that holds more."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_csa.checkpoints import load_checkpoint
    from nnunetv2_csa.modality_norm import fold_modality
    from nnunetv2_csa.modality_order import without_modality_order

    plans_file = join(model_folder, "plans.json")
    if not os.path.isfile(plans_file):
        raise ExportError(f"{plans_file} does not exist: -m must be a trained model folder "
                          f"(…/DatasetXXX/<trainer>__<plans>__<configuration>)")
    if not is_plain_name(checkpoint_name, 255):
        raise ExportError(f"-chk {checkpoint_name!r} is not a file name (no folders, no '..'): give the name of the "
                          f"checkpoint file in each fold folder, e.g. checkpoint_best.pth")
    if os.path.exists(output_folder):
        raise ExportError(f"{output_folder} exists already; choose a new output folder")
    parent = os.path.dirname(os.path.abspath(output_folder))
    if not os.path.isdir(parent):
        raise ExportError(f"the folder {parent} that -o {output_folder} would go into does not exist; create it first")
    plans = read_json_file(plans_file, "is the model folder complete?")
    dataset_json = read_json_file(join(model_folder, "dataset.json"), "is the model folder complete?")
    modalities = modalities_from_plans(plans, plans_file)
    if modality not in modalities:
        raise ModalityTagError(f"unknown modality {modality!r}; {model_folder} knows {modalities}")
    plans_manager = PlansManager(plans)

    fold_folders = _fold_folders(model_folder, folds)
    check_output_folder(output_folder, "-o")
    staging = staging_folder(parent, os.path.basename(os.path.abspath(output_folder)))
    try:
        for fold in fold_folders:
            checkpoint_file = join(model_folder, fold, checkpoint_name)
            if not os.path.isfile(checkpoint_file):
                finished = [f.removeprefix("fold_") for f in fold_folders
                            if os.path.isfile(join(model_folder, f, checkpoint_name))]
                raise ExportError(f"{checkpoint_file} does not exist: train the fold to the end, pick another "
                                  f"checkpoint with -chk, or export the finished folds only"
                                  + (f" (-f {' '.join(finished)})" if finished else ""))
            checkpoint = load_checkpoint(checkpoint_file, trust=trust_checkpoint)
            missing = [k for k in ("trainer_name", "init_args", "network_weights") if k not in checkpoint]
            if missing or "configuration" not in checkpoint.get("init_args", {}):
                raise ExportError(f"{checkpoint_file} lacks {missing or ['init_args.configuration']}: it is not a "
                                  f"checkpoint written by nnU-Net's trainer")
            trainer_class = _trainer_class(checkpoint["trainer_name"])
            stock_trainer_name = getattr(trainer_class, "stock_trainer_name", None)
            if stock_trainer_name is None:
                raise ExportError(f"{checkpoint_file} was written by {checkpoint['trainer_name']}, which has no "
                                  f"modality-specific norms to fold: it already is a stock model")
            configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
            network = trainer_class.build_modality_network(
                plans_manager, configuration_manager,
                determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
                plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
                enable_deep_supervision=True)
            network.load_state_dict(checkpoint["network_weights"])
            plain = fold_modality(network, modalities.index(modality))
            stock_checkpoint = {
                "network_weights": without_modality_order(plain.state_dict()),
                "optimizer_state": None,
                "grad_scaler_state": None,
                "logging": checkpoint.get("logging"),
                "_best_ema": checkpoint.get("_best_ema"),
                "current_epoch": checkpoint["current_epoch"],
                "init_args": checkpoint["init_args"],
                "trainer_name": stock_trainer_name,
                "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
                "csa_exported_modality": modality,
            }
            os.makedirs(join(staging, fold))
            torch.save(stock_checkpoint, join(staging, fold, checkpoint_name))
        exported_plans = {k: v for k, v in plans.items() if k != MODALITIES_KEY}
        save_json(exported_plans, join(staging, "plans.json"), sort_keys=False)
        save_json(dataset_json, join(staging, "dataset.json"), sort_keys=False)
        fingerprint = join(model_folder, "dataset_fingerprint.json")
        if os.path.isfile(fingerprint):
            shutil.copyfile(fingerprint, join(staging, "dataset_fingerprint.json"))
        os.replace(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_folder


@one_line_errors()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_export_modality",
        description="Export one modality of a trained nnunetv2_csa model (modality-specific norms) as a stock "
                    "nnU-Net model folder, predictable with nnUNetv2_predict_from_modelfolder without this package.")
    parser.add_argument("-m", "--model-folder", required=True,
                        help="trained model folder, e.g. $nnUNet_results/Dataset501_X/nnUNetTrainerCSA__nnUNetPlans__2d")
    parser.add_argument("--modality", required=True, help="modality name as in the model's plans.json")
    parser.add_argument("-o", "--output", required=True, help="new folder for the exported model")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="folds to export (default: all present)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name in each fold folder (default checkpoint_final.pth)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoints with full pickle (can run code from the file): only for files from "
                             "a source you trust that hold more than an nnU-Net checkpoint does")
    args = parser.parse_args(argv)
    with sigterm_unwinds():  # a terminated run removes its staging folder too
        out = export_modality(args.model_folder, args.modality, args.output, args.folds, args.checkpoint,
                              trust_checkpoint=args.trust_checkpoint)
    folds = sorted(d.removeprefix("fold_") for d in os.listdir(out) if d.startswith("fold_"))
    print(f"exported modality {args.modality} (fold(s) {', '.join(folds)}) to {out}; predict it with "
          f"nnUNetv2_predict_from_modelfolder -m {out} -f {' '.join(folds)} -i INPUT -o OUTPUT")


if __name__ == "__main__":
    main()
