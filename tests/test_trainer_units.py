"""Fast checks of the trainer wiring that need no training run."""
import math
import re

import pytest
import torch
import torch._dynamo
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_csa.feature_taps import FeatureTap, consecutive_conv_layers
from nnunetv2_csa.wrappers import unwrap_network
from nnunetv2_csa.modality import ModalityTagError, ModalityTags
from nnunetv2_csa.modality_order import (ModalityOrderError, recorded_modality_order, without_modality_order)
from nnunetv2_csa.modality_norm import ModalitySpecificNorm
from nnunetv2_csa.training.consistency import ConsistencyRegularizedLoss, lambda_rampup, weight_on_nnunet_loss
from nnunetv2_csa.training.inference_modality import INFERENCE_MODALITY_ENV
from nnunetv2_csa.training.nnUNetTrainerCSA import nnUNetTrainerCSA, nnUNetTrainerCSA_BN
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
                                       "batch_size": 4, "patch_size": [32, 32], "spacing": [1, 1], "batch_dice": True,
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


def test_residual_encoder_tap_holds_conv2_and_norm_before_the_residual_sum():
    """ResEnc's block adds the shortcut to conv2's output and applies the non-linearity in place:
    the tap must hold what the docs promise, recomputed here from the block's input."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    torch.manual_seed(0)
    network = ResidualEncoderUNet(1, 4, [8, 16, 32, 64], torch.nn.Conv2d, 3, [1, 2, 2, 2], [1, 2, 2, 2], 4, [1, 1, 1],
                                  True, torch.nn.InstanceNorm2d, {"affine": True, "eps": 1e-5}, None, None,
                                  torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
    layers = consecutive_conv_layers(network)
    assert layers == ("encoder.stages.2.blocks.0.conv1", "encoder.stages.2.blocks.0.conv2")
    block = network.get_submodule("encoder.stages.2.blocks.0")
    with torch.no_grad():  # nonzero affine parameters, so that the norm's part shows
        for module in block.modules():
            if isinstance(module, torch.nn.InstanceNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
    inputs, outputs = [], []
    block.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    block.register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone()))
    tap = FeatureTap(network, layers)
    network(torch.randn(2, 1, 32, 32))
    tapped_conv1, tapped_conv2 = tap.features()
    with torch.no_grad():
        conv1 = block.conv1.nonlin(block.conv1.norm(block.conv1.conv(inputs[0])))
        conv2 = block.conv2.norm(block.conv2.conv(conv1))
    torch.testing.assert_close(tapped_conv1, conv1)
    torch.testing.assert_close(tapped_conv2, conv2)
    # and not the block's output (residual sum and non-linearity), which is what an uncopied tap would hold
    assert not torch.allclose(tapped_conv2, outputs[0], atol=1e-3)


def test_unwrap_network_sees_through_compile_and_data_parallel_nested():
    network = _unet(3)
    assert unwrap_network(network) is network
    assert unwrap_network(torch.nn.DataParallel(network)) is network
    compiled = torch.compile(network)  # compiles lazily, at the first call: nothing runs here
    assert compiled is not network and unwrap_network(compiled) is network
    # nnU-Net's order with several GPUs: DDP around the compiled network (DataParallel stands in for DDP,
    # which needs a process group; both are unwrapped by the same isinstance rule)
    assert unwrap_network(torch.nn.DataParallel(compiled)) is network
    assert unwrap_network(torch.compile(torch.nn.DataParallel(network))) is network
    # a network that merely has a submodule called "module" is not a wrapper
    holder = torch.nn.Module()
    holder.module = network
    assert unwrap_network(holder) is holder


class _ConstantTerm:
    def __init__(self, value):
        self.value = value
        self.calls = 0

    def __call__(self, output, target, modality):
        self.calls += 1
        self.modality = modality
        return output.sum() * 0 + self.value


def test_consistency_is_added_with_its_weight_only_when_active():
    output = torch.ones(3, requires_grad=True)
    segmentation = lambda o, t: o.sum()  # noqa: E731
    term = _ConstantTerm(2.0)
    loss = ConsistencyRegularizedLoss(segmentation, term, weight=0.5)
    assert float(loss(output, None).detach()) == 3.0 and term.calls == 0  # inactive: validation
    loss.active = True
    modality = torch.tensor([0, 1, 1])
    with loss.for_batch(modality):
        assert float(loss(output, None).detach()) == 3.0 + 0.5 * 2.0
    assert loss.last_consistency == 2.0 and term.modality is modality  # the batch's modality, handed over
    with pytest.raises(RuntimeError, match=r"needs the batch's modality: call the loss inside loss\.for_batch"):
        loss(output, None)  # outside the step's context


def test_weight_zero_never_computes_the_term_in_a_training_step():
    # MSBN (λ = 0) must not pay for a term it does not minimise: its timed step is Joint's plus routing
    output = torch.ones(3, requires_grad=True)
    term = _ConstantTerm(7.0)
    loss = ConsistencyRegularizedLoss(lambda o, t: o.sum(), term, weight=0.0)
    loss.active = True
    value = loss(output, None)
    assert float(value.detach()) == 3.0 and term.calls == 0 and math.isnan(loss.last_consistency)
    value.backward()
    assert torch.equal(output.grad, torch.ones(3))


def test_default_weights_are_the_papers_lambda_on_the_mean_loss():
    # the paper sums the two modalities' Dice + CE, nnU-Net averages them: λ_paper = 0.5 -> 0.25
    import types
    import nnunetv2_csa.training.trainers as trainers
    assert weight_on_nnunet_loss(0.5, 2) == 0.25

    def weight(trainer_class):
        two_modalities = types.SimpleNamespace(paper_lambda=trainer_class.paper_lambda,
                                               modality_tags=ModalityTags(("LGE", "C0"), {}))
        return nnUNetTrainerCSA.consistency_weight.fget(two_modalities)
    expected = {"nnUNetTrainerCSA": 0.25, "nnUNetTrainerCSA_BN": 0.25, "nnUNetTrainerUMMKD": 0.25,
                "nnUNetTrainerAffinity": 0.25, "nnUNetTrainerMSBN": 0.0, "nnUNetTrainerCSA_Lambda1": 0.5,
                "nnUNetTrainerCSA_Lambda0p25": 0.125, "nnUNetTrainerUMMKD_Lambda1": 0.5,
                "nnUNetTrainerCSA_10epochs_20its": 0.25}
    for name, value in expected.items():
        assert weight(getattr(trainers, name)) == value, name


def test_the_weight_is_lambda_over_the_number_of_modalities(initialized_trainer, capsys):
    # nnU-Net's loss over B/N samples of each of N modalities is the mean of their losses, the paper's the sum
    assert weight_on_nnunet_loss(0.5, 1) == 0.5 and weight_on_nnunet_loss(0.5, 3) == 0.5 / 3
    with pytest.raises(ValueError, match="positive int"):
        weight_on_nnunet_loss(0.5, 0)
    three = {"csa_modalities": ["LGE", "C0", "T2"],
             "csa_case_modality": {"p1_LGE": "LGE", "p2_C0": "C0", "p3_LGE": "LGE", "p4_T2": "T2"}}
    trainer = initialized_trainer("nnUNetTrainerCSA", dataset_changes=three)
    assert trainer.consistency_weight == trainer.loss.weight == 0.5 / 3
    assert f"λ = 0.5 in the paper's units, N = 3 modalities, weight λ/N = {0.5 / 3}" in capsys.readouterr().out
    assert initialized_trainer("nnUNetTrainerCSA").loss.weight == 0.25


def test_one_default_area_normalization_for_the_loss_and_the_trainer():
    from nnunetv2_csa.losses import DEFAULT_AREA_NORMALIZATION, AffinityLoss, ClassSpecificAffinityLoss
    assert DEFAULT_AREA_NORMALIZATION == "none"  # measured best on MyoPS (documentation/trainers.md)
    assert ClassSpecificAffinityLoss(3).area_normalization == DEFAULT_AREA_NORMALIZATION
    assert AffinityLoss().area_normalization == DEFAULT_AREA_NORMALIZATION
    assert nnUNetTrainerCSA.area_normalization == DEFAULT_AREA_NORMALIZATION


def test_weights_refuse_a_network_built_for_another_modality_order():
    configuration = _plans().get_configuration("2d")
    trained = nnUNetTrainerCSA.build_modality_network(_plans(("LGE", "C0")), configuration, 1, 4, True)
    state = trained.state_dict()
    assert recorded_modality_order(trained) == ["LGE", "C0"]
    same = nnUNetTrainerCSA.build_modality_network(_plans(("LGE", "C0")), configuration, 1, 4, True)
    same.load_state_dict(state)
    for other in (("C0", "LGE"), ("LGE", "T2")):
        swapped = nnUNetTrainerCSA.build_modality_network(_plans(other), configuration, 1, 4, True)
        with pytest.raises(ModalityOrderError, match=r"order \['LGE', 'C0'\].*built for \['%s', '%s'\].*"
                                                     r"--modalities LGE C0" % other):
            swapped.load_state_dict(state)


def test_the_modality_order_is_in_the_state_dict_but_no_buffer_that_ddp_would_broadcast():
    configuration = _plans().get_configuration("2d")
    network = nnUNetTrainerCSA.build_modality_network(_plans(), configuration, 1, 4, True)
    assert [name for name, _ in network.named_buffers()] == []  # nnU-Net's InstanceNorm U-Net has none either
    state = network.state_dict()
    assert bytes(state["csa_modality_order"].tolist()).decode() == '["LGE", "C0"]'
    # the compiled network's state_dict (nnU-Net saves the inner module's; DDP's prefixes "module.") carries it too
    assert "_orig_mod.csa_modality_order" in torch.compile(network).state_dict()
    # loading checks and drops it from load_state_dict's own copy: the caller's weights keep it (nnU-Net's
    # predictor loads the same dict of each fold again for every case)
    network.load_state_dict(state)
    network.load_state_dict(state)
    assert "csa_modality_order" in state


def test_weights_without_a_recorded_order_load_with_a_warning():
    configuration = _plans().get_configuration("2d")
    network = nnUNetTrainerCSA.build_modality_network(_plans(), configuration, 1, 4, True)
    old_release = without_modality_order(network.state_dict())
    with pytest.warns(UserWarning, match="do not record their modality order"):
        network.load_state_dict(old_release)


class _FakeDataset:
    """nnU-Net's dataset class as its final validation uses it: identifiers and load_case."""

    def __init__(self, folder, identifiers, folder_with_segs_from_previous_stage=None):
        self.identifiers = list(identifiers)

    def load_case(self, identifier):
        return torch.zeros(1, 1, 32, 32), None, None, {"case": identifier}


