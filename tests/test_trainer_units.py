"""Fast checks of the trainer wiring that need no training run."""
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_csa.feature_taps import FeatureTap, consecutive_conv_layers, unwrap_network
from nnunetv2_csa.modality import ModalityTagError
from nnunetv2_csa.modality_norm import ModalitySpecificNorm
from nnunetv2_csa.training.nnUNetTrainerCSA import (INFERENCE_MODALITY_ENV, ConsistencyRegularizedLoss,
                                                    nnUNetTrainerCSA, nnUNetTrainerCSA_BN)
from nnunetv2_csa.training.short_budget import short_budget_name


def _unet(stages=4):
    return PlainConvUNet(1, stages, [8 * 2 ** i for i in range(stages)], torch.nn.Conv2d, 3,
                         [1] + [2] * (stages - 1), 2, 4, [2] * (stages - 1), True, torch.nn.InstanceNorm2d,
                         {"affine": True, "eps": 1e-5}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def _plans(modalities=("LGE", "C0")):
    arch = {"n_stages": 4, "features_per_stage": [8, 16, 32, 64], "conv_op": "torch.nn.modules.conv.Conv2d",
            "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
            "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    plans = {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [8, 32, 32], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"2d": {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor",
                                       "batch_size": 4, "patch_size": [32, 32], "spacing": [1, 1],
                                       "normalization_schemes": ["ZScoreNormalization"],
                                       "use_mask_for_norm": [False],
                                       "architecture": {"network_class_name":
                                                        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                                        "arch_kwargs": arch,
                                                        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                                "nonlin"]}}},
             "experiment_planner_used": "x", "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}
    if modalities is not None:
        plans["csa_modalities"] = list(modalities)
    return PlansManager(plans)


def test_default_affinity_layers_are_the_two_convolutions_of_the_middle_encoder_stage():
    assert consecutive_conv_layers(_unet(4)) == ("encoder.stages.2.0.convs.0", "encoder.stages.2.0.convs.1")
    assert consecutive_conv_layers(_unet(6), "decoder", 1) == ("decoder.stages.1.convs.0", "decoder.stages.1.convs.1")
    with pytest.raises(ValueError, match="stage 7 does not exist"):
        consecutive_conv_layers(_unet(4), "encoder", 7)
    with pytest.raises(ValueError, match="'encoder' or 'decoder'"):
        consecutive_conv_layers(_unet(4), "middle", 1)


def test_feature_tap_keeps_the_outputs_of_both_layers_and_lets_go_of_them():
    network = _unet(4)
    tap = FeatureTap(network, consecutive_conv_layers(network))
    with pytest.raises(RuntimeError, match="no forward pass"):
        tap.features()
    network(torch.randn(2, 1, 32, 32))
    features_l, features_k = tap.features()
    # stage 2 of 4: 32 features at a quarter of the resolution
    assert features_l.shape == features_k.shape == (2, 32, 8, 8)
    tap.clear()
    with pytest.raises(RuntimeError):
        tap.features()
    tap.remove()
    network(torch.randn(1, 1, 32, 32))
    with pytest.raises(RuntimeError):
        tap.features()


def test_unwrap_network_sees_through_wrappers():
    network = _unet(3)
    wrapped = torch.nn.DataParallel(network)
    assert unwrap_network(wrapped) is network


class _ConstantTerm:
    def __init__(self, value):
        self.value = value
        self.calls = 0

    def __call__(self, output, target):
        self.calls += 1
        return output.sum() * 0 + self.value


def test_consistency_is_added_with_its_weight_only_when_active():
    output = torch.ones(3, requires_grad=True)
    segmentation = lambda o, t: o.sum()  # noqa: E731
    term = _ConstantTerm(2.0)
    loss = ConsistencyRegularizedLoss(segmentation, term, weight=0.5, monitor=True)
    assert float(loss(output, None).detach()) == 3.0 and term.calls == 0  # inactive: validation
    loss.active = True
    assert float(loss(output, None).detach()) == 3.0 + 0.5 * 2.0
    assert loss.last_consistency == 2.0


def test_weight_zero_monitors_without_changing_the_loss_or_gradient():
    output = torch.ones(3, requires_grad=True)
    term = _ConstantTerm(7.0)
    loss = ConsistencyRegularizedLoss(lambda o, t: o.sum(), term, weight=0.0, monitor=True)
    loss.active = True
    value = loss(output, None)
    assert float(value) == 3.0 and loss.last_consistency == 7.0
    value.backward()
    assert torch.equal(output.grad, torch.ones(3))
    unmonitored = ConsistencyRegularizedLoss(lambda o, t: o.sum(), _ConstantTerm(7.0), weight=0.0, monitor=False)
    unmonitored.active = True
    unmonitored(output, None)
    assert math.isnan(unmonitored.last_consistency)


def test_inference_network_needs_a_known_modality(monkeypatch):
    plans = _plans()
    configuration = plans.get_configuration("2d")
    monkeypatch.delenv(INFERENCE_MODALITY_ENV, raising=False)
    with pytest.raises(ModalityTagError, match=r"nnUNet_csa_modality=LGE.*\['LGE', 'C0'\]"):
        nnUNetTrainerCSA.build_network_architecture(plans, configuration, 1, 4, enable_deep_supervision=False)
    monkeypatch.setenv(INFERENCE_MODALITY_ENV, "T2")
    with pytest.raises(ModalityTagError, match=r"'T2' is not a modality.*\['LGE', 'C0'\]"):
        nnUNetTrainerCSA.build_network_architecture(plans, configuration, 1, 4, enable_deep_supervision=False)
    monkeypatch.setenv(INFERENCE_MODALITY_ENV, "C0")
    network = nnUNetTrainerCSA.build_network_architecture(plans, configuration, 1, 4,
                                                          enable_deep_supervision=False)
    norms = [m for m in network.modules() if isinstance(m, ModalitySpecificNorm)]
    assert norms and all(n.n_modalities == 2 and n.modality == 1 for n in norms)
    assert network(torch.randn(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_training_network_has_one_norm_per_modality_of_the_right_type():
    configuration = _plans(("CT", "MR", "X")).get_configuration("2d")
    network = nnUNetTrainerCSA_BN.build_network_architecture(_plans(("CT", "MR", "X")), configuration, 1, 4, True)
    norms = [m for m in network.modules() if isinstance(m, ModalitySpecificNorm)]
    assert norms and all(n.n_modalities == 3 for n in norms)
    assert all(isinstance(n.norms[0], torch.nn.BatchNorm2d) for n in norms)


def test_plans_without_modalities_are_refused_with_an_explanation():
    plans = _plans(None)
    with pytest.raises(ModalityTagError, match="csa_modalities"):
        nnUNetTrainerCSA.build_network_architecture(plans, plans.get_configuration("2d"), 1, 4, True)


def test_short_budget_names():
    assert short_budget_name("nnUNetTrainerCSA", 2, 5) == "nnUNetTrainerCSA_2epochs_5its"
    with pytest.raises(ValueError, match="no short-budget variant"):
        short_budget_name("nnUNetTrainerCSA", 3, 5)
    import nnunetv2_csa.training.trainers as trainers
    variant = trainers.nnUNetTrainerUMMKD_BN_10epochs_20its
    assert issubclass(variant, trainers.nnUNetTrainerUMMKD_BN)
