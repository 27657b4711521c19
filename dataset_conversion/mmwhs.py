"""MM-WHS 2017 (multi-modality whole heart segmentation) -> nnU-Net v2 raw dataset.

Layout of the release: ``{ct,mr}_train_{ID}_image.nii.gz`` with ``_label.nii.gz``
(IDs 1001..1020 for each modality; CT and MR come from different patients). Label codes:
205 LV myocardium, 420 left atrium, 500 LV blood cavity, 550 right atrium, 600 RV blood
cavity, 820 ascending aorta, 850 pulmonary artery. The paper (Chen et al. 2020) segments
205, 420, 500 and 820 (the default here: the other three become background);
``--all-structures`` keeps all seven.

Known quirk of the real release: mr_train_1010_label contains code 421 for the left atrium;
421 is mapped to 420 with a warning naming the file (in any label file, so that a
re-exported release is handled too); every other unexpected code is an error.

Cases are named ``ct1001_CT`` / ``mr1001_MR``; the patient ids ``ct1001`` and ``mr1001``
differ because the CT and MR volumes with the same number are different people.

Coronal slicing (``--coronal``): the paper trains on 2D coronal slices. nnU-Net's 2d
configuration cuts slices along the first axis of the (transposed) numpy array, and its
planner puts the axis with the largest target spacing first (``np.argmax`` of the median
spacing, so on a tie the first axis, i.e. SimpleITK's third index axis, stays first).
``--coronal`` therefore reorients every image and label with ``sitk.DICOMOrient(..., "LIP")``
so that the third index axis runs anterior -> posterior: for (near-)isotropic volumes
nnU-Net then slices coronally. When the anterior-posterior spacing is not the largest (CT
volumes often have thicker axial slices), nnU-Net's default plan would pick another axis; the
converter then prints the stock planning command with the ``-overwrite_target_spacing`` that
makes the A-P value the largest (``coronal_target_spacing``). The 2d configuration keeps the
native in-plane spacing and does not resample along the slicing axis, so the data are not
coarsened; only the axis nnU-Net slices along changes.

    nnUNetv2_csa_convert_mmwhs -i /data/MMWHS2017 -d 502 --modalities CT MR --coronal
"""
from __future__ import annotations

import argparse
import re
from typing import Sequence

import numpy as np

from dataset_conversion.cases import CaseResult, LabelScheme, SourceCase
from dataset_conversion.common import (add_common_arguments, common_kwargs, index_unique, parse_modalities,
                                       run_conversion, run_main, scan_input)
from dataset_conversion.splits import DEFAULT_SEED


MODALITIES = ("CT", "MR")
DEFAULT_NAME = "MMWHS2017"
CORONAL_ORIENTATION = "LIP"  # index axes: x -> patient left, y -> inferior, z -> posterior
QUIRK_421 = ("code 421 mapped to 420 (left atrium): a known quirk of the MM-WHS 2017 release "
             "(mr_train_1010_label); check the file if this is not that one")
STRUCTURES = {  # code: class name, in code order
    205: "LV_myocardium", 420: "left_atrium", 500: "LV_blood_cavity", 550: "right_atrium",
    600: "RV_blood_cavity", 820: "ascending_aorta", 850: "pulmonary_artery",
}
PAPER_STRUCTURES = (205, 420, 500, 820)
FILE_PATTERN = re.compile(r"(ct|mr)_train_(\d+)_(image|label)\.nii(?:\.gz)?", re.IGNORECASE)


def mmwhs_label_scheme(all_structures: bool = False) -> LabelScheme:
    """The paper's four structures (the others -> background), or all seven."""
    kept = sorted(STRUCTURES) if all_structures else list(PAPER_STRUCTURES)
    code_to_class = {0: 0, **{code: 0 for code in STRUCTURES}}
    code_to_class.update({code: i + 1 for i, code in enumerate(kept)})
    code_to_class[421] = code_to_class[420]
    return LabelScheme(("background",) + tuple(STRUCTURES[c] for c in kept), code_to_class, {421: QUIRK_421})


def find_mmwhs_cases(input_folder: str, modalities: Sequence[str]) -> list[SourceCase]:
    images, labels = [], []
    for match, path in scan_input(input_folder, FILE_PATTERN):
        key = (match.group(1).upper(), int(match.group(2)))
        (labels if match.group(3).lower() == "label" else images).append((key, path))
    images = index_unique(images, lambda k: f"the {k[0]} image {k[1]}")
    labels = index_unique(labels, lambda k: f"the {k[0]} label {k[1]}")
    return [SourceCase(f"{modality.lower()}{number}", modality, image, labels.get((modality, number)))
            for (modality, number), image in sorted(images.items()) if modality in modalities]