def _validation_like_nnunet(order="nnunet"):
    """Stands in for nnU-Net's perform_actual_validation (2.8.1: build the validation dataset
    from ``self.dataset_class``, then load each case and predict it); ``order`` breaks that
    loop as a later nnU-Net might. Records each forward's case and the norms' modality."""
    import threading

    def validation(trainer, save_probabilities=False):
        _, val_keys = trainer.do_split()
        dataset = trainer.dataset_class("/preprocessed", val_keys, folder_with_segs_from_previous_stage=None)
        norms = [m for m in trainer.network.modules() if isinstance(m, ModalitySpecificNorm)]

        def predict(case, data):
            trainer.network(data)
            trainer.predicted.append((case, {n.modality for n in norms}))

        if order == "prefetch":  # the next case is loaded before the current one is predicted
            loaded = [(k, dataset.load_case(k)[0]) for k in dataset.identifiers]
            for case, data in loaded:
                predict(case, data)
        elif order == "thread":  # cases loaded by a background thread (whose errors go nowhere)
            loaded = []

            def load_all():
                try:
                    loaded.extend((k, dataset.load_case(k)[0]) for k in dataset.identifiers)
                except Exception:
                    pass
            worker = threading.Thread(target=load_all)
            worker.start()
            worker.join()
            for case, data in loaded:
                predict(case, data)
        elif order == "elsewhere":  # cases loaded in a worker process: this network never sees a load
            for k in dataset.identifiers:
                predict(k, torch.zeros(1, 1, 32, 32))
        else:
            for k in dataset.identifiers:
                data, _, _, _ = dataset.load_case(k)
                predict(k, data)
    return validation


