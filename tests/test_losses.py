"""Tests of nnunetv2_csa.losses: CSA / Affinity (Chen et al. 2020) and UMMKD (Dou et al. 2020).

Each loss is checked against a naive loop implementation written from the equations
(python loops over samples, classes and channel pairs, float64), against tiny cases
computed by hand, and for the invariances the method relies on (hypothesis).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nnunetv2_csa.losses import (WHOLE_MAP, AffinityLoss, ClassSpecificAffinityLoss,
                                 UnpairedKnowledgeDistillationLoss, ummkd_loss)
from nnunetv2_csa.losses.masks_and_pairs import resize_labels

HYPOTHESIS = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- references

def _labels_at(labels, size):
    """Independent of the package: (B,1,h,w)|(B,h,w) -> (B,H,W) long, nearest-exact."""
    labels = labels.reshape(labels.shape[0], 1, *labels.shape[-2:]).double()
    return F.interpolate(labels, size=size, mode="nearest-exact")[:, 0].round().long()


def naive_csa(features_l, features_k, labels, modality, num_classes, area_normalization="fraction",
              reading="mean_squared", include_background=True, class_specific=True, eps=1e-8):
    """Eqs. (2)-(4') with loops over samples, classes and channel pairs, in float64.
    Returns (loss as float, {(modality, class): A^{c,j}})."""
    batch, m_channels, height, width = features_l.shape
    n_channels = features_k.shape[1]
    if class_specific:
        labels = _labels_at(labels, (height, width))
        classes = list(range(0 if include_background else 1, num_classes))
    else:
        classes = [WHOLE_MAP]
    per_sample = {}
    for b in range(batch):
        for c in classes:
            mask = torch.ones(height, width, dtype=torch.float64) if c == WHOLE_MAP else (labels[b] == c).double()
            count = mask.sum().item()
            if count == 0:
                continue
            region = {"none": 1.0, "pixels": count, "fraction": count / (height * width)}[area_normalization]
            affinity = torch.zeros(m_channels, n_channels, dtype=torch.float64)
            for m in range(m_channels):
                for n in range(n_channels):
                    affinity[m, n] = F.cosine_similarity(
                        (features_l[b, m].double() * mask).flatten(), (features_k[b, n].double() * mask).flatten(),
                        dim=0, eps=eps) / region
            per_sample[(b, c)] = affinity
    modalities = sorted(set(modality.tolist()))
    per_modality = {}
    for j in modalities:
        for c in classes:
            matrices = [per_sample[(b, c)] for b in range(batch) if modality[b].item() == j and (b, c) in per_sample]
            if matrices:
                per_modality[(j, c)] = sum(matrices) / len(matrices)
    pair_losses = []
    for i, first in enumerate(modalities):
        for second in modalities[i + 1:]:
            terms = []
            for c in classes:
                if (first, c) in per_modality and (second, c) in per_modality:
                    difference = per_modality[(first, c)] - per_modality[(second, c)]
                    terms.append((difference ** 2).mean().item() if reading == "mean_squared"
                                 else difference.mean().item() ** 2)
            if terms:
                pair_losses.append(sum(terms) / len(terms))
    loss = sum(pair_losses) / len(pair_losses) if pair_losses else 0.0
    return loss, per_modality


def naive_ummkd(logits, labels, modality, temperature=2.0):
    batch, channels, height, width = logits.shape
    labels = _labels_at(labels, (height, width))
    modalities = sorted(set(modality.tolist()))
    soft = {}
    for j in modalities:
        for c in range(channels):
            vectors = [logits[b, :, y, x].double() for b in range(batch) if modality[b].item() == j
                       for y in range(height) for x in range(width) if labels[b, y, x].item() == c]
            if vectors:
                soft[(j, c)] = torch.softmax(torch.stack(vectors).mean(0) / temperature, dim=0)
    pair_losses = []
    for i, first in enumerate(modalities):
        for second in modalities[i + 1:]:
            terms = []
            for c in range(channels):
                if (first, c) in soft and (second, c) in soft:
                    p, q = soft[(first, c)], soft[(second, c)]
                    kl_pq = (p * (p.log() - q.log())).sum().item()
                    kl_qp = (q * (q.log() - p.log())).sum().item()
                    terms.append(0.5 * (kl_pq + kl_qp))
            if terms:
                pair_losses.append(sum(terms) / len(terms))
    return sum(pair_losses) / len(pair_losses) if pair_losses else 0.0


# --------------------------------------------------------------------------- random batches

MODALITY_IDS = (0, 2, 5)  # non-contiguous on purpose


@st.composite
def batches(draw, max_modalities=3, min_size=1, label_factor=None, channels=None):
    """A random unpaired batch: features, labels (with the ignore value C), modality."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    num_modalities = draw(st.integers(2, max_modalities))
    per_modality = draw(st.lists(st.integers(1, 3), min_size=num_modalities, max_size=num_modalities))
    m_channels = draw(st.integers(1, 4))
    n_channels = draw(st.integers(1, 4)) if channels is None else channels
    height, width = draw(st.integers(min_size, 5)), draw(st.integers(min_size, 5))
    num_classes = draw(st.integers(2, 4))
    factor = draw(st.sampled_from([1, 2, 3])) if label_factor is None else label_factor
    rectified = draw(st.booleans())  # ReLU-like features: zero vectors inside masks
    generator = torch.Generator().manual_seed(seed)
    batch = sum(per_modality)
    modality = torch.tensor([MODALITY_IDS[j] for j, n in enumerate(per_modality) for _ in range(n)])
    modality = modality[torch.randperm(batch, generator=generator)]
    features_l = torch.randn(batch, m_channels, height, width, generator=generator)
    features_k = torch.randn(batch, n_channels, height, width, generator=generator)
    if rectified:
        features_l, features_k = features_l.clamp_min(0), features_k.clamp_min(0)
    labels = torch.randint(0, num_classes + 1, (batch, 1, height * factor, width * factor), generator=generator)
    return dict(features_l=features_l, features_k=features_k, labels=labels, modality=modality,
                num_classes=num_classes, generator=generator)


options = st.fixed_dictionaries(dict(
    area_normalization=st.sampled_from(["none", "pixels", "fraction"]),
    reading=st.sampled_from(["mean_squared", "literal"]),
    include_background=st.booleans()))


def _csa(batch, **kwargs):
    loss_fn = ClassSpecificAffinityLoss(batch["num_classes"], **kwargs)
    return loss_fn(batch["features_l"], batch["features_k"], batch["labels"], batch["modality"])


# --------------------------------------------------------------------------- CSA: hand-computed

def _hand_case():
    """Two samples (modality 0, modality 1), M=1, N=2, 2x2 maps, classes {0, 1}.

    sample A (modality 0): F(l) = [[1,2],[3,4]], F(k)_0 = [[1,0],[0,1]], F(k)_1 = [[0,1],[1,0]],
        labels [[0,0],[1,1]]: class 0 -> cos = [1/sqrt5, 2/sqrt5], S = 2 px;
        class 1 -> cos = [4/5, 3/5], S = 2 px.
    sample B (modality 1): F(l) = 1, F(k)_0 = [[1,1],[0,0]], F(k)_1 = [[0,0],[2,0]],
        labels [[0,1],[1,1]]: class 0 -> cos = [1, 0] (F(k)_1 is zero there), S = 1 px;
        class 1 -> cos = [1/sqrt3, 1/sqrt3], S = 3 px.
    """
    features_l = torch.tensor([[[[1., 2.], [3., 4.]]], [[[1., 1.], [1., 1.]]]])
    features_k = torch.tensor([[[[1., 0.], [0., 1.]], [[0., 1.], [1., 0.]]],
                               [[[1., 1.], [0., 0.]], [[0., 0.], [2., 0.]]]])
    labels = torch.tensor([[[[0, 0], [1, 1]]], [[[0, 1], [1, 1]]]])
    modality = torch.tensor([0, 1])
    return features_l, features_k, labels, modality


S5, S3 = math.sqrt(5), math.sqrt(3)
HAND_AFFINITIES = {  # area_normalization -> {(modality, class): A}
    "none": {(0, 0): [1 / S5, 2 / S5], (1, 0): [1, 0], (0, 1): [0.8, 0.6], (1, 1): [1 / S3, 1 / S3]},
    "pixels": {(0, 0): [1 / (2 * S5), 1 / S5], (1, 0): [1, 0], (0, 1): [0.4, 0.3],
               (1, 1): [1 / (3 * S3), 1 / (3 * S3)]},
    "fraction": {(0, 0): [2 / S5, 4 / S5], (1, 0): [4, 0], (0, 1): [1.6, 1.2],
                 (1, 1): [4 / (3 * S3), 4 / (3 * S3)]},
}
# L = 1/2 sum_c mean_i (A^{c,0}_i - A^{c,1}_i)^2, and the literal reading (mean_i ...)^2
HAND_LOSSES = {
    ("none", "mean_squared"): 0.2889146804839497, ("none", "literal"): 0.02211128160896016,
    ("pixels", "mean_squared"): 0.2143575882380727, ("pixels", "literal"): 0.025955888800577955,
    ("fraction", "mean_squared"): 3.429721411809163, ("fraction", "literal"): 0.41529422080924727,
}


@pytest.mark.parametrize("area_normalization", ["none", "pixels", "fraction"])
@pytest.mark.parametrize("reading", ["mean_squared", "literal"])
def test_csa_hand_computed(area_normalization, reading):
    loss_fn = ClassSpecificAffinityLoss(2, area_normalization=area_normalization, reading=reading)
    loss = loss_fn(*_hand_case())
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(HAND_LOSSES[(area_normalization, reading)], rel=1e-6)


@pytest.mark.parametrize("area_normalization", ["none", "pixels", "fraction"])
def test_csa_hand_computed_matrices(area_normalization):
    matrices = ClassSpecificAffinityLoss(2, area_normalization=area_normalization).affinity_matrices(*_hand_case())
    assert set(matrices) == set(HAND_AFFINITIES[area_normalization])
    for key, expected in HAND_AFFINITIES[area_normalization].items():
        assert matrices[key].shape == (1, 2)
        torch.testing.assert_close(matrices[key], torch.tensor([expected], dtype=torch.float32), rtol=1e-6, atol=1e-7)


def test_csa_hand_computed_without_background():
    # class 1 only: 0.5 * ((0.8 - 1/sqrt3)^2 + (0.6 - 1/sqrt3)^2) with S_c = 1
    expected = 0.5 * ((0.8 - 1 / S3) ** 2 + (0.6 - 1 / S3) ** 2)
    loss = ClassSpecificAffinityLoss(2, area_normalization="none", include_background=False)(*_hand_case())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("area_normalization, reading, expected", [
    # whole maps: sample A cos = [5/sqrt60, 5/sqrt60], sample B cos = [1/sqrt2, 1/2]
    ("fraction", "mean_squared", ((5 / math.sqrt(60) - 1 / math.sqrt(2)) ** 2 + (5 / math.sqrt(60) - 0.5) ** 2) / 2),
    ("none", "literal", ((5 / math.sqrt(60) - 1 / math.sqrt(2)) + (5 / math.sqrt(60) - 0.5)) ** 2 / 4),
    ("pixels", "mean_squared", 0.0007801618684423016),  # the first line / 4^2
])
def test_affinity_hand_computed(area_normalization, reading, expected):
    features_l, features_k, _, modality = _hand_case()
    loss_fn = AffinityLoss(area_normalization=area_normalization, reading=reading)
    assert loss_fn(features_l, features_k, None, modality).item() == pytest.approx(expected, rel=1e-6)
    matrices = loss_fn.affinity_matrices(features_l, features_k, None, modality)
    assert set(matrices) == {(0, WHOLE_MAP), (1, WHOLE_MAP)}


# --------------------------------------------------------------------------- CSA: against the naive loops

@HYPOTHESIS
@given(batch=batches(), opts=options)
def test_csa_matches_naive_loops(batch, opts):
    expected, expected_matrices = naive_csa(
        batch["features_l"], batch["features_k"], batch["labels"], batch["modality"], batch["num_classes"], **opts)
    loss_fn = ClassSpecificAffinityLoss(batch["num_classes"], **opts)
    args = (batch["features_l"], batch["features_k"], batch["labels"], batch["modality"])
    assert loss_fn(*args).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    matrices = loss_fn.affinity_matrices(*args)
    assert set(matrices) == set(expected_matrices)
    for key, matrix in matrices.items():
        torch.testing.assert_close(matrix.double(), expected_matrices[key], rtol=1e-4, atol=1e-5)


@HYPOTHESIS
@given(batch=batches(), opts=options)
def test_affinity_matches_naive_loops(batch, opts):
    opts.pop("include_background")
    expected, _ = naive_csa(batch["features_l"], batch["features_k"], None, batch["modality"], 0,
                            class_specific=False, **opts)
    loss = AffinityLoss(**opts)(batch["features_l"], batch["features_k"], batch["labels"], batch["modality"])
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_label_layouts_agree():
    generator = torch.Generator().manual_seed(3)
    features_l, features_k = torch.randn(4, 3, 4, 4, generator=generator), torch.randn(4, 2, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (4, 1, 8, 8), generator=generator)
    modality = torch.tensor([0, 1, 0, 1])
    loss_fn = ClassSpecificAffinityLoss(3)
    reference = loss_fn(features_l, features_k, labels, modality)
    assert reference.item() > 0
    for variant in (labels[:, 0], labels.float(), labels.to(torch.int16)):
        torch.testing.assert_close(loss_fn(features_l, features_k, variant, modality), reference)


def test_resize_labels_is_nearest_exact_like_nnunet():
    # 4x4 -> 2x2 picks the pixels (1,1), (1,3), (3,1), (3,3) (nnU-Net's deep-supervision targets do too)
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[0, 0, 1::2, 1::2] = torch.tensor([[1, 2], [3, 1]])
    assert resize_labels(labels, (2, 2)).tolist() == [[[1, 2], [3, 1]]]
    assert resize_labels(labels[:, 0].float(), (4, 4)).tolist() == labels[:, 0].tolist()


# --------------------------------------------------------------------------- CSA: properties

@HYPOTHESIS
@given(batch=batches(max_modalities=2, label_factor=1), opts=options)
def test_csa_zero_when_modalities_give_the_same_features(batch, opts):
    # modality 1 holds the samples of modality 0 with their pixels shuffled (features and
    # labels alike): no spatial alignment is needed for the affinities to agree
    first = batch["modality"] == batch["modality"][0]
    features_l, features_k, labels = batch["features_l"][first], batch["features_k"][first], batch["labels"][first]
    count, _, height, width = features_l.shape
    order = torch.randperm(height * width, generator=batch["generator"])

    def shuffle(x):
        return x.flatten(2)[..., order].reshape(x.shape)

    loss = ClassSpecificAffinityLoss(batch["num_classes"], **opts)(
        torch.cat([features_l, shuffle(features_l)]), torch.cat([features_k, shuffle(features_k)]),
        torch.cat([labels, shuffle(labels)]), torch.tensor([0] * count + [1] * count))
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


@HYPOTHESIS
@given(batch=batches(), opts=options, class_specific=st.booleans())
def test_csa_invariant_to_positive_scaling_of_features(batch, opts, class_specific):
    # the cosine is scale-invariant per channel: scale every (sample, channel) separately
    generator = batch["generator"]
    scale_l = torch.exp(torch.empty(*batch["features_l"].shape[:2], 1, 1).uniform_(-3, 3, generator=generator))
    scale_k = torch.exp(torch.empty(*batch["features_k"].shape[:2], 1, 1).uniform_(-3, 3, generator=generator))
    loss_fn = ClassSpecificAffinityLoss(batch["num_classes"], class_specific=class_specific, **opts)
    reference = loss_fn(batch["features_l"], batch["features_k"], batch["labels"], batch["modality"])
    scaled = loss_fn(batch["features_l"] * scale_l, batch["features_k"] * scale_k, batch["labels"], batch["modality"])
    assert scaled.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-7)


