"""torch.compile and mixed precision on CPU, as close to nnU-Net's GPU path as CPU allows.

nnU-Net compiles the network (and its Dice loss) and trains under autocast on a GPU only;
on CPU it switches both off. These tests switch them on by hand on the tiny plan's trainer:
dynamo's guards and graphs do not depend on the device, so the graph counts hold on a GPU;
the numbers of float16 on a GPU (its kernels, its GradScaler) are what they leave unproven.
"""
import math

import pytest
import torch
import torch._dynamo

from nnunetv2_csa.wrappers import unwrap_network
from test_method_wiring import _batch


class _GraphCounter:
    """A dynamo backend that runs each graph eagerly and counts the graphs compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _nnunet_compiles_with(monkeypatch, backend):
    """nnU-Net's trainer as on a GPU: ``_do_i_compile`` true, so that ``initialize`` compiles the
    network and the Dice loss, here through ``backend``; dynamo's caches emptied first."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    original_compile = torch.compile
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: original_compile(model, backend=backend))
    torch._dynamo.reset()


@pytest.fixture
def compiled_like_nnunet(monkeypatch):
    """Compiled as nnU-Net compiles on a GPU, through a backend that counts the graphs."""
    counter = _GraphCounter()
    _nnunet_compiles_with(monkeypatch, counter)
    yield counter
    torch._dynamo.reset()


def _validation_batch(modality):
    batch = _batch(seed=len(modality))
    n = len(modality)
    return {"data": batch["data"][:n], "target": [t[:n] for t in batch["target"]],
            "modality": torch.tensor(modality)}