def _trainer_for_validation(monkeypatch, cases, order="nnunet"):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    trainer = nnUNetTrainerCSA.__new__(nnUNetTrainerCSA)
    trainer.modality_tags = ModalityTags(("LGE", "C0"), cases)
    trainer.network = nnUNetTrainerCSA.build_modality_network(_plans(), _plans().get_configuration("2d"),
                                                                  1, 4, True)
    trainer.network.decoder.deep_supervision = False
    trainer.local_rank = 1  # no summary to write
    trainer.feature_tap = None
    trainer.dataset_class = _FakeDataset
    trainer.predicted = []
    monkeypatch.setattr(nnUNetTrainer, "do_split", lambda self: (["p9_LGE", "p8_C0"], list(cases)))
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", _validation_like_nnunet(order))
    return trainer


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_final_validation_routes_each_case_to_its_modality_as_nnunet_loads_it(monkeypatch, compiled):
    cases = {"p1_LGE": "LGE", "p2_C0": "C0", "p4_C0": "C0", "p3_LGE": "LGE"}
    trainer = _trainer_for_validation(monkeypatch, cases)
    if compiled:  # as nnU-Net's trainer on a GPU: the order check's hook sits on the compiled wrapper
        torch._dynamo.reset()
        trainer.network = torch.compile(trainer.network, backend="eager")
    trainer.perform_actual_validation()
    assert trainer.predicted == [("p1_LGE", {0}), ("p2_C0", {1}), ("p4_C0", {1}), ("p3_LGE", {0})]
    # validation over: nnU-Net's dataset class and a hook-free network again
    assert trainer.dataset_class is _FakeDataset and not trainer.network._forward_pre_hooks
    if compiled:
        torch._dynamo.reset()