@HYPOTHESIS
@given(batch=batches(), opts=options)
def test_csa_invariant_to_sample_order(batch, opts):
    order = torch.randperm(batch["modality"].numel(), generator=batch["generator"])
    loss_fn = ClassSpecificAffinityLoss(batch["num_classes"], **opts)
    reference = loss_fn(batch["features_l"], batch["features_k"], batch["labels"], batch["modality"])
    permuted = loss_fn(batch["features_l"][order], batch["features_k"][order], batch["labels"][order],
                       batch["modality"][order])
    assert permuted.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-8)


@HYPOTHESIS
@given(batch=batches(), opts=options)
def test_literal_reading_never_exceeds_mean_squared(batch, opts):
    # (mean d)^2 <= mean d^2 (Jensen), class by class
    opts.pop("reading")
    literal = _csa(batch, reading="literal", **opts).item()
    mean_squared = _csa(batch, reading="mean_squared", **opts).item()
    assert literal <= mean_squared * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("loss_fn", [ClassSpecificAffinityLoss(3, area_normalization=a) for a in ("none", "pixels", "fraction")]
                         + [AffinityLoss()])
def test_csa_finite_on_degenerate_batches(loss_fn):
    generator = torch.Generator().manual_seed(0)

    def check(features_l, features_k, labels, modality, expect_zero=False):
        features_l = features_l.clone().requires_grad_(True)
        features_k = features_k.clone().requires_grad_(True)
        loss = loss_fn(features_l, features_k, labels, modality)
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
        if expect_zero:
            assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(features_l.grad).all() and torch.isfinite(features_k.grad).all()

    features_l = torch.randn(4, 3, 6, 6, generator=generator)
    features_k = torch.randn(4, 2, 6, 6, generator=generator)
    modality = torch.tensor([0, 0, 1, 1])
    labels = torch.randint(0, 3, (4, 1, 6, 6), generator=generator)
    # all-zero features
    check(torch.zeros_like(features_l), torch.zeros_like(features_k), labels, modality)
    check(features_l, torch.zeros_like(features_k), labels, modality)
    # a class present in one modality only; classes 1 and 2 absent everywhere
    check(features_l, features_k, torch.cat([torch.zeros(2, 1, 6, 6), torch.ones(2, 1, 6, 6)]).long(), modality,
          expect_zero=loss_fn.class_specific)
    # only the ignore value in one modality
    check(features_l, features_k, torch.cat([labels[:2], torch.full((2, 1, 6, 6), 3)]), modality,
          expect_zero=loss_fn.class_specific)
    # one sample per modality, and one pixel per class
    check(features_l[1:3], features_k[1:3], labels[1:3], modality[1:3])
    check(features_l[1:3, :, :1, :1], features_k[1:3, :, :1, :1], labels[1:3], modality[1:3])
    # one modality only
    check(features_l, features_k, labels, torch.zeros(4, dtype=torch.long), expect_zero=True)
    check(features_l[:1], features_k[:1], labels[:1], modality[:1], expect_zero=True)


