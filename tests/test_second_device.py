"""Every network a user's command makes, moved to a second device (``"meta"``, tests/second_device.py)
after being built exactly as nnU-Net builds it, keeps every tensor on that device; the training step of
the CSA rows reads the device back no more often than nnU-Net's own (Joint's).

Covered: ``nnUNetv2_predict``'s network (nnU-Net's own ``initialize_from_trained_model_folder`` and
sliding window, results on the device as on a GPU) for each row family, IN and BN, 2d, 3d_fullres and
ResEnc; ``nnUNetv2_csa_predict`` runs that same predictor once per modality (``nnUNet_csa_modality``),
so it is covered with it; the trainer's training step (forward, consistency term, backward, optimizer)
and its validation sub-batches; the final validation's per-case routing; the export's folded network;
the loss modules. Not covered: nnU-Net's ``.cpu().numpy()`` at the end of each step and prediction,
which the dispatch mode answers with zeros (counted as host reads), and whatever needs real data on
the device (values, autocast: documentation/gpus.md).
"""
import copy
import json
import os

import pytest
import torch

from nnunetv2_csa.ext_trainers import TRAINER_DIR
from nnunetv2_csa.losses import AffinityLoss, ClassSpecificAffinityLoss, UnpairedKnowledgeDistillationLoss
from nnunetv2_csa.modality_norm import fold_modality, set_modality
from nnunetv2_csa.training.inference_modality import INFERENCE_MODALITY_ENV
from nnunetv2_csa.training.per_modality_validation import CaseRouting
from second_device import DEVICE, SecondDevice, assert_one_device
from conftest import TINY_DATASET_JSON
from test_method_wiring import _batch
from test_trainer_units import _plans

MODALITIES = ("LGE", "C0")
DATASET_JSON = {**TINY_DATASET_JSON, "csa_modalities": list(MODALITIES),
                "csa_case_modality": {"p1_LGE": "LGE", "p2_C0": "C0", "p3_LGE": "LGE", "p4_C0": "C0"}}


