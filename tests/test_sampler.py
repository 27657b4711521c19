"""The unpaired sampler: half-and-half batches, uniform and independent case draws,
nnU-Net's foreground oversampling applied within each modality block."""
import numpy as np
import pytest
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from scipy import stats

from nnunetv2_csa.modality import ModalityTagError, ModalityTags
from nnunetv2_csa.sampler import UnpairedModalityDataLoader, samples_per_modality

N_PATIENTS = 6


class FakeDataset:
    """What nnUNetDataLoader needs of nnU-Net's dataset: identifiers and load_case."""

    def __init__(self, identifiers, shape=(1, 4, 16, 16)):
        self.identifiers = list(identifiers)
        self.shape = shape

    def load_case(self, identifier):
        data = np.random.rand(*self.shape).astype(np.float32)
        seg = np.zeros(self.shape, dtype=np.int16)
        seg[:, :, 6:10, 6:10] = 1
        locations = np.argwhere(seg == 1)
        return data, seg, None, {"class_locations": {1: locations}}


def _tags(patients=N_PATIENTS, modalities=("LGE", "C0")):
    case_modality = {f"p{p}_{m}": m for p in range(patients) for m in modalities}
    return ModalityTags(tuple(modalities), case_modality)


def _loader(tags, batch_size=4, oversample=0.33, cases=None):
    dataset = FakeDataset(cases if cases is not None else sorted(tags.case_modality))
    label_manager = LabelManager({"background": 0, "heart": 1}, regions_class_order=None)
    return UnpairedModalityDataLoader(dataset, batch_size, (16, 16), (16, 16), label_manager,
                                      oversample_foreground_percent=oversample, modality_tags=tags)


def test_every_batch_is_half_and_half_and_carries_its_modality():
    tags = _tags()
    loader = _loader(tags, batch_size=6)
    for _ in range(20):
        batch = next(loader)
        modality = batch["modality"].tolist()
        assert modality == [0, 0, 0, 1, 1, 1]
        assert [tags.index_of_case(k) for k in batch["keys"]] == modality
        assert tuple(batch["data"].shape) == (6, 1, 16, 16)


def test_cases_of_each_modality_are_drawn_uniformly():
    np.random.seed(0)
    tags = _tags()
    loader = _loader(tags, batch_size=8)
    counts = {m: {c: 0 for c in tags.cases_of_modality(m)} for m in tags.modalities}
    for _ in range(300):
        for key in loader.get_indices():
            counts[tags.modality_of_case(key)][key] += 1
    for modality, per_case in counts.items():
        observed = np.array(list(per_case.values()))
        assert observed.sum() == 300 * 4
        # chi-square goodness of fit against the uniform distribution
        assert stats.chisquare(observed).pvalue > 1e-3, (modality, observed)


def test_modalities_are_drawn_independently_no_pairing():
    np.random.seed(1)
    tags = _tags()
    loader = _loader(tags, batch_size=2)
    same_patient = 0
    n = 3000
    for _ in range(n):
        first, second = loader.get_indices()
        same_patient += first.split("_")[0] == second.split("_")[0]
    # independent draws meet the same patient with probability 1 / N_PATIENTS
    assert stats.binomtest(same_patient, n, 1 / N_PATIENTS).pvalue > 1e-3


def test_foreground_oversampling_applies_within_each_modality_block():
    loader = _loader(_tags(), batch_size=6, oversample=0.33)
    loader.get_indices()
    forced = [loader.get_do_oversample(j) for j in range(6)]
    # nnU-Net's rule on a block of 3: the last round(3 * 0.33) = 1 sample is forced
    assert forced == [False, False, True, False, False, True]


@pytest.mark.parametrize("modalities", [("LGE", "C0"), ("C0", "LGE", "T2")])
def test_oversampling_forces_as_many_samples_as_nnunet_and_spreads_them_over_the_modalities(modalities):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    tags = _tags(modalities=modalities)
    # the rates nnU-Net's plans and its DDP split give a batch (0.33; 0 and 0.75 and 1 on ranks of a split batch)
    for oversample in (0.0, 0.33, 0.5, 0.75, 1.0):
        for batch_size in range(len(modalities), 13):
            loader = _loader(tags, batch_size=batch_size, oversample=oversample)
            for _ in range(len(modalities)):  # the rotations of the extra samples
                modality = np.array([tags.index_of_case(k) for k in loader.get_indices()])
                forced = np.array([loader.get_do_oversample(j) for j in range(batch_size)])
                stock = sum(nnUNetDataLoader._oversample_last_XX_percent(loader, j) for j in range(batch_size))
                assert forced.sum() == stock, (oversample, batch_size)
                per_modality = [int(forced[modality == m].sum()) for m in range(len(modalities))]
                blocks = np.bincount(modality, minlength=len(modalities))
                # as even as the blocks allow: a modality with fewer forced samples than another has no room
                assert all(a >= b - 1 or a == blocks[i] for i, a in enumerate(per_modality) for b in per_modality)
    # a batch of 2 (a rank's share of a small batch): nnU-Net forces one sample, so does the sampler
    loader = _loader(tags, batch_size=2 if len(modalities) == 2 else 3, oversample=0.33)
    loader.get_indices()
    assert sum(loader.get_do_oversample(j) for j in range(loader.batch_size)) == 1


def test_odd_batch_size_rotates_the_extra_sample():
    assert samples_per_modality(5, 2, 0) == [3, 2]
    assert samples_per_modality(5, 2, 1) == [2, 3]
    assert samples_per_modality(7, 3, 2) == [2, 2, 3]
    loader = _loader(_tags(), batch_size=3)
    sizes = [np.bincount(next(loader)["modality"].numpy(), minlength=2).tolist() for _ in range(4)]
    assert sizes == [[2, 1], [1, 2], [2, 1], [1, 2]]


def test_three_modalities_each_get_a_third():
    tags = _tags(modalities=("C0", "LGE", "T2"))
    batch = next(_loader(tags, batch_size=6))
    assert batch["modality"].tolist() == [0, 0, 1, 1, 2, 2]


def test_batch_smaller_than_the_number_of_modalities_is_refused():
    with pytest.raises(ValueError, match="at least one sample of each modality"):
        samples_per_modality(1, 2)


def test_split_without_cases_of_a_modality_is_refused_with_the_fix():
    tags = _tags()
    with pytest.raises(ModalityTagError, match=r"no cases of modality \['C0'\].*splits_final.json"):
        _loader(tags, cases=tags.cases_of_modality("LGE"))


def test_untagged_case_names_the_fix():
    tags = _tags()
    with pytest.raises(ModalityTagError, match="has no modality tag"):
        _loader(tags, cases=sorted(tags.case_modality) + ["stranger_MR"])
