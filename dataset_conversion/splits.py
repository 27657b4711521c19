"""Patient-grouped, modality-stratified splits, and the unpaired selection (each patient
contributes one modality).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from dataset_conversion.cases import SourceCase
from dataset_conversion.errors import ConversionError


DEFAULT_SEED = 12345  # the seed nnU-Net uses for its own 5-fold split


SPLIT_CHOICES = ("5-fold", "80-20")


def make_patient_splits(case_patient: Mapping[str, str], split: str = "5-fold", seed: int = DEFAULT_SEED,
                        case_modality: Mapping[str, str] | None = None) -> list[dict[str, list[str]]]:
    """nnU-Net ``splits_final.json`` content with all cases of a patient in one fold,
    stratified by modality.

    Patients are grouped into strata by the set of modalities they contribute (with
    ``--unpaired``: one modality each; with partial labels, e.g. MS-CMRSeg's LGE: the few
    patients labelled in that modality form a stratum of their own); within a stratum the
    order is a seeded permutation. Strata of patients with more modalities come first, then
    the rarer ones. Without ``case_modality`` all patients form one stratum.

    ``"5-fold"``: the strata are dealt one after the other over the 5 folds, the dealing
    position carrying on from one stratum to the next, so that every fold holds each
    stratum as evenly as the counts allow and the folds differ in size by at most one.
    ``"80-20"``: one fold; validation takes 20 % of the patients (at least one), drawn
    from the strata in turn, the paper's protocol; a few more if that is what it takes for
    every modality to be in validation (e.g. 2 of 5 patients with ``--unpaired``).
    """
    patients = sorted(set(case_patient.values()))
    if split == "5-fold":
        if len(patients) < 5:
            raise ConversionError(f"a 5-fold split needs at least 5 patients, the input has {len(patients)} "
                                  f"({patients}); use --split 80-20 or convert more patients")
    elif split == "80-20":
        if len(patients) < 2:
            raise ConversionError(f"an 80/20 split needs at least 2 patients, the input has {len(patients)}")
    else:
        raise ConversionError(f"unknown split {split!r}; choose one of {list(SPLIT_CHOICES)}")
    strata = _patient_strata(case_patient, case_modality or {}, seed)
    if split == "5-fold":
        dealt = [patient for _, stratum in strata for patient in stratum]
        val_sets = [set(dealt[k::5]) for k in range(5)]
    else:
        in_turn = [(signature, stratum[i]) for i in range(max(len(s) for _, s in strata))
                   for signature, stratum in strata if i < len(stratum)]
        n_val = max(1, int(round(0.2 * len(patients))))
        # a validation part without one of the modalities is of no use to the multi-modality
        # trainers: take further patients in turn while one is missing and training keeps one
        while n_val < len(in_turn) - 1:
            in_val = set().union(*(sig for sig, _ in in_turn[:n_val]))
            in_train = set().union(*(sig for sig, _ in in_turn[n_val + 1:]))
            candidate = in_turn[n_val][0]
            if not (set(candidate) - in_val) or not set(candidate) <= in_train:
                break
            n_val += 1
        val_sets = [{patient for _, patient in in_turn[:n_val]}]
    return [{"train": sorted(c for c, p in case_patient.items() if p not in val_p),
             "val": sorted(c for c, p in case_patient.items() if p in val_p)} for val_p in val_sets]


def _patient_strata(case_patient: Mapping[str, str], case_modality: Mapping[str, str],
                    seed: int) -> list[tuple[tuple, list[str]]]:
    """(modalities, patients) per group of patients that contribute the same modalities,
    the patients in a seeded order; groups with more modalities first, then the smaller ones."""
    signature: dict[str, set] = {}
    for case, patient in case_patient.items():
        signature.setdefault(patient, set()).add(case_modality.get(case))
    strata: dict[tuple, list[str]] = {}
    for patient in sorted(signature):
        strata.setdefault(tuple(sorted(signature[patient], key=str)), []).append(patient)
    rng = np.random.RandomState(seed)
    keys = sorted(strata, key=lambda k: (-len(k), len(strata[k]), tuple(map(str, k))))
    return [(key, [str(p) for p in rng.permutation(strata[key])]) for key in keys]


def check_splits_cover_modalities(splits: Sequence[Mapping[str, Sequence[str]]], case_modality: Mapping[str, str],
                                  modalities: Sequence[str], split: str) -> None:
    """Refuses splits whose training or validation part of a fold lacks a modality: the
    multi-modality trainers need every modality in both (unpaired batches, per-modality
    validation). Names the folds and the counts that make it impossible."""
    if len(modalities) < 2:
        return
    problems = []
    for k, fold in enumerate(splits):
        for part in ("train", "val"):
            present = {case_modality[c] for c in fold[part]}
            missing = [m for m in modalities if m not in present]
            if missing:
                part_name = "training" if part == "train" else "validation"
                problems.append(f"fold {k} {part_name} has no {'/'.join(missing)}")
    if problems:
        patients_per_modality = {m: len({c for c, cm in case_modality.items() if cm == m}) for m in modalities}
        raise ConversionError(
            f"the {split} split cannot give every fold all modalities: {'; '.join(problems)} "
            f"(labelled cases per modality: {patients_per_modality}; each fold needs at least one in training and "
            f"one in validation). {'Use --split 80-20, c' if split == '5-fold' else 'C'}onvert more patients, or "
            f"drop the rare modality from --modalities")


def select_unpaired(cases: Sequence[SourceCase], modalities: Sequence[str], seed: int) -> list[SourceCase]:
    """One modality per patient: patients in a seeded random order, each given the modality
    (among those it has) that has the fewest patients so far, ties broken by modality order.
    With complete data this alternates, so the modalities get equally many patients (+-1)."""
    if len(modalities) < 2:
        raise ConversionError("--unpaired needs at least two modalities (each patient keeps only one)")
    by_patient: dict[str, dict[str, SourceCase]] = {}
    for case in cases:
        by_patient.setdefault(case.patient, {})[case.modality] = case
    counts = {m: 0 for m in modalities}
    chosen = []
    for patient in np.random.RandomState(seed).permutation(sorted(by_patient)):
        available = [m for m in modalities if m in by_patient[patient]]
        modality = min(available, key=lambda m: (counts[m], modalities.index(m)))
        counts[modality] += 1
        chosen.append(by_patient[patient][modality])
    return sorted(chosen, key=lambda c: c.case_id)