@pytest.mark.parametrize("order, message", [
    ("prefetch", "loaded p2_C0 before it predicted p1_LGE"),
    ("thread", "loaded p1_LGE in another thread than its own"),
    ("elsewhere", "predicted a case that it did not load")])
def test_final_validation_stops_when_nnunet_no_longer_predicts_each_case_right_after_loading_it(
        monkeypatch, order, message):
    from nnunetv2_csa.training.per_modality_validation import CaseRoutingError
    trainer = _trainer_for_validation(monkeypatch, {"p1_LGE": "LGE", "p2_C0": "C0"}, order)
    with pytest.raises(CaseRoutingError, match=message):
        trainer.perform_actual_validation()
    assert trainer.predicted == []  # stopped before any case met the wrong norms
    assert trainer.dataset_class is _FakeDataset and not trainer.network._forward_pre_hooks


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
    # the predictor's network is routed whatever its deep supervision (nnU-Net builds it without)
    for deep_supervision in (False, True):
        network = nnUNetTrainerCSA.build_network_architecture(plans, configuration, 1, 4, deep_supervision)
        norms = [m for m in network.modules() if isinstance(m, ModalitySpecificNorm)]
        assert norms and all(n.n_modalities == 2 and n.modality == 1 for n in norms)
    assert network.eval()(torch.randn(1, 1, 32, 32))[0].shape == (1, 4, 32, 32)


def test_a_trainer_without_deep_supervision_builds_its_network_unrouted_without_the_inference_variable(
        initialized_trainer, monkeypatch):
    # nnU-Net's nnUNetTrainerNoDeepSupervision pattern: the trainer's own network is not the predictor's
    monkeypatch.delenv(INFERENCE_MODALITY_ENV, raising=False)

    class nnUNetTrainerCSANoDeepSupervision(nnUNetTrainerCSA):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.enable_deep_supervision = False

    trainer = initialized_trainer(nnUNetTrainerCSANoDeepSupervision)
    norms = [m for m in trainer.network.modules() if isinstance(m, ModalitySpecificNorm)]
    assert norms and all(n.modality is None for n in norms)
    # and the trainer's build does not leave the predictor's path switched off behind it
    with pytest.raises(ModalityTagError, match="nnUNet_csa_modality"):
        nnUNetTrainerCSA.build_network_architecture(_plans(), _plans().get_configuration("2d"), 1, 4, False)