@HYPOTHESIS
@given(batch=batches(max_modalities=2, min_size=3, label_factor=1), opts=options, class_specific=st.booleans())
def test_csa_gradients_reach_every_sample_of_both_modalities(batch, opts, class_specific):
    # every sample holds every class, at least two pixels each (a one-pixel cosine is +-1, flat)
    count, _, height, width = batch["features_l"].shape
    num_classes = batch["num_classes"]
    labels = torch.stack([(torch.randperm(height * width, generator=batch["generator"]) % num_classes)
                          .reshape(1, height, width) for _ in range(count)])
    features_l = torch.randn(batch["features_l"].shape, generator=batch["generator"], requires_grad=True)
    features_k = torch.randn(batch["features_k"].shape, generator=batch["generator"], requires_grad=True)
    loss = ClassSpecificAffinityLoss(num_classes, class_specific=class_specific, **opts)(
        features_l, features_k, labels, batch["modality"])
    loss.backward()
    assert set(batch["modality"].tolist()) == {0, 2}
    assert (features_l.grad.flatten(1).abs().sum(1) > 0).all()
    assert (features_k.grad.flatten(1).abs().sum(1) > 0).all()


def test_csa_float32_under_autocast():
    generator = torch.Generator().manual_seed(1)
    features_l = torch.randn(6, 8, 8, 8, generator=generator)
    features_k = torch.randn(6, 8, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (6, 1, 16, 16), generator=generator)
    modality = torch.tensor([0, 1, 0, 1, 0, 1])
    for loss_fn in (ClassSpecificAffinityLoss(4), AffinityLoss(area_normalization="pixels")):
        for inputs in ((features_l, features_k), (features_l.bfloat16(), features_k.bfloat16())):
            reference = loss_fn(inputs[0].float(), inputs[1].float(), labels, modality)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(*inputs, labels, modality)
                matrices = loss_fn.affinity_matrices(*inputs, labels, modality)
            assert loss.dtype == torch.float32
            assert all(m.dtype == torch.float32 for m in matrices.values())
            torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)


