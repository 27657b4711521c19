"""nnU-Net's multi-GPU path (``-num_gpus``) with this package's trainers, simulated on CPU:
2 and 3 processes with the gloo backend, each running nnU-Net's ``run_ddp`` flow
(tests/ddp_worker.py says what CPU changes). A hang fails within the collectives' timeout."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (TINY_DATASET_ID, VOLUME_DATASET_ID, plans_variant, predict_in_process, read_labels,
                      run_command, with_test_trainers)

pytestmark = pytest.mark.integration

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
#: the whole run's limit; every collective has its own, shorter one (NNUNETV2_CSA_DDP_TIMEOUT, 60 s)
RUN_TIMEOUT_S = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plans_with_global_batch(env: dict, dataset_name: str, batch_size: int, source: str = "nnUNetPlans",
                            configuration: str = "2d") -> str:
    """A copy of a dataset's plans ``source`` with another global batch size, an eighth of its
    width (the flow under test is DDP's, not the arithmetic's: three ranks of a full-width network on
    two cores cost the suite time); returns its name. nnU-Net's batch Dice all-gathers per-sample
    sums, which fails (gloo: "Received data size doesn't match") when the ranks' batches differ in
    size: the global batch must be a multiple of the number of GPUs."""
    return plans_variant(env, dataset_name, f"{source}GlobalBatch{batch_size}", batch_size=batch_size, source=source,
                         configuration_name=configuration, width_divisor=8)


RESENC_PLANS = "nnUNetResEncUNetMPlans"
#: the base plans of the 3d_fullres run: nnU-Net's default plans of the session's 3D dataset
THREE_D = "nnUNetPlans 3d_fullres"


def _residual_encoder_plans(env: dict, dataset_name: str) -> None:
    """nnU-Net's residual-encoder M preset for the tiny dataset, planned and preprocessed once."""
    if not (Path(env["nnUNet_preprocessed"]) / dataset_name / f"{RESENC_PLANS}.json").is_file():
        run_command(["nnUNetv2_plan_experiment", "-d", str(TINY_DATASET_ID), "-pl", "nnUNetPlannerResEncM"], env)
    run_command(["nnUNetv2_preprocess", "-d", str(TINY_DATASET_ID), "-plans_name", RESENC_PLANS, "-c", "2d",
                 "-np", "1"], env)


def run_ddp_on_cpu(env: dict, trainer: str, plans: str, world_size: int, out, mode: str = "train",
                   check: bool = True, dataset_id: int = TINY_DATASET_ID,
                   configuration: str = "2d") -> list[subprocess.Popen]:
    """The trainer in ``world_size`` processes; returns them, finished (a hang kills them all and fails)."""
    port = _free_port()
    env = dict(env, nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    logs = [open(out / f"rank{rank}_{mode}.log", "w") for rank in range(world_size)]
    processes = [subprocess.Popen([sys.executable, WORKER, str(rank), str(world_size), str(port), trainer,
                                   str(dataset_id), plans, str(out), mode, configuration], env=env, stdout=logs[rank],
                                  stderr=subprocess.STDOUT) for rank in range(world_size)]
    try:
        for process in processes:
            process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"{trainer} in {world_size} processes did not finish in {RUN_TIMEOUT_S} s (a hang)")
    finally:
        for log in logs:
            log.close()
    failed = [rank for rank, p in enumerate(processes) if p.returncode != 0]
    assert not check or not failed, "\n".join(f"--- rank {r}\n{(out / f'rank{r}_{mode}.log').read_text()[-4000:]}"
                                              for r in failed)
    return processes


def _ddp_environment(dataset, tmp_path):
    env, dataset_name = dataset[:2]
    results = tmp_path / "nnUNet_results"
    out = tmp_path / "ranks"
    out.mkdir()
    return dict(with_test_trainers(env), nnUNet_results=str(results)), dataset_name, results, out