def test_training_network_has_one_norm_per_modality_of_the_right_type():
    configuration = _plans(("CT", "MR", "X")).get_configuration("2d")
    network = nnUNetTrainerCSA_BN.build_modality_network(_plans(("CT", "MR", "X")), configuration, 1, 4, True)
    norms = [m for m in network.modules() if isinstance(m, ModalitySpecificNorm)]
    assert norms and all(n.n_modalities == 3 for n in norms)
    assert all(isinstance(n.norms[0], torch.nn.BatchNorm2d) for n in norms)


def test_plans_without_modalities_are_refused_with_an_explanation():
    plans = _plans(None)
    with pytest.raises(ModalityTagError, match="csa_modalities"):
        nnUNetTrainerCSA.build_modality_network(plans, plans.get_configuration("2d"), 1, 4, True)


def test_short_budget_names():
    assert short_budget_name("nnUNetTrainerCSA", 2, 5) == "nnUNetTrainerCSA_2epochs_5its"
    assert short_budget_name("nnUNetTrainerCSA", 3, 7) == "nnUNetTrainerCSA_3epochs_7its"
    with pytest.raises(ValueError, match="no short-budget variant"):
        short_budget_name("nnUNetTrainerCSA", 0, 5)
    import nnunetv2_csa.training.trainers as trainers
    variant = trainers.nnUNetTrainerUMMKD_BN_10epochs_20its
    assert issubclass(variant, trainers.nnUNetTrainerUMMKD_BN)