def test_csa_rejects_bad_arguments():
    with pytest.raises(ValueError, match="area_normalization"):
        ClassSpecificAffinityLoss(3, area_normalization="area")
    with pytest.raises(ValueError, match="reading"):
        ClassSpecificAffinityLoss(3, reading="squared_mean")
    with pytest.raises(ValueError, match="no class left"):
        ClassSpecificAffinityLoss(1, include_background=False)
    with pytest.raises(ValueError, match="eps"):
        ClassSpecificAffinityLoss(3, eps=0.0)
    loss_fn = ClassSpecificAffinityLoss(3)
    features = torch.randn(2, 3, 4, 4)
    modality = torch.tensor([0, 1])
    labels = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="spatial size"):
        loss_fn(features, torch.randn(2, 3, 2, 2), labels, modality)
    with pytest.raises(ValueError, match="one-hot"):
        loss_fn(features, features, torch.zeros(2, 3, 4, 4), modality)
    with pytest.raises(ValueError, match="modality"):
        loss_fn(features, features, labels, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="integer"):
        loss_fn(features, features, labels, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels are required"):
        loss_fn(features, features, None, modality)


def test_loss_adds_nothing_to_state_dict():
    assert ClassSpecificAffinityLoss(4).state_dict() == {}
    assert UnpairedKnowledgeDistillationLoss(4).state_dict() == {}


# --------------------------------------------------------------------------- UMMKD

def _kd_hand_case():
    """C = 3, 1x3 maps. Modality 0: labels [0,1,2], pixel logits [2,0,0], [0,0,0], [0,0,4]
    -> class means z0 = [2,0,0], z1 = [0,0,0], z2 = [0,0,4]. Modality 1: labels [0,0,1],
    pixel logits [1,0,0], [1,2,0], [0,2,0] -> z0 = [1,1,0], z1 = [0,2,0]; class 2 absent."""
    logits = torch.tensor([[[[2., 0., 0.]], [[0., 0., 0.]], [[0., 0., 4.]]],
                           [[[1., 1., 0.]], [[0., 2., 2.]], [[0., 0., 0.]]]])
    labels = torch.tensor([[[[0, 1, 2]]], [[[0, 0, 1]]]])
    return logits, labels, torch.tensor([0, 1])


def _softmax(z, temperature):
    exps = [math.exp(v / temperature) for v in z]
    return [e / sum(exps) for e in exps]


def _symmetric_kl(p, q):
    return 0.5 * (sum(a * math.log(a / b) for a, b in zip(p, q)) + sum(b * math.log(b / a) for a, b in zip(p, q)))


def test_ummkd_hand_computed_and_absent_class_skipped():
    expected = 0.5 * (_symmetric_kl(_softmax([2, 0, 0], 2), _softmax([1, 1, 0], 2))
                      + _symmetric_kl(_softmax([0, 0, 0], 2), _softmax([0, 2, 0], 2)))
    assert expected == pytest.approx(0.10621780375171688, rel=1e-12)
    kd = UnpairedKnowledgeDistillationLoss(3)
    loss = kd(*_kd_hand_case())
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # class 2 (modality 0 only) must not count. Counted with modality 1's missing mean taken as 0, the
    # loss would be this, far from the value above: so the equality above shows that the class is skipped
    counted = (2 * expected + _symmetric_kl(_softmax([0, 0, 4], 2), _softmax([0, 0, 0], 2))) / 3
    assert abs(counted - expected) > 0.1
    # temperature 1
    expected_t1 = 0.5 * (_symmetric_kl(_softmax([2, 0, 0], 1), _softmax([1, 1, 0], 1))
                         + _symmetric_kl(_softmax([0, 0, 0], 1), _softmax([0, 2, 0], 1)))
    assert ummkd_loss(*_kd_hand_case(), temperature=1.0).item() == pytest.approx(expected_t1, rel=1e-6)


@st.composite
def kd_batches(draw):
    batch = draw(batches(channels=1))
    generator = batch["generator"]
    count, _, height, width = batch["features_l"].shape
    logits = 3 * torch.randn(count, batch["num_classes"], height, width, generator=generator)
    return dict(logits=logits, labels=batch["labels"], modality=batch["modality"],
                num_classes=batch["num_classes"], generator=generator)


@HYPOTHESIS
@given(batch=kd_batches(), temperature=st.sampled_from([1.0, 2.0, 4.0]))
def test_ummkd_matches_naive_loops(batch, temperature):
    expected = naive_ummkd(batch["logits"], batch["labels"], batch["modality"], temperature)
    loss = UnpairedKnowledgeDistillationLoss(batch["num_classes"], temperature)(
        batch["logits"], batch["labels"], batch["modality"])
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


@HYPOTHESIS
@given(batch=kd_batches())
def test_ummkd_symmetric_in_the_modalities(batch):
    kd = UnpairedKnowledgeDistillationLoss(batch["num_classes"])
    reference = kd(batch["logits"], batch["labels"], batch["modality"])
    ids = sorted(set(batch["modality"].tolist()))
    swap = {old: new for old, new in zip(ids, reversed(ids))}
    swapped = torch.tensor([swap[m] for m in batch["modality"].tolist()])
    assert kd(batch["logits"], batch["labels"], swapped).item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-9)
    assert reference.item() >= 0


