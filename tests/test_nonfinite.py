"""The GPU check's diagnosis of a non-finite training step, on a network broken on purpose."""
import torch

from nnunetv2_csa.modality_norm import ModalitySpecificNorm
from nnunetv2_csa.tools.nonfinite import diagnose_nonfinite_step, first_nonfinite_module
from nnunetv2_csa.training.nnUNetTrainerCSA import nnUNetTrainerCSA
from test_trainer_units import _plans

BROKEN = "encoder.stages.1.0.convs.0.norm"


def _network_with_a_nan_in_modality_1s_norm():
    network = nnUNetTrainerCSA.build_modality_network(_plans(), _plans().get_configuration("2d"), 1, 4, True)
    norm = network.get_submodule(BROKEN)
    assert isinstance(norm, ModalitySpecificNorm)
    with torch.no_grad():
        norm.norms[1].weight[0] = float("nan")
    return network


def test_the_first_module_with_a_nonfinite_output_is_named_and_the_network_is_left_as_it_was():
    network = _network_with_a_nan_in_modality_1s_norm()
    data = torch.randn(4, 1, 32, 32)
    hooks_before = sum(len(m._forward_hooks) for m in network.modules())
    assert first_nonfinite_module(network, data, torch.tensor([0, 0, 1, 1])) == BROKEN
    assert first_nonfinite_module(network, data, torch.tensor([0, 0, 1, 1]), torch.bfloat16) == BROKEN
    # routed to modality 0 only, the broken norm takes no part: every output is finite
    assert first_nonfinite_module(network, data, torch.tensor([0, 0, 0, 0])) is None
    assert sum(len(m._forward_hooks) for m in network.modules()) == hooks_before


def test_diagnosis_reports_weights_batch_and_both_replays():
    network = _network_with_a_nan_in_modality_1s_norm()
    batch = {"data": torch.randn(4, 1, 32, 32), "modality": torch.tensor([1, 0, 1, 0])}
    assert diagnose_nonfinite_step(network, batch, torch.bfloat16) == {
        "parameters_finite": False, "batch_finite": True,
        "first_nonfinite_module_autocast": BROKEN, "first_nonfinite_module_float32": BROKEN}
    batch["data"][1, 0, 3, 3] = float("inf")
    assert diagnose_nonfinite_step(network, batch, None)["batch_finite"] is False
