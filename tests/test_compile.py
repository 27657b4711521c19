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


@pytest.fixture
def compiled_like_nnunet(monkeypatch):
    """nnU-Net's trainer as on a GPU: ``_do_i_compile`` true, so that ``initialize`` compiles the
    network and the Dice loss, through a counting backend; dynamo's caches emptied before and after."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    counter = _GraphCounter()
    original_compile = torch.compile
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: original_compile(model, backend=counter))
    torch._dynamo.reset()
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
