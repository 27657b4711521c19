# Shim for nnU-Net's nnUNet_extTrainer lookup: hands back the real classes (absolute import).
from nnunetv2_csa.training.trainers import *  # noqa: F401,F403