def _configurations() -> dict:
    """The tiny plan's 2d configuration, and a 3d_fullres and a residual-encoder (ResEnc) one built from it."""
    two_d = _plans(MODALITIES).plans["configurations"]["2d"]
    three_d = copy.deepcopy(two_d)
    three_d["patch_size"] = [16, 32, 32]
    three_d["spacing"] = [1, 1, 1]
    arch = three_d["architecture"]["arch_kwargs"]
    arch.update(conv_op="torch.nn.modules.conv.Conv3d", norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    resenc = copy.deepcopy(two_d)
    resenc["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch = resenc["architecture"]["arch_kwargs"]
    arch["n_blocks_per_stage"] = [1, 2, 2, 2]
    del arch["n_conv_per_stage"]
    return {"2d": two_d, "3d_fullres": three_d, "2d_resenc": resenc}


def _model_folder(folder, trainer_name: str, configuration: str, monkeypatch) -> str:
    """A model folder as nnUNetv2_train leaves it (plans.json, dataset.json, fold_0's checkpoint) for
    ``trainer_name``, with weights of the network its trainer class builds."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _plans(MODALITIES).plans
    plans["configurations"] = _configurations()
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, 1, 4, False)
    os.makedirs(folder / "fold_0")
    for name, content in (("plans.json", plans), ("dataset.json", DATASET_JSON)):
        (folder / name).write_text(json.dumps(content))
    torch.save({"trainer_name": trainer_name, "init_args": {"configuration": configuration},
                "network_weights": network.state_dict(), "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    return str(folder)


PREDICTED = [(row, "2d") for row in ("nnUNetTrainerCSA", "nnUNetTrainerCSA_BN", "nnUNetTrainerMSBN",
                                     "nnUNetTrainerUMMKD", "nnUNetTrainerJoint", "nnUNetTrainerJoint_BN",
                                     "nnUNetTrainerSingleModality1")] + \
            [(row, c) for c in ("3d_fullres", "2d_resenc") for row in ("nnUNetTrainerCSA", "nnUNetTrainerCSA_BN")]


@pytest.mark.parametrize("trainer_name, configuration", PREDICTED)
def test_nnunetv2_predicts_every_row_on_the_device_it_moves_the_network_to(trainer_name, configuration, tmp_path,
                                                                           monkeypatch, capsys):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    monkeypatch.setenv(INFERENCE_MODALITY_ENV, "C0")
    folder = _model_folder(tmp_path / "model", trainer_name, configuration, monkeypatch)
    predictor = nnUNetPredictor(device=DEVICE, allow_tqdm=False)
    # nnU-Net keeps the results on a GPU (it allows that for CUDA only): as on a GPU
    predictor.perform_everything_on_device = True
    # as nnUNetv2_predict: the network is built (and routed) on the CPU, moved by the sliding window
    predictor.initialize_from_trained_model_folder(folder, (0,))
    # one patch: a meta forward pass under the dispatch mode costs about as much as a real one
    image = torch.zeros(1, 16, 32, 32) if configuration == "3d_fullres" else torch.zeros(1, 1, 32, 32)
    with SecondDevice() as device:
        logits = predictor.predict_sliding_window_return_logits(image)
    assert next(predictor.network.parameters()).device == DEVICE and logits.device == DEVICE
    assert_one_device(device)
    # nnU-Net answers any RuntimeError on the device by predicting again with the results on the CPU
    assert "unsuccessful" not in capsys.readouterr().out


def test_the_routing_follows_every_move_of_the_network(initialized_trainer):
    # the negative control of the checks above: a network routed on the CPU, then moved, as nnU-Net's
    # predictor does; and half precision and the move back keep the index an integer on the device
    trainer = initialized_trainer("nnUNetTrainerCSA")
    network = trainer.network
    set_modality(network, torch.tensor([1, 0, 1, 0]))
    norm = network.encoder.stages[0][0].convs[0].norm
    network.to(DEVICE)
    assert norm._sample_modality.device == DEVICE and norm._routing.sort_order.device == DEVICE
    network.half()
    assert norm._sample_modality.dtype == torch.long
    with SecondDevice() as device:
        network(torch.zeros(4, 1, 32, 32, device=DEVICE, dtype=torch.half))
    assert_one_device(device)


# ---------------------------------------------------------------- the trainer
NNUNET_STEP_HOST_READS = {"copy to host": 1}
TRAINED = ("nnUNetTrainerJoint", "nnUNetTrainerMSBN", "nnUNetTrainerCSA", "nnUNetTrainerAffinity",
           "nnUNetTrainerUMMKD", "nnUNetTrainerCSA_BN", "nnUNetTrainerCSA_RampUp")


def _training_step_on_the_device(initialized_trainer, trainer_name: str, **plans_changes):
    trainer = initialized_trainer(trainer_name, device="meta", **plans_changes)
    trainer.on_train_epoch_start()
    with SecondDevice() as device:
        result = trainer.train_step(_batch())
    return trainer, device, result


@pytest.mark.parametrize("trainer_name", TRAINED)
def test_training_step_stays_on_the_device_and_reads_the_host_as_often_as_nnunets(initialized_trainer,
                                                                                 trainer_name):
    trainer, device, result = _training_step_on_the_device(initialized_trainer, trainer_name)
    assert_one_device(device)
    # what nnU-Net's own step (Joint's, the first parameter) reads: its loss, once, at its end
    assert device.host_reads == NNUNET_STEP_HOST_READS, device.host_reads
    if getattr(trainer.loss, "weight", 0) > 0:  # not Joint, MSBN, nor CSA_RampUp's first epoch (weight 0)
        # the term was computed, and is kept on the device until the epoch's end
        assert isinstance(result["consistency_loss"], torch.Tensor) and result["consistency_loss"].device == DEVICE


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d_resenc"])
def test_csa_training_step_stays_on_the_device_in_3d_and_resenc(initialized_trainer, configuration):
    # the fixture trains its configuration "2d"; here that name holds the 3d or ResEnc network
    changes = {"configurations": {"2d": _configurations()[configuration]}}
    trainer = initialized_trainer("nnUNetTrainerCSA", device="meta", **changes)
    trainer.on_train_epoch_start()
    batch = _batch()
    if configuration == "3d_fullres":
        batch["data"] = batch["data"][:, :, None].expand(-1, -1, 16, -1, -1)
        batch["target"] = [t[:, :, None].expand(-1, -1, d, -1, -1) for t, d in zip(batch["target"], (16, 16, 8))]
    with SecondDevice() as device:
        trainer.train_step(batch)
    assert_one_device(device)
    assert device.host_reads == NNUNET_STEP_HOST_READS


def test_validation_sub_batches_and_case_routing_stay_on_the_device(initialized_trainer):
    trainer = initialized_trainer("nnUNetTrainerCSA", device="meta")
    trainer.on_validation_epoch_start()
    with SecondDevice() as device:
        trainer.validation_step(_batch())
        # the final validation routes the network to each case's modality as nnU-Net loads it
        routing = CaseRouting(trainer)
        routing.loaded("p2_C0")
        routing.before_forward(trainer.network, ())
        trainer.network(torch.zeros(1, 1, 32, 32, device=DEVICE))
    assert_one_device(device)


def test_exported_network_predicts_on_the_device(initialized_trainer):
    trainer = initialized_trainer("nnUNetTrainerCSA")
    set_modality(trainer.network, 1)
    plain = fold_modality(trainer.network, 1).to(DEVICE)
    with SecondDevice() as device:
        plain(torch.zeros(2, 1, 32, 32, device=DEVICE))
    assert_one_device(device)


# ---------------------------------------------------------------- the losses
def _loss_inputs():
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(4, 8, 8, 8, generator=generator).to(DEVICE).requires_grad_() for _ in range(2)]
    labels = torch.randint(0, 4, (4, 1, 32, 32), generator=generator).to(DEVICE)
    return features, labels, torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("loss", [ClassSpecificAffinityLoss(4), AffinityLoss(4), UnpairedKnowledgeDistillationLoss(4)],
                         ids=["CSA", "Affinity", "UMMKD"])
def test_consistency_losses_stay_on_the_device_and_read_nothing_back_for_a_host_modality(loss):
    (features_l, features_k), labels, modality = _loss_inputs()
    loss = loss.to(DEVICE)
    with SecondDevice() as device:
        if isinstance(loss, UnpairedKnowledgeDistillationLoss):
            value = loss(features_l[:, :4], labels, modality)
        else:
            value = loss(features_l, features_k, labels, modality)
        value.backward()
    assert value.device == DEVICE
    assert_one_device(device)
    assert device.total_host_reads == 0, device.host_reads