def _final_validation_like_nnunet(trainer, cases, monkeypatch):
    """The trainer's final validation (this package's wrapping of it included) with nnU-Net's part
    replaced by what it does with the network: deep supervision off, eval mode, each case loaded
    (which routes it to its modality) and its patch predicted in inference mode, mirrored too."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class Cases:  # nnU-Net's dataset class as its final validation uses it
        def __init__(self, folder, identifiers, folder_with_segs_from_previous_stage=None):
            self.identifiers = list(identifiers)

        def load_case(self, identifier):
            return torch.randn(1, 1, 32, 32), None, None, {}

    def predict_cases(self, save_probabilities=False):
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        dataset = self.dataset_class("unused", cases)
        for case in dataset.identifiers:
            data = dataset.load_case(case)[0]
            with torch.inference_mode():
                self.network(data)
                self.network(torch.flip(data, (2,)))
        self.set_deep_supervision_enabled(True)

    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", predict_cases)
    trainer.dataset_class = Cases
    trainer.perform_actual_validation()


def _graphs_of_nnunets_flow(trainer, counter, monkeypatch) -> tuple[list[int], int, int]:
    """Three epochs of training steps with changing batch compositions and validation steps of
    changing sizes, then a final validation; returns the graphs compiled after each epoch and
    after the final validation's first case, and the cache entries of the U-Net's forward (the
    number dynamo's recompile limit counts). Every further case (of either modality) must reuse
    the graphs: a recompile raises."""
    after_epoch = []
    # what the sampler gives, and compositions it does not give
    compositions = ([0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0])
    for epoch in range(3):
        trainer.on_train_epoch_start()
        for composition in compositions:
            batch = _batch(seed=epoch)
            batch["modality"] = torch.tensor(composition)
            assert math.isfinite(float(trainer.train_step(batch)["loss"]))
        trainer.on_validation_epoch_start()
        with torch.no_grad():
            for modality in ([0, 1, 1], [1, 0], [0, 0, 1, 1]):
                trainer.validation_step(_validation_batch(modality))
        after_epoch.append(counter.graphs)
    # the final validation's first case: inference tensors and no deep supervision need graphs of their own
    _final_validation_like_nnunet(trainer, ["p1_LGE"], monkeypatch)
    first_case = counter.graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        _final_validation_like_nnunet(trainer, ["p2_C0", "p4_C0", "p3_LGE", "p2_C0"], monkeypatch)
    forward = type(unwrap_network(trainer.network)).forward.__code__
    return after_epoch, first_case, len(torch._dynamo.eval_frame._debug_get_cache_entry_list(forward))


def test_compiled_csa_builds_the_graphs_of_stock_nnunet_and_none_per_batch_composition_or_modality(
        initialized_trainer, compiled_like_nnunet, monkeypatch):
    """The bound: CSA's network (modality-specific InstanceNorm, routed by a tensor, features tapped)
    compiles exactly as many graphs as nnU-Net's own trainer in the same flow (the Joint row), none
    after the first epoch, and none per case in the final validation, so it never nears dynamo's
    recompile limit (8 per function). MSBN's network is CSA's (the same norms and taps)."""
    counts = {}
    for row in ("Joint", "CSA"):
        torch._dynamo.reset()
        compiled_like_nnunet.graphs = 0
        trainer = initialized_trainer(f"nnUNetTrainer{row}")
        assert type(trainer.network).__name__ == "OptimizedModule"
        counts[row] = _graphs_of_nnunets_flow(trainer, compiled_like_nnunet, monkeypatch)
    csa_epochs, csa_final, csa_forward_entries = counts["CSA"]
    assert csa_epochs == [csa_epochs[0]] * 3, f"graphs compiled after the first epoch: {counts}"
    assert counts["CSA"] == counts["Joint"], counts
    # measured: 7 graphs after the first epoch, 9 after the final validation, 4 of the U-Net's forward
    assert csa_forward_entries < torch._dynamo.config.recompile_limit, counts


@pytest.fixture
def compiled_like_nnunet_with_decompositions(monkeypatch):
    """As ``compiled_like_nnunet``, through dynamo, AOT autograd and inductor's decompositions
    (``aot_eager_decomp_partition``): the graphs inductor would lower, run by eager kernels. What it
    leaves out is inductor's generated code (``NNUNETV2_CSA_INDUCTOR=1`` runs that too, minutes on CPU)."""
    import os
    backend = "inductor" if os.environ.get("NNUNETV2_CSA_INDUCTOR") == "1" else "aot_eager_decomp_partition"
    _nnunet_compiles_with(monkeypatch, backend)
    yield backend
    torch._dynamo.reset()


def _batch_with_a_padded_sample(seed):
    """A training batch in which one sample of each modality is partly outside its image: nnU-Net pads
    such patches with zeros (constant regions; the labels there are background)."""
    batch = _batch(seed)
    batch["data"][0, :, :, :12] = 0
    batch["data"][3, :, 20:, :] = 0
    return batch


@pytest.mark.parametrize("row", ["MSBN", "CSA"])
def test_compiled_float16_training_has_finite_losses_and_the_compiled_forward_equals_the_eager(
        initialized_trainer, compiled_like_nnunet_with_decompositions, monkeypatch, row):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    trainer = initialized_trainer(f"nnUNetTrainer{row}")
    # nnU-Net's mixed precision on a GPU: its train_step autocasts forward and loss to float16 (on CPU it
    # enters dummy_context there instead), the backward runs outside autocast, and a GradScaler (initial
    # scale 65536) skips a step whose gradients are not finite. (Autocast around the whole step would also
    # cover the backward, which nnU-Net never does: the CSA term's float32 backward then runs in float16.)
    monkeypatch.setattr(nnunet_trainer_module, "dummy_context", lambda: torch.autocast("cpu", dtype=torch.float16))
    trainer.grad_scaler = torch.amp.GradScaler("cpu")
    trainer.on_train_epoch_start()
    losses = [trainer.train_step(_batch_with_a_padded_sample(step)) for step in range(3)]
    losses = [(float(result["loss"]), float(result["consistency_loss"])) for result in losses]
    assert all(math.isfinite(loss) for loss, _ in losses), losses
    assert all(math.isfinite(term) == (row == "CSA") for _, term in losses), losses
    assert trainer.grad_scaler.get_scale() == 65536.0, "a step's gradients were not finite (the scaler skipped it)"

    batch = _batch_with_a_padded_sample(7)
    trainer._route(batch["modality"])
    eager = unwrap_network(trainer.network)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        compiled_output = trainer.network(batch["data"])[0].float()
        eager_output = eager(batch["data"])[0].float()
    assert torch.isfinite(compiled_output).all()
    # float16 keeps ~3 decimal digits; the compiled graph orders (and fuses) its sums differently
    scale = float(eager_output.abs().max())
    assert float((compiled_output - eager_output).abs().max()) <= 1e-2 * scale