@pytest.fixture
def ddp_results(tiny_preprocessed_dataset, tmp_path):
    return _ddp_environment(tiny_preprocessed_dataset, tmp_path)


def _single_process_predictions_equal_the_final_validation(env, dataset_name, model, cases, validation, out):
    """The checkpoint of the multi-process run, predicted by nnU-Net's predictor in one process told each
    case's modality, equals what the ranks' final validation wrote; told the other modality, its
    probabilities differ."""
    import shutil
    raw = json.loads((Path(env["nnUNet_raw"]) / dataset_name / "dataset.json").read_text())
    for case in cases:
        images = out / f"images_{case}"
        images.mkdir()
        shutil.copy(Path(env["nnUNet_raw"]) / dataset_name / "imagesTr" / f"{case}_0000.nii.gz", images)
        modality = raw["csa_case_modality"][case]
        probabilities = predict_in_process(env, model.parent, images, out / f"predicted_{case}", modality,
                                           probabilities=True)
        predicted = read_labels(str(out / f"predicted_{case}"))
        np.testing.assert_array_equal(predicted[f"{case}.nii.gz"], validation[f"{case}.nii.gz"], err_msg=case)
        other = next(m for m in raw["csa_modalities"] if m != modality)
        misrouted = predict_in_process(env, model.parent, images, out / f"misrouted_{case}", other,
                                       probabilities=True)
        # probabilities, not labels: two epochs of 3d_fullres may segment nothing but background either way
        difference = np.abs(misrouted[f"{case}.npz"] - probabilities[f"{case}.npz"]).max()
        assert difference > 0.01, (case, difference)


#: in the suite (10 minutes for all of it); NNUNETV2_CSA_DDP_ALL=1 (make test-ddp) adds every other row in 2
#: and 3 processes, and CSA on nnU-Net's residual-encoder preset and in 3d_fullres (the MM-WHS phantom)
IN_THE_SUITE = [("Joint", 2, "nnUNetPlans"), ("CSA", 3, "nnUNetPlans")]
ON_REQUEST = [(row, world_size, "nnUNetPlans") for world_size in (2, 3)
              for row in ("Single", "Joint", "MSBN", "Affinity", "UMMKD", "CSA", "CSA_BN")
              if (row, world_size, "nnUNetPlans") not in IN_THE_SUITE] + [("CSA", 2, RESENC_PLANS),
                                                                          ("CSA", 2, THREE_D)]
ROWS = IN_THE_SUITE + (ON_REQUEST if os.environ.get("NNUNETV2_CSA_DDP_ALL") == "1" else [])
UNPAIRED_ROWS = ("MSBN", "Affinity", "UMMKD", "CSA", "CSA_BN")


