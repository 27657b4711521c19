"""The folder that nnU-Net's ``nnUNet_extTrainer`` variable points at.

nnU-Net imports every module of this folder as a top-level module and looks for the
trainer name in it; relative imports fail there, so the shim imports absolutely.
"""
import os

TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))


def print_trainer_dir(argv=None) -> None:
    """``export nnUNet_extTrainer=$(nnUNetv2_csa_trainer_dir)``"""
    import argparse

    argparse.ArgumentParser(
        prog="nnUNetv2_csa_trainer_dir",
        description="Prints the folder of this package's trainers, for nnU-Net's nnUNet_extTrainer variable: "
                    "export nnUNet_extTrainer=$(nnUNetv2_csa_trainer_dir)").parse_args(argv)
    print(TRAINER_DIR)
