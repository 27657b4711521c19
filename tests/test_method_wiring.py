"""The method reaches the network: the consistency term's gradient, which modality each
validation count belongs to, and which modality's norms an export carries. Each test marks
the modalities differently (distinct labels, counts or norm parameters), so that a value
filed under the other modality, or a term cut off from the graph, fails it (issue: tests
that can fail; `make mutants` checks that they do)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_csa.modality_norm import ModalitySpecificNorm
from nnunetv2_csa.training.per_modality_validation import PerModalityValidationMixin
from nnunetv2_csa.training.progress import PER_MODALITY_DICE

# the tiny plan's batch: two samples of each modality, ordered as the unpaired sampler orders them
MODALITY = torch.tensor([0, 0, 1, 1])


def _batch(seed=0):
    """A training batch of the tiny plan: images, deep-supervision targets in which every class
    is present in both modalities' samples, and the per-sample modality."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(4, 1, 32, 32, generator=generator)
    labels = torch.zeros(4, 1, 32, 32)
    labels[:, :, 4:28, 4:28] = 1
    labels[:, :, 8:24, 8:24] = 2
    labels[:, :, 12:20, 12:20] = 3
    target = [F.interpolate(labels, size=(s, s), mode="nearest") for s in (32, 16, 8)]
    return {"data": data, "target": target, "modality": MODALITY.clone()}


def _gradients(value, parameters):
    return [None if g is None else g.detach().clone()
            for g in torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)]


def _norms_at(network, path) -> ModalitySpecificNorm:
    norm = network.get_submodule(path)
    assert isinstance(norm, ModalitySpecificNorm)
    return norm


@pytest.mark.parametrize("row", ["CSA", "Affinity", "UMMKD"])
def test_consistency_gradient_reaches_the_shared_convolutions_and_every_present_modalitys_norms(
        initialized_trainer, row):
    trainer = initialized_trainer(f"nnUNetTrainer{row}")
    # float64, so that the difference of two gradients below is not lost to rounding
    trainer.network.double()
    batch = _batch()
    batch["data"] = batch["data"].double()
    trainer._route(batch["modality"])
    trainer.loss.active = True
    network = trainer.network
    named = dict(network.named_parameters())
    names = list(named)
    output = network(batch["data"])
    segmentation = trainer.loss.segmentation_loss(output, batch["target"])
    with trainer.loss.for_batch(batch["modality"]):
        total = trainer.loss(output, batch["target"])  # reads (and then drops) the tapped features
    assert math.isfinite(trainer.loss.last_consistency) and trainer.loss.last_consistency > 0
    # what the term adds to the gradient of nnU-Net's loss...
    added = [None if t is None else t - (s if s is not None else 0)
             for t, s in zip(_gradients(total, list(named.values())), _gradients(segmentation, list(named.values())))]
    # ...is the row's weight times the term's own gradient (a second forward: the network is deterministic)
    term = trainer.loss.consistency(network(batch["data"]), batch["target"], batch["modality"])
    own = _gradients(term, list(named.values()))
    weight = trainer.consistency_weight
    assert weight > 0
    for name, a, o in zip(names, added, own):
        if o is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            torch.testing.assert_close(a, weight * o, rtol=1e-6, atol=1e-12, msg=name)

    def moved(name):
        gradient = own[names.index(name)]
        return gradient is not None and float(gradient.abs().sum()) > 0

    # the first (shared) convolution, and each modality's norms at the first layer and at the
    # middle stage, which both the tapped features and the logits depend on
    assert moved("encoder.stages.0.0.convs.0.conv.weight")
    for layer in ("encoder.stages.0.0.convs.0.norm", "encoder.stages.2.0.convs.0.norm"):
        for k in (0, 1):
            assert moved(f"{layer}.norms.{k}.weight") and moved(f"{layer}.norms.{k}.bias"), (layer, k)


def test_msbn_training_step_never_computes_the_term_and_csa_computes_it_once(initialized_trainer):
    calls = {}
    for row in ("MSBN", "CSA"):
        trainer = initialized_trainer(f"nnUNetTrainer{row}")
        calls[row] = 0

        def count(module, args, row=row):
            calls[row] += 1
        trainer.consistency_term.register_forward_pre_hook(count)
        trainer.on_train_epoch_start()
        result = trainer.train_step(_batch())
        assert np.isfinite(result["loss"])
        assert math.isnan(result["consistency_loss"]) == (row == "MSBN")
        # the tapped activations are not kept past the step, whether the term read them or not
        with pytest.raises(RuntimeError, match="no forward pass"):
            trainer.feature_tap.features()
    assert calls == {"MSBN": 0, "CSA": 1}