def coronal_target_spacing(results: Sequence[CaseResult]) -> list[float] | None:
    """The ``-overwrite_target_spacing`` (numpy order z, y, x) that makes nnU-Net's planner put
    the anterior-posterior axis first, or None when its default already does.

    nnU-Net's planner transposes the axis of the largest target spacing first (``np.argmax``, so
    a tie keeps axis 0). The override raises the A-P value to the largest median spacing and
    keeps the others; the 2d configuration takes its in-plane spacing from the other two
    values and never resamples along the slicing axis, so 2d data keep their native
    resolution (3d_fullres would use the override too: plan it without)."""
    if not results:
        return None
    # what nnU-Net's planner computes: median spacing per axis, in numpy order (z, y, x)
    median_zyx = [float(v) for v in np.percentile(np.array([r.spacing_xyz[::-1] for r in results]), 50, axis=0)]
    if int(np.argmax(median_zyx)) == 0:
        return None
    return [max(median_zyx)] + median_zyx[1:]


def coronal_spacing_warnings(results: Sequence[CaseResult], dataset_id: int) -> list[str]:
    """Where nnU-Net's default 2d plan would not slice the reoriented volumes coronally (the
    A-P spacing, SimpleITK's third axis after LIP, is not the largest): the cases, and the
    planning command that slices coronally."""
    messages = []
    off = [r.case_id for r in results if max(r.spacing_xyz[:2]) > r.spacing_xyz[2]]
    if off:
        messages.append(f"{len(off)} case(s) have a coronal (anterior-posterior) spacing smaller than an in-plane "
                        f"one: {', '.join(off[:10])}{' ...' if len(off) > 10 else ''}")
    target = coronal_target_spacing(results)
    if target is not None:
        spacing = " ".join(f"{v:.6g}" for v in target)
        messages.append(f"nnU-Net's default plan would NOT slice this dataset coronally (the median anterior-posterior "
                        f"spacing is not the largest). Plan it with the override that does (2d slices keep their "
                        f"native in-plane spacing): nnUNetv2_extract_fingerprint -d {dataset_id} && "
                        f"nnUNetv2_plan_experiment -d {dataset_id} -overwrite_target_spacing {spacing} && "
                        f"nnUNetv2_preprocess -d {dataset_id} -c 2d")
    return messages


def convert_mmwhs(input_folder: str, dataset_id: int, output_root: str | None = None, *,
                  name: str = DEFAULT_NAME, modalities: Sequence[str] = MODALITIES, all_structures: bool = False,
                  coronal: bool = False, crop: Sequence[int] | None = None, split: str = "5-fold",
                  seed: int = DEFAULT_SEED, unpaired: bool = False, unlabelled_to_imagesTs: bool = False,
                  overwrite: bool = False, num_processes: int = 2, preprocessed_root: str | None = None) -> str:
    """Convert MM-WHS 2017 to ``<output_root>/Dataset{ID:03d}_{name}`` and return that folder.

    Labels (default): 1 LV myocardium (205), 2 left atrium (420, 421), 3 LV blood cavity (500),
    4 ascending aorta (820). ``all_structures``: 1..7 in code order. ``coronal``: reorient
    so that nnU-Net's 2d configuration slices coronally (see the module docstring).
    """
    modalities = parse_modalities(modalities, MODALITIES)
    cases = find_mmwhs_cases(input_folder, modalities)
    return run_conversion(
        cases, converter="MM-WHS 2017", source_folder=input_folder, dataset_id=dataset_id, name=name,
        modalities=modalities, scheme=mmwhs_label_scheme(all_structures), output_root=output_root,
        description="MM-WHS 2017 multi-modality whole heart segmentation (CT, MR), modality-tagged",
        reference="Zhuang, X., Shen, J. Multi-scale patch and multi-modality atlases for whole heart segmentation "
                  "of MRI. Medical Image Analysis 2016; https://zmiclab.github.io/zxh/0/mmwhs/",
        orientation=CORONAL_ORIENTATION if coronal else None, crop=crop, split=split, seed=seed,
        unpaired=unpaired, unlabelled_to_imagesTs=unlabelled_to_imagesTs, overwrite=overwrite,
        num_processes=num_processes, preprocessed_root=preprocessed_root,
        options={"all_structures": all_structures, "coronal": coronal},
        check_spacing=(lambda results: coronal_spacing_warnings(results, dataset_id)) if coronal else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_convert_mmwhs",
        description="Convert MM-WHS 2017 ({ct,mr}_train_{ID}_image.nii.gz / _label.nii.gz, anywhere under the "
                    "input folder) into a modality-tagged nnU-Net v2 raw dataset. Labels: 1 LV myocardium (205), "
                    "2 left atrium (420), 3 LV blood cavity (500), 4 ascending aorta (820); the rest background.")
    add_common_arguments(parser, MODALITIES, MODALITIES, DEFAULT_NAME, default_num_processes=2)
    parser.add_argument("--all-structures", action="store_true",
                        help="keep all seven structures (1..7 in code order 205, 420, 500, 550, 600, 820, 850)")
    parser.add_argument("--coronal", action="store_true",
                        help="reorient to LIP (third axis anterior-posterior) so that nnU-Net's 2d configuration "
                             "slices coronally as the paper does; where the spacing would make nnU-Net's default "
                             "plan choose another axis, prints the planning command that slices coronally")
    args = parser.parse_args(argv)
    return run_main(convert_mmwhs, args, input_folder=args.input, all_structures=args.all_structures,
                    coronal=args.coronal, **common_kwargs(args))


if __name__ == "__main__":
    raise SystemExit(main())