@pytest.mark.parametrize("row, world_size, base_plans", ROWS)
def test_ddp_trains_validates_and_agrees_on_every_rank(request, tmp_path, row, world_size, base_plans):
    configuration, dataset_id = ("3d_fullres", VOLUME_DATASET_ID) if base_plans == THREE_D else ("2d", TINY_DATASET_ID)
    dataset = request.getfixturevalue("coronal_volume_dataset" if configuration == "3d_fullres"
                                      else "tiny_preprocessed_dataset")
    env, dataset_name, results, out = _ddp_environment(dataset, tmp_path)
    base_plans = base_plans.split()[0]
    # CSA: the variant whose modalities' norms start apart (tests/ext_trainers), so that a case the final
    # validation gave the other modality's norms would differ from the single-process prediction below
    trainer = {"CSA": "nnUNetTrainerCSA_2epochs_5its_DistinctNorms",
               "Single": "nnUNetTrainerSingleModality0_2epochs_5its"}.get(row, f"nnUNetTrainer{row}_2epochs_5its")
    global_batch = 4 * world_size
    if base_plans == RESENC_PLANS:
        _residual_encoder_plans(env, dataset_name)
    plans = plans_with_global_batch(env, dataset_name, global_batch, base_plans, configuration)
    run_ddp_on_cpu(env, trainer, plans, world_size, out, dataset_id=dataset_id, configuration=configuration)

    states = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    for key, value in states[0].items():
        for rank in range(1, world_size):
            assert torch.equal(value, states[rank][key]), f"{key} differs between rank 0 and rank {rank}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert [r["batch_size"] for r in ranks] == [4] * world_size  # the plan's global batch, split by nnU-Net
    if row in UNPAIRED_ROWS:  # the unpaired sampler: every rank's batch holds every modality at every step
        assert all(sorted(set(b)) == [0, 1] for r in ranks for b in r["batch_modalities"])
        assert all(len(r["batch_modalities"]) == 10 for r in ranks)

    model = results / dataset_name / f"{trainer}__{plans}__{configuration}" / "fold_0"
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / dataset_name / "splits_final.json").read_text())
    validation = read_labels(str(model / "validation"))
    cases = splits[0]["val"]
    if row == "Single":  # nnU-Net's trainer on the first modality's cases of the fold
        modalities = json.loads((Path(env["nnUNet_raw"]) / dataset_name / "dataset.json").read_text())
        cases = [c for c in cases if modalities["csa_case_modality"][c] == modalities["csa_modalities"][0]]
    assert sorted(validation) == sorted(f"{case}.nii.gz" for case in cases)
    assert (model / "checkpoint_final.pth").is_file()
    if row == "CSA":
        _single_process_predictions_equal_the_final_validation(env, dataset_name, model, splits[0]["val"],
                                                               validation, out)
    if world_size > len(splits[0]["val"]):
        # `nnUNetv2_train ... --val`: no training forward before the final validation, and a rank without a
        # validation case never calls the network (a buffer of the network would be broadcast to it: a hang)
        for case in validation:
            os.remove(model / "validation" / case)
        run_ddp_on_cpu(env, trainer, plans, world_size, out, mode="val", dataset_id=dataset_id,
                       configuration=configuration)
        assert read_labels(str(model / "validation")).keys() == validation.keys()


def test_ddp_refuses_a_batch_that_cannot_hold_every_modality_on_every_rank_before_training(ddp_results):
    # more cases (a batch of 1 on 2 GPUs, 3 modalities): tests/test_trainer_units.py, without processes
    global_batch, per_rank = 3, [2, 1]
    env, dataset_name, results, out = ddp_results
    plans = plans_with_global_batch(env, dataset_name, global_batch)
    processes = run_ddp_on_cpu(env, "nnUNetTrainerCSA_2epochs_5its", plans, 2, out, check=False)
    for rank, process in enumerate(processes):
        log = (out / f"rank{rank}_train.log").read_text()
        assert process.returncode != 0, log[-2000:]
        # every rank says the same, before nnU-Net's own split (whose assertion a batch of 1 would otherwise hit)
        assert (f"batch size {global_batch} over 2 GPUs gives {per_rank} per GPU, but every GPU's unpaired batch "
                f"needs at least one sample of each modality (2: ['LGE', 'C0']). Plan a batch size of at least 4") \
            in log, log[-2000:]
        assert "Epoch 0" not in log


def test_the_final_validation_skips_ddps_buffer_broadcast_and_restores_it():
    # the mechanism behind the _BN rows' --val in 3 processes (ON_REQUEST): in one gloo process, DDP
    # would broadcast a BatchNorm network's buffers at its next forward; inside the final validation's
    # context it does not, and afterwards it does again. Fails loudly if torch renames the switch.
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nnunetv2_csa.training.per_modality_validation import _no_buffer_sync_in_forward

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        network = DistributedDataParallel(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))
        assert network.will_sync_module_buffers()
        with _no_buffer_sync_in_forward(network):
            assert not network.will_sync_module_buffers()
        assert network.will_sync_module_buffers()
        plain = torch.nn.BatchNorm2d(2)
        with _no_buffer_sync_in_forward(plain):  # one process: nothing to switch
            pass
    finally:
        dist.destroy_process_group()
