"""Segmenting a folder with nnU-Net's own predictor in the calling process.

The tools that predict many small folders (the benchmark's other-modality cases, the GPU
check's export comparison) pay one import of nnU-Net instead of a ``nnUNetv2_predict``
process, with its spawned worker pools and their imports, per folder. The predictor, its
settings and its output files are those of ``nnUNetv2_predict``; the command itself is
tested with this package's trainers in tests/test_trainer_integration.py and the README's
workflow test.
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback

from nnunetv2_csa.tools.commands import environment


def predict_folder(model_folder: str, fold: int | tuple, input_folder: str, output_folder: str, device: str,
                   overrides: dict, log, save_probabilities: bool = False) -> str | None:
    """Segments every image of ``input_folder`` into ``output_folder`` with nnU-Net's own
    predictor at ``nnUNetv2_predict``'s defaults (step 0.5, Gaussian weighting, mirroring,
    checkpoint_final.pth). ``fold``: one fold, or a tuple of folds (their ensemble, as ``-f 0 1
    2 3 4``). ``overrides``: environment variables for the call (None: unset), those nnU-Net
    reads when it finds the trainer (nnUNet_extTrainer) and the trainer reads when it builds
    the network (nnUNet_csa_modality). Returns None, or the error (one line),
    whose traceback goes to the open text file ``log`` with the predictor's output."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    log.write(f"===== {time.strftime('%Y-%m-%dT%H:%M:%S')} nnUNetPredictor: {model_folder} fold {fold}, "
              f"{input_folder} -> {output_folder}, device {device}, {overrides}\n")
    log.flush()
    try:
        with environment(overrides), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            predictor = nnUNetPredictor(device=torch.device(device), verbose=False, allow_tqdm=False)
            folds = tuple(fold) if isinstance(fold, (tuple, list)) else (fold,)
            predictor.initialize_from_trained_model_folder(model_folder, folds, "checkpoint_final.pth")
            os.makedirs(output_folder, exist_ok=True)
            predictor.predict_from_files_sequential(input_folder, output_folder, save_probabilities=save_probabilities,
                                                    overwrite=True)
    except Exception as e:  # noqa: BLE001 - the caller reports it (the benchmark fails the row, the others go on)
        traceback.print_exc(file=log)
        message = str(e).strip().splitlines()
        return f"{type(e).__name__}: {message[0] if message else ''}"[:300]
    return None
