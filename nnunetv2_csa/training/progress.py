"""nnU-Net's epoch log with two more series: the consistency term and the pseudo Dice of
each modality. progress.png keeps nnU-Net's panels and gains one panel for these."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

EXTRA_SERIES = ("train_consistency_losses", "mean_fg_dice_per_modality")


class ModalityAwareLocalLogger(LocalLogger):
    def __init__(self, modalities, previous: LocalLogger):
        super().__init__(previous.verbose)
        self.modalities = tuple(modalities)
        self.my_fantastic_logging = previous.my_fantastic_logging
        for key in EXTRA_SERIES:
            self.my_fantastic_logging.setdefault(key, [])

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        # a checkpoint of a plain nnU-Net run has no such series: start them empty but aligned
        n_epochs = len(checkpoint.get("train_losses", []))
        for key in EXTRA_SERIES:
            self.my_fantastic_logging.setdefault(key, [np.nan] * n_epochs if key == EXTRA_SERIES[0]
                                                 else [[np.nan] * len(self.modalities)] * n_epochs)

    def plot_progress_png(self, output_folder):
        super().plot_progress_png(output_folder)
        stock_png = os.path.join(output_folder, "progress.png")
        stock = plt.imread(stock_png)
        log = self.my_fantastic_logging
        epochs = min(len(v) for v in log.values())
        x = list(range(epochs))

        height_px, width_px = stock.shape[:2]
        dpi = 100
        fig, ax = plt.subplots(1, 1, figsize=(width_px / dpi, height_px / 3 / dpi), dpi=dpi)
        ax.plot(x, log["train_consistency_losses"][:epochs], color="m", lw=4, label="consistency term (train)")
        ax.set_xlabel("epoch", fontsize=30)
        ax.set_ylabel("consistency term", fontsize=30)
        ax.tick_params(labelsize=24)
        ax2 = ax.twinx()
        dice = np.array(log["mean_fg_dice_per_modality"][:epochs], dtype=float).reshape(epochs, -1)
        for m, name in enumerate(self.modalities):
            ax2.plot(x, dice[:, m], lw=4, ls="--", label=f"pseudo dice {name}")
        ax2.set_ylabel("pseudo dice per modality", fontsize=30)
        ax2.tick_params(labelsize=24)
        ax.legend(loc=(0, 1), fontsize=26)
        ax2.legend(loc=(0.35, 1), fontsize=26, ncol=len(self.modalities))
        fig.tight_layout()
        fig.canvas.draw()
        panel = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float32) / 255.0
        plt.close(fig)

        panel = panel[:, :width_px, : stock.shape[2]]
        if panel.shape[1] < width_px:
            pad = np.ones((panel.shape[0], width_px - panel.shape[1], panel.shape[2]), dtype=panel.dtype)
            panel = np.concatenate([panel, pad], axis=1)
        plt.imsave(stock_png, np.concatenate([stock, panel], axis=0))