@HYPOTHESIS
@given(batch=kd_batches())
def test_ummkd_zero_for_identical_class_distributions(batch):
    # modality 1: the samples of modality 0 with their pixels shuffled (labels alike)
    first = batch["modality"] == batch["modality"][0]
    logits = batch["logits"][first]
    labels = _labels_at(batch["labels"][first], logits.shape[-2:])[:, None]
    count, _, height, width = logits.shape
    order = torch.randperm(height * width, generator=batch["generator"])

    def shuffle(x):
        return x.flatten(2)[..., order].reshape(x.shape)

    loss = UnpairedKnowledgeDistillationLoss(batch["num_classes"])(
        torch.cat([logits, shuffle(logits)]), torch.cat([labels, shuffle(labels)]),
        torch.tensor([3] * count + [1] * count))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_ummkd_gradients_autocast_and_degenerate_batches():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 6, 6, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (4, 1, 12, 12), generator=generator)
    modality = torch.tensor([0, 1, 1, 0])
    kd = UnpairedKnowledgeDistillationLoss(3)
    loss = kd(logits, labels, modality)
    loss.backward()
    assert (logits.grad.flatten(1).abs().sum(1) > 0).all()
    for inputs in (logits.detach(), logits.detach().bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_loss = kd(inputs, labels, modality)
        assert autocast_loss.dtype == torch.float32
        torch.testing.assert_close(autocast_loss, kd(inputs.float(), labels, modality), rtol=1e-6, atol=0)
    # one modality; no shared class: a connected zero
    for degenerate_labels, degenerate_modality in (
            (labels, torch.zeros(4, dtype=torch.long)),
            (torch.tensor([0, 1, 1, 0]).reshape(4, 1, 1, 1).expand(4, 1, 6, 6), modality)):
        grad_logits = logits.detach().clone().requires_grad_(True)
        zero = kd(grad_logits, degenerate_labels, degenerate_modality)
        assert zero.item() == 0.0 and zero.dtype == torch.float32
        zero.backward()
        assert torch.isfinite(grad_logits.grad).all()
    with pytest.raises(ValueError, match="logits must be"):
        kd(torch.randn(4, 2, 6, 6), labels, modality)
    with pytest.raises(ValueError, match="temperature"):
        UnpairedKnowledgeDistillationLoss(3, temperature=0)


# --------------------------------------------------------------------------- 3D feature maps

def _as_3d(batch, depth):
    """The batch's 2D maps (H = depth * h) cut into ``depth`` slabs: (B, C, depth, h, W). The
    equations run over all positions, so the loss must not change."""
    def cut(t):
        b, c, height, width = t.shape
        return t.reshape(b, c, depth, height // depth, width)
    return dict(batch, features_l=cut(batch["features_l"]), features_k=cut(batch["features_k"]),
                labels=cut(batch["labels"]))


@HYPOTHESIS
@given(batch=batches(label_factor=1), opts=options, depth=st.sampled_from([1, 2]), class_specific=st.booleans())
def test_3d_features_give_the_loss_of_the_same_positions_in_2d(batch, opts, depth, class_specific):
    if batch["features_l"].shape[2] % depth:
        depth = 1
    loss_class = ClassSpecificAffinityLoss if class_specific else AffinityLoss
    loss_2d = loss_class(batch["num_classes"], **opts)(batch["features_l"], batch["features_k"], batch["labels"],
                                                       batch["modality"])
    volume = _as_3d(batch, depth)
    assert volume["features_l"].ndim == 5
    loss_3d = loss_class(batch["num_classes"], **opts)(volume["features_l"], volume["features_k"], volume["labels"],
                                                       volume["modality"])
    assert torch.allclose(loss_3d, loss_2d, rtol=1e-5, atol=1e-7)


def test_3d_labels_are_resized_nearest_exact_in_all_three_axes():
    labels = torch.arange(4 * 6 * 8).reshape(1, 1, 4, 6, 8)
    # nearest-exact halving keeps the second voxel of every pair, in every axis, as nnU-Net's targets
    assert torch.equal(resize_labels(labels, (2, 3, 4)), labels[:, 0, 1::2, 1::2, 1::2])
    assert torch.equal(resize_labels(labels[:, 0], (4, 6, 8)), labels[:, 0])
    with pytest.raises(ValueError, match="for 3D features"):
        resize_labels(torch.zeros(1, 6, 8), (2, 3, 4))


def test_3d_csa_gradients_reach_both_modalities_and_mixed_dimensions_are_refused():
    features_l = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    features_k = torch.randn(2, 2, 2, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 8, 8))
    loss = ClassSpecificAffinityLoss(3)(features_l, features_k, labels, torch.tensor([0, 1]))
    loss.backward()
    assert loss > 0 and all(features_l.grad[b].abs().sum() > 0 for b in range(2))
    with pytest.raises(ValueError, match=r"\(B, channels, D, H, W\)"):
        ClassSpecificAffinityLoss(3)(features_l, torch.randn(2, 2, 4, 4), labels, torch.tensor([0, 1]))


@HYPOTHESIS
@given(batch=kd_batches(), temperature=st.sampled_from([1.0, 2.0]))
def test_3d_ummkd_gives_the_loss_of_the_same_positions_in_2d(batch, temperature):
    logits, labels, modality = batch["logits"], batch["labels"], batch["modality"]
    loss_2d = ummkd_loss(logits, labels, modality, temperature)
    b, c, height, width = logits.shape
    loss_3d = ummkd_loss(logits.reshape(b, c, 1, height, width), labels.reshape(b, 1, 1, *labels.shape[-2:]), modality,
                         temperature)
    assert torch.allclose(loss_3d, loss_2d, rtol=1e-5, atol=1e-7)
