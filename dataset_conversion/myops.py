"""MyoPS 2020 (myocardial pathology segmentation) -> nnU-Net v2 raw dataset.

Layout of the release: ``Case{ID}/Case{ID}_{C0,LGE,T2}.nii.gz`` (C0 = bSSFP; the three
sequences of a patient are co-registered) and one label per patient, ``Case{ID}_gd.nii.gz``,
shared by all its sequences (each image's grid is checked against it). Label codes: 200
myocardium, 500 LV blood pool, 600 RV blood pool, 1220 edema and 2221 scar (both inside the
myocardium). By default edema and scar merge into the myocardium, which gives MS-CMRSeg's
three classes; ``--keep-pathology`` keeps them as classes 4 (edema) and 5 (scar).

Cases are named ``Case{ID}_{SEQ}`` (e.g. ``Case3001_C0``); the patient id is ``Case{ID}``.

    nnUNetv2_csa_convert_myops -i /data/myops2020 -d 503 --modalities C0 LGE
"""
from __future__ import annotations

import argparse
import re
from typing import Sequence

from dataset_conversion.cases import LabelScheme, SourceCase
from dataset_conversion.common import (add_common_arguments, common_kwargs, index_unique, parse_modalities,
                                       run_conversion, run_main, scan_input)
from dataset_conversion.splits import DEFAULT_SEED


MODALITIES = ("C0", "LGE", "T2")
DEFAULT_MODALITIES = ("C0", "LGE")
DEFAULT_NAME = "MyoPS2020"
FILE_PATTERN = re.compile(r"Case(\d+)_(C0|LGE|T2|gd)\.nii(?:\.gz)?", re.IGNORECASE)


def myops_label_scheme(keep_pathology: bool = False) -> LabelScheme:
    names = ("background", "myocardium", "left_ventricle", "right_ventricle")
    if keep_pathology:
        return LabelScheme(names + ("edema", "scar"), {0: 0, 200: 1, 500: 2, 600: 3, 1220: 4, 2221: 5})
    return LabelScheme(names, {0: 0, 200: 1, 500: 2, 600: 3, 1220: 1, 2221: 1})


def find_myops_cases(input_folder: str, modalities: Sequence[str]) -> list[SourceCase]:
    images, labels = [], []
    for match, path in scan_input(input_folder, FILE_PATTERN):
        number, kind = int(match.group(1)), match.group(2)
        if kind.lower() == "gd":
            labels.append((number, path))
        else:
            images.append(((number, kind.upper()), path))
    images = index_unique(images, lambda k: f"the {k[1]} image of Case{k[0]}")
    labels = index_unique(labels, lambda k: f"the label (_gd) of Case{k}")
    return [SourceCase(f"Case{number}", modality, image, labels.get(number))
            for (number, modality), image in sorted(images.items()) if modality in modalities]


def convert_myops(input_folder: str, dataset_id: int, output_root: str | None = None, *,
                  name: str = DEFAULT_NAME, modalities: Sequence[str] = DEFAULT_MODALITIES,
                  keep_pathology: bool = False, crop: Sequence[int] | None = None, split: str = "5-fold",
                  seed: int = DEFAULT_SEED, unpaired: bool = False, unlabelled_to_imagesTs: bool = False,
                  overwrite: bool = False, num_processes: int = 1, preprocessed_root: str | None = None) -> str:
    """Convert MyoPS 2020 to ``<output_root>/Dataset{ID:03d}_{name}`` and return that folder.

    Labels: 1 myocardium (200, and 1220/2221 unless ``keep_pathology``), 2 LV (500),
    3 RV (600); with ``keep_pathology`` also 4 edema (1220) and 5 scar (2221).
    """
    modalities = parse_modalities(modalities, MODALITIES)
    cases = find_myops_cases(input_folder, modalities)
    return run_conversion(
        cases, converter="MyoPS 2020", source_folder=input_folder, dataset_id=dataset_id, name=name,
        modalities=modalities, scheme=myops_label_scheme(keep_pathology), output_root=output_root,
        description="MyoPS 2020 multi-sequence cardiac MR (C0 = bSSFP, LGE, T2), modality-tagged",
        reference="Zhuang, X., Li, L. (eds.) Myocardial Pathology Segmentation Combining Multi-Sequence CMR, "
                  "LNCS 12554, 2020; https://zmiclab.github.io/zxh/0/myops20/",
        licence="research use only (MyoPS 2020 terms)",
        crop=crop, split=split, seed=seed, unpaired=unpaired, unlabelled_to_imagesTs=unlabelled_to_imagesTs,
        overwrite=overwrite, num_processes=num_processes, preprocessed_root=preprocessed_root,
        options={"keep_pathology": keep_pathology})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_convert_myops",
        description="Convert MyoPS 2020 (Case{ID}/Case{ID}_{C0,LGE,T2}.nii.gz with one Case{ID}_gd.nii.gz label "
                    "per patient, anywhere under the input folder) into a modality-tagged nnU-Net v2 raw dataset. "
                    "Labels: 1 myocardium (200; edema 1220 and scar 2221 merged), 2 LV (500), 3 RV (600).")
    add_common_arguments(parser, MODALITIES, DEFAULT_MODALITIES, DEFAULT_NAME)
    parser.add_argument("--keep-pathology", action="store_true",
                        help="keep edema (1220) and scar (2221) as classes 4 and 5 instead of merging them into "
                             "the myocardium")
    args = parser.parse_args(argv)
    return run_main(convert_myops, args, input_folder=args.input, keep_pathology=args.keep_pathology,
                    **common_kwargs(args))


if __name__ == "__main__":
    raise SystemExit(main())
