"""nnU-Net's epoch log with three more series: the consistency term of the training steps
and of the validation batches, and the pseudo Dice of each modality.

nnU-Net's progress.png stays exactly nnU-Net's; these series go to a small second figure,
``progress_modalities.png``, drawn from the log alone. (Re-reading and re-writing nnU-Net's
3000 x 5400 PNG every epoch cost 5-6 s per epoch on 2 CPU cores.)
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

CONSISTENCY_SERIES = ("train_consistency_losses", "val_consistency_losses")
PER_MODALITY_DICE = "mean_fg_dice_per_modality"
PROGRESS_FILE = "progress_modalities.png"


class ModalityAwareLocalLogger(LocalLogger):
    """``with_consistency``: the trainer logs the consistency series (not Joint). Every series
    of the log must get a value each epoch: nnU-Net's own plot counts the epochs as the
    shortest series."""

    def __init__(self, modalities, previous: LocalLogger, with_consistency: bool = True):
        super().__init__(previous.verbose)
        self.modalities = tuple(modalities)
        self.consistency_series = CONSISTENCY_SERIES if with_consistency else ()
        self.my_fantastic_logging = previous.my_fantastic_logging
        for key in (*self.consistency_series, PER_MODALITY_DICE):
            self.my_fantastic_logging.setdefault(key, [])

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        # a checkpoint of a plain nnU-Net run (or of an older release) lacks some series:
        # start them empty but aligned
        n_epochs = len(checkpoint.get("train_losses", []))
        for key in self.consistency_series:
            self.my_fantastic_logging.setdefault(key, [np.nan] * n_epochs)
        self.my_fantastic_logging.setdefault(PER_MODALITY_DICE, [[np.nan] * len(self.modalities)] * n_epochs)

    def plot_progress_png(self, output_folder):
        super().plot_progress_png(output_folder)
        log = self.my_fantastic_logging
        epochs = min(len(v) for v in log.values())
        # nnU-Net's plot leaves seaborn's style (font scale 2.5) behind: draw in matplotlib's own
        with plt.style.context("default"):
            self._plot_extra_series(epochs, os.path.join(output_folder, PROGRESS_FILE))

    def _plot_extra_series(self, epochs: int, path: str) -> None:
        log = self.my_fantastic_logging
        x = np.arange(epochs)
        fig, ax = plt.subplots(1, 1, figsize=(10, 4), dpi=80)
        ax.set_xlabel("epoch")
        if self.consistency_series:
            ax.plot(x, log["train_consistency_losses"][:epochs], color="m", label="consistency term (train steps)")
            ax.plot(x, log["val_consistency_losses"][:epochs], color="m", ls=":", marker=".",
                    label="consistency term (validation batches)")
            ax.set_ylabel("consistency term (unweighted)")
            ax.legend(loc="upper left", fontsize=8)
        else:
            ax.set_yticks([])  # Joint: no consistency term
        dice_axis = ax.twinx()
        dice = np.array(log[PER_MODALITY_DICE][:epochs], dtype=float).reshape(epochs, -1)
        for m, name in enumerate(self.modalities):
            dice_axis.plot(x, dice[:, m], ls="--", label=f"pseudo Dice {name}")
        dice_axis.set_ylabel("pseudo Dice per modality")
        dice_axis.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