def _logged_epochs(with_consistency: bool, epochs: int = 3):
    """A logger after ``epochs`` epochs of what a trainer logs (Joint: no consistency series)."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger
    from nnunetv2_csa.training.progress import ModalityAwareLocalLogger

    logger = ModalityAwareLocalLogger(("LGE", "C0"), LocalLogger(), with_consistency)
    consistency = ("train_consistency_losses", "val_consistency_losses") if with_consistency else ()
    for epoch in range(epochs):
        for key in ("mean_fg_dice", "ema_fg_dice", "train_losses", "val_losses", "lrs", *consistency):
            logger.log(key, 0.1 * epoch, epoch)
        logger.log("dice_per_class_or_region", [0.5, 0.5], epoch)
        logger.log("mean_fg_dice_per_modality", [0.4, 0.6], epoch)
        logger.log("epoch_start_timestamps", float(epoch), epoch)
        logger.log("epoch_end_timestamps", epoch + 0.5, epoch)
    return logger


@pytest.mark.parametrize("with_consistency", [True, False], ids=["CSA family", "Joint"])
def test_every_series_of_the_log_has_one_value_per_epoch_so_nnunets_plot_counts_them_all(with_consistency):
    # nnU-Net's progress.png takes the shortest series as the number of epochs: a series the
    # trainer never logs (Joint has no consistency term) would make it plot nothing
    logger = _logged_epochs(with_consistency)
    assert {len(v) for v in logger.my_fantastic_logging.values()} == {3}
    assert ("train_consistency_losses" in logger.my_fantastic_logging) == with_consistency


@pytest.mark.parametrize("with_consistency", [True, False], ids=["CSA family", "Joint"])
def test_progress_panel_is_drawn_from_the_log_without_reading_nnunets_png(tmp_path, monkeypatch, with_consistency):
    import matplotlib.pyplot as plt
    from nnunetv2_csa.training.progress import PROGRESS_FILE

    logger = _logged_epochs(with_consistency)

    def no_reading(*args, **kwargs):
        raise AssertionError("progress.png was read back")

    monkeypatch.setattr(plt, "imread", no_reading)
    logger.plot_progress_png(str(tmp_path))
    from PIL import Image
    assert Image.open(tmp_path / "progress.png").size == (3000, 5400)  # nnU-Net's own figure, unchanged
    assert Image.open(tmp_path / PROGRESS_FILE).size == (800, 320)


def test_lambda_rampup_is_linear_over_its_fraction_of_the_epochs():
    assert [lambda_rampup(e, 20, 0.25) for e in (0, 1, 4, 5, 19)] == [0.0, 0.2, 0.8, 1.0, 1.0]
    assert lambda_rampup(0, 20, 0.0) == 1.0


@pytest.mark.parametrize("bad", ["../p1_LGE", "/etc/passwd", "a/b_LGE", "..", "", "p1\\..\\x"])
def test_case_names_that_are_paths_are_refused(bad):
    with pytest.raises(ModalityTagError, match="not a plain file name"):
        ModalityTags(("LGE",), {bad: "LGE"})


@pytest.mark.parametrize("global_batch, world_size, modalities, per_rank", [
    (3, 2, ("LGE", "C0"), [2, 1]), (1, 2, ("LGE", "C0"), [1, 0]), (4, 2, ("CT", "MR", "X"), [2, 2]),
    (7, 3, ("LGE", "C0"), [3, 2, 2])])
def test_a_batch_that_cannot_hold_every_modality_on_every_gpu_is_refused_alike_on_every_rank(
        monkeypatch, global_batch, world_size, modalities, per_rank):
    import torch.distributed as dist
    trainer = nnUNetTrainerCSA.__new__(nnUNetTrainerCSA)
    trainer.modality_tags = ModalityTags(tuple(modalities), {})
    trainer.configuration_manager = _plans(modalities).get_configuration("2d")
    trainer.configuration_manager.configuration["batch_size"] = global_batch
    trainer.is_ddp = True
    monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
    assert trainer.batch_size_per_rank() == per_rank
    if global_batch >= world_size:  # nnU-Net's own split (it asserts this) gives each rank the same
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        for rank in range(world_size):
            monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
            trainer.oversample_foreground_percent = 0.33
            nnUNetTrainer._set_batch_size_and_oversample(trainer)
            assert trainer.batch_size == per_rank[rank], "nnU-Net's split over the GPUs changed"
    if min(per_rank) >= len(modalities):
        trainer._check_every_rank_holds_every_modality()
        return
    with pytest.raises(ModalityTagError, match=rf"batch size {global_batch} over {world_size} GPUs gives "
                                               rf"\[{', '.join(map(str, per_rank))}\] per GPU.*at least "
                                               rf"{len(modalities) * world_size} .*-num_gpus"):
        trainer._check_every_rank_holds_every_modality()


@pytest.mark.parametrize("labels, order", [({"background": 0, "heart": [1, 2, 3], "core": [2, 3], "c": 3}, [1, 2, 3]),
                                           ({"background": 0, "heart": [1, 2, 3]}, [1])],
                         ids=["three regions", "one region"])
def test_region_based_dataset_is_refused_when_the_trainer_initializes(initialized_trainer, labels, order):
    # nnU-Net's own trainer takes the same dataset (negative control), and so do the stock rows
    changes = {"labels": labels, "regions_class_order": order}
    initialized_trainer("nnUNetTrainerJoint", dataset_changes=changes)
    with pytest.raises(ModalityTagError, match=rf"region-based \(regions_class_order {re.escape(str(order))}.*label-based datasets only"):
        initialized_trainer("nnUNetTrainerCSA", dataset_changes=changes)


def test_training_after_tagging_again_without_preprocessing_warns(initialized_trainer, tmp_path):
    import json
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tags the cases otherwise")
        trainer = initialized_trainer("nnUNetTrainerJoint")  # negative controls: no raw dataset.json,
        raw = tmp_path / "nnUNet_raw" / trainer.plans_manager.dataset_name
        raw.mkdir()
        (raw / "dataset.json").write_text(json.dumps({**trainer.dataset_json}))
        initialized_trainer("nnUNetTrainerCSA")  # and the same tags

    tagged_again = {**trainer.dataset_json, "csa_case_modality": {**trainer.dataset_json["csa_case_modality"],
                                                                  "p1_LGE": "C0"}}
    (raw / "dataset.json").write_text(json.dumps(tagged_again))
    with pytest.warns(UserWarning, match=r"tags the cases otherwise than the preprocessed copy .* Run "
                                         r"nnUNetv2_preprocess"):
        initialized_trainer("nnUNetTrainerCSA")
