"""The CSA term of one process with a batch of B against two DDP ranks with B/2 each, on the
same samples (documentation/gpus.md, "Several GPUs").

Under ``-num_gpus 2`` each rank computes the term on its own share of the batch: each
modality's affinity matrix is the mean over that rank's samples of the modality, and the
term compares those means. With half the samples per mean, the means are noisier, and the
squared difference of two noisy means is larger on average (its expectation grows by the
means' variances). This script draws batches from a trained model's own unpaired loader,
taps the two layers in one forward pass (the per-sample InstanceNorm makes a sample's
features independent of its batch, so slicing the features equals a rank's forward pass;
the ``_BN`` rows' batch statistics would differ), and computes the term on the whole batch
and on the two halves a 2-rank split gives (each modality's block split in two)::

    python scripts/csa_term_per_rank.py -m $nnUNet_results/Dataset993_X/nnUNetTrainerCSA__nnUNetPlans__2d \\
        -f 0 --batches 50

needs ``nnUNet_preprocessed`` (the loader reads the preprocessed data), ``nnUNet_n_proc_DA=0``
(the loader in this process) and, for a trainer of the test suite, ``nnUNet_extTrainer``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics


def _halves(modality):
    """Indices of two rank batches: each modality's samples split in two, as two ranks drawing
    B/2 with B/4 of each modality would hold them."""
    import torch

    first, second = [], []
    for value in torch.unique(modality).tolist():
        block = torch.nonzero(modality == value).flatten().tolist()
        first += block[:len(block) // 2]
        second += block[len(block) // 2:]
    return torch.tensor(first), torch.tensor(second)


def measure(model_folder: str, fold: int, batches: int) -> dict:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_csa.checkpoints import load_checkpoint
    from nnunetv2_csa.modality_norm import set_modality

    checkpoint = load_checkpoint(os.path.join(model_folder, f"fold_{fold}", "checkpoint_final.pth"))
    with open(os.path.join(model_folder, "plans.json")) as f:
        plans = json.load(f)
    # the trainer as nnUNetv2_train builds it (plans and data from nnUNet_preprocessed)
    trainer = get_trainer_from_args(plans["dataset_name"], checkpoint["init_args"]["configuration"], fold,
                                    checkpoint["trainer_name"], plans["plans_name"], device=torch.device("cpu"))
    trainer.initialize()
    trainer.network.load_state_dict(checkpoint["network_weights"])
    trainer.network.eval()
    loader, _ = trainer.get_dataloaders()
    whole, split = [], []
    with torch.no_grad():
        for _ in range(batches):
            batch = next(loader)
            modality = batch["modality"]
            set_modality(trainer.network, modality)
            trainer.network(batch["data"])
            features_l, features_k = trainer.feature_tap.features()
            trainer.feature_tap.clear()
            target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
            whole.append(float(trainer.consistency_term(features_l, features_k, target, modality)))
            ranks = [float(trainer.consistency_term(features_l[i], features_k[i], target[i], modality[i]))
                     for i in _halves(modality)]
            split.append(statistics.mean(ranks))
    ratios = [s / w for s, w in zip(split, whole) if w > 0]
    return {"model": model_folder, "fold": fold, "batch": int(len(batch["modality"])), "batches": batches,
            "term_one_process_mean": statistics.mean(whole), "term_two_ranks_mean": statistics.mean(split),
            "ratio_of_means": statistics.mean(split) / statistics.mean(whole),
            "ratio_median": statistics.median(ratios)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", required=True, help="trained model folder of a CSA-family trainer")
    parser.add_argument("-f", type=int, default=0, help="fold (default 0)")
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.m, args.f, args.batches), indent=1))


if __name__ == "__main__":
    main()
