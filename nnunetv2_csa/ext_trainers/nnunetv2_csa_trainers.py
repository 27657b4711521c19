# Shim for nnU-Net's nnUNet_extTrainer lookup: hands back the real classes (absolute import).
from nnunetv2_csa.training import trainers as _trainers
from nnunetv2_csa.training.trainers import *  # noqa: F401,F403


def __getattr__(name: str):
    # short budgets are made on demand (training/trainers.py); nnU-Net's search asks with hasattr
    return getattr(_trainers, name)
