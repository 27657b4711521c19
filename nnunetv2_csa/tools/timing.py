"""Seconds per training iteration and peak memory of one nnU-Net trainer, measured in process.

The trainer is built the way ``nnUNetv2_train`` builds it (``get_trainer_from_args``),
``on_train_start()`` and ``on_train_epoch_start()`` run as in a real training (so the
dataloaders, augmentation and, for the CSA family, the consistency term are all live),
then a few warm-up ``train_step``s are followed by ``iterations`` timed ones. Each timed
iteration includes its data loading (``next(trainer.dataloader_train)``), as nnU-Net's
own training loop does.

Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` over the whole measurement (network,
  optimizer state, activations), reset before the trainer is built.
* CPU: the increase of the process' peak resident set size (``ru_maxrss``) over its value
  right before ``on_train_start()``. Augmentation workers (``nnUNet_n_proc_DA`` > 0) are
  separate processes and not counted. A high-water mark can only report growth beyond
  the peak reached before (e.g. while importing), so small trainers may read close to 0.

The trainer writes into a temporary ``nnUNet_results`` that is deleted afterwards: a timing
run never leaves a model folder that a later ``nnUNetv2_train`` or the benchmark could
mistake for a (finished or resumable) training.

``python -m nnunetv2_csa.tools.timing -d ID -tr NAME ...`` prints the result as one JSON line.
Run it in a fresh process per trainer: nnU-Net reads some settings (e.g. ``nnUNet_def_n_proc``)
at import time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Sequence

from nnunetv2_csa.tools.commands import environment

WARMUP_ITERATIONS = 2
EPOCH_END_REPEATS = 3


@contextlib.contextmanager
def _temporary_results_folder():
    # nnunetv2.paths reads nnUNet_results from the environment at each access
    folder = tempfile.mkdtemp(prefix="csa_timing_results_")
    try:
        with environment({"nnUNet_results": folder}):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _shut_down_augmenters(trainer) -> None:
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if isinstance(loader, (MultiThreadedAugmenter, NonDetMultiThreadedAugmenter)):
            # _finish prints a line per worker; keep stdout for the JSON result
            with contextlib.redirect_stdout(sys.stderr):
                loader._finish()
    trainer.dataloader_train = trainer.dataloader_val = None


def _epoch_end_seconds(trainer, first_epoch_outputs: list, repeats: int = EPOCH_END_REPEATS) -> list[float]:
    """Wall time of ``on_epoch_end`` (checkpoint, progress plots, log lines) after an epoch's
    bookkeeping (its training steps, one validation step): the per-epoch overhead a row adds
    besides its steps. The first epoch is the timed one; later ones run two training steps.
    At most ``num_epochs`` epochs (nnU-Net's learning-rate schedule ends there)."""
    import torch

    durations = []
    for repeat in range(max(1, min(repeats, trainer.num_epochs))):
        if repeat:
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
        else:
            outputs = first_epoch_outputs
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val))])
        start = time.perf_counter()
        trainer.on_epoch_end()
        durations.append(time.perf_counter() - start)
    return durations


def measure_step_time(dataset_id, configuration: str = "2d", plans: str = "nnUNetPlans",
                      trainer_name: str = "nnUNetTrainer", device: str = "cpu", iterations: int = 10,
                      fold: int = 0, warmup: int = WARMUP_ITERATIONS) -> dict:
    """Time ``iterations`` training iterations of ``trainer_name`` (data loading included).

    Returns a dict: trainer, device, iterations, warmup, batch_size, patch_size,
    seconds_per_iteration_median, seconds_per_iteration_mean, seconds_per_iteration (the list),
    peak_memory_bytes, peak_memory_kind ("cuda_max_memory_allocated" or "cpu_peak_rss_increase"),
    epoch_end_seconds_median and epoch_end_seconds (see :func:`_epoch_end_seconds`).
    Needs nnUNet_preprocessed (and nnUNet_extTrainer for this package's trainers) in the environment.
    """
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested, but torch sees no CUDA device")
    torch_device = torch.device(device)
    if device == "cpu":
        # what nnUNetv2_train does on CPU
        torch.set_num_threads(os.cpu_count() or 1)

    with _temporary_results_folder(), contextlib.redirect_stdout(sys.stderr):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = get_trainer_from_args(str(dataset_id), configuration, int(fold), trainer_name, plans,
                                        continue_training=False, device=torch_device)
        rss_before = _peak_rss_bytes()
        try:
            trainer.on_train_start()
            # network.train(), learning rate, and the consistency loss of the CSA family switched on
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(warmup)]
            durations = []
            for _ in range(iterations):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outputs.append(trainer.train_step(next(trainer.dataloader_train)))
                if device == "cuda":
                    torch.cuda.synchronize()
                durations.append(time.perf_counter() - start)
            epoch_end = _epoch_end_seconds(trainer, outputs)
            if device == "cuda":
                peak, kind = int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
            else:
                peak, kind = max(0, _peak_rss_bytes() - rss_before), "cpu_peak_rss_increase"
            result = {
                "trainer": trainer_name, "device": device, "iterations": iterations, "warmup": warmup,
                "batch_size": int(trainer.batch_size),
                "patch_size": [int(v) for v in trainer.configuration_manager.patch_size],
                "seconds_per_iteration_median": float(statistics.median(durations)),
                "seconds_per_iteration_mean": float(statistics.fmean(durations)),
                "seconds_per_iteration": [float(d) for d in durations],
                "peak_memory_bytes": peak, "peak_memory_kind": kind,
                "epoch_end_seconds_median": float(statistics.median(epoch_end)),
                "epoch_end_seconds": [float(t) for t in epoch_end],
            }
        finally:
            _shut_down_augmenters(trainer)
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m nnunetv2_csa.tools.timing",
        description="Seconds per training iteration (data loading included) and peak memory of one "
                    "nnU-Net trainer; prints one JSON line on stdout (nnU-Net's own output goes to stderr).")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer class name")
    parser.add_argument("-f", type=int, default=0, help="fold whose training cases are sampled (default 0)")
    parser.add_argument("-device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("-n", "--iterations", type=int, default=10, help="timed iterations (default 10)")
    parser.add_argument("--warmup", type=int, default=WARMUP_ITERATIONS,
                        help=f"untimed iterations first (default {WARMUP_ITERATIONS})")
    args = parser.parse_args(argv)
    result = measure_step_time(args.d, args.c, args.p, args.tr, args.device, args.iterations,
                               fold=args.f, warmup=args.warmup)
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