def test_a_training_step_routes_each_sample_to_its_own_modalitys_norms(initialized_trainer):
    # a network whose modality-1 norms differ from its modality-0 norms: the step must read the batch's
    # own modality vector (the sampler's), in its order
    trainer = initialized_trainer("nnUNetTrainerMSBN")
    with torch.no_grad():
        for module in trainer.network.modules():
            if isinstance(module, ModalitySpecificNorm):
                module.norms[1].bias.fill_(0.5)
    batch = _batch()
    batch["modality"] = torch.tensor([1, 1, 0, 1])  # unordered and not a palindrome: reversed, it differs
    seen = []
    norm = _norms_at(trainer.network, "encoder.stages.0.0.convs.0.norm")
    handle = norm.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    trainer.on_train_epoch_start()
    trainer.train_step(batch)
    handle.remove()
    # the first norm's output per sample: its mean over channels and pixels is the sample's bias
    means = seen[0].mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.tensor([0.5, 0.5, 0.0, 0.5]), atol=1e-4, rtol=0)


class _CountingValidation:
    """Stands in for nnU-Net's validation_step and epoch end: each sample carries a marker (its
    first pixel), and the counts of a sub-batch are sums of its markers, so every modality's
    counts are distinguishable; it also records the modality routed for each sub-batch."""

    def validation_step(self, batch):
        markers = batch["data"][:, 0, 0, 0].double()
        self.sub_batches.append((self.routed, markers.tolist()))
        total = float(markers.sum())
        return {"loss": np.float64(total), "tp_hard": np.array([total, 0.0]),
                "fp_hard": np.array([0.0, total]), "fn_hard": np.array([0.0, 0.0])}

    def on_validation_epoch_end(self, val_outputs):
        pass


class _Logger:
    def __init__(self):
        self.logged = {}

    def log(self, key, value, epoch):
        self.logged[key] = value


class _PerModalityValidation(PerModalityValidationMixin, _CountingValidation):
    def _route(self, modality):
        self.routed = modality


def _validation_trainer():
    from nnunetv2_csa.modality import ModalityTags
    trainer = _PerModalityValidation.__new__(_PerModalityValidation)
    trainer.modality_tags = ModalityTags(("LGE", "C0"), {"p1_LGE": "LGE", "p2_C0": "C0"})
    trainer.sub_batches, trainer.routed, trainer.is_ddp, trainer.current_epoch = [], None, False, 0
    trainer.logger = _Logger()
    return trainer


def test_validation_counts_are_filed_under_the_modality_of_their_samples():
    trainer = _validation_trainer()
    # interleaved modalities (nnU-Net's validation loader does not order them); markers: LGE 1 and 2, C0 100
    data = torch.zeros(3, 1, 8, 8)
    data[:, 0, 0, 0] = torch.tensor([1.0, 100.0, 2.0])
    target = [torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 4, 4)]
    result = trainer.validation_step({"data": data, "target": target, "modality": torch.tensor([0, 1, 0])})
    # each sub-batch met its own modality's norms and holds only that modality's samples
    assert trainer.sub_batches == [(0, [1.0, 2.0]), (1, [100.0])]
    np.testing.assert_array_equal(result["tp_hard_per_modality"], [[3.0, 0.0], [100.0, 0.0]])
    np.testing.assert_array_equal(result["fp_hard_per_modality"], [[0.0, 3.0], [0.0, 100.0]])
    np.testing.assert_array_equal(result["tp_hard"], [103.0, 0.0])
    assert result["loss"] == pytest.approx((2 * 3.0 + 1 * 100.0) / 3)  # each sub-batch weighted by its size


def test_pseudo_dice_per_modality_is_computed_from_that_modalitys_counts():
    trainer = _validation_trainer()
    # LGE: perfect on class 1, C0: nothing right on class 1; class 2 is LGE-only
    outputs = [{"tp_hard_per_modality": np.array([[4.0, 2.0], [0.0, 0.0]]),
                "fp_hard_per_modality": np.array([[0.0, 2.0], [3.0, 0.0]]),
                "fn_hard_per_modality": np.array([[0.0, 0.0], [1.0, 0.0]])}]
    trainer.on_validation_epoch_end(outputs)
    lge, c0 = trainer.logger.logged[PER_MODALITY_DICE]
    assert lge == pytest.approx((1.0 + 4 / 6) / 2)
    assert c0 == pytest.approx(0.0)  # class 2 has no voxel in C0: left out, not counted as 0 or 1
