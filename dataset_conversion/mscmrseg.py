"""MS-CMRSeg 2019 (multi-sequence cardiac MR segmentation) -> nnU-Net v2 raw dataset.

Layout of the release: ``patient{N}_{C0,LGE,T2}.nii.gz`` images (C0 = bSSFP) and
``patient{N}_{SEQ}_manual.nii.gz`` labels, spread over several folders (they are found
anywhere under the input folder); not every image has a label. Label codes: 200
myocardium, 500 left-ventricle blood pool, 600 right-ventricle blood pool.

Cases are named ``patient{NNN}_{SEQ}`` (e.g. ``patient001_LGE``); the patient id is
``patient{NNN}``.

    nnUNetv2_csa_convert_mscmrseg -i /data/MSCMRSeg2019 -d 501 --modalities LGE C0
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
DEFAULT_MODALITIES = ("LGE", "C0")
DEFAULT_NAME = "MSCMRSeg2019"
CARDIAC_SCHEME = LabelScheme(
    class_names=("background", "myocardium", "left_ventricle", "right_ventricle"),
    code_to_class={0: 0, 200: 1, 500: 2, 600: 3},
)
FILE_PATTERN = re.compile(r"patient(\d+)_(C0|LGE|T2)(_manual)?\.nii(?:\.gz)?", re.IGNORECASE)


def find_mscmrseg_cases(input_folder: str, modalities: Sequence[str]) -> list[SourceCase]:
    """Every image of the chosen modalities under ``input_folder``, with its label file or None."""
    images, labels = [], []
    for match, path in scan_input(input_folder, FILE_PATTERN):
        key = (int(match.group(1)), match.group(2).upper())
        (labels if match.group(3) else images).append((key, path))
    images = index_unique(images, lambda k: f"the image of patient {k[0]}, {k[1]}")
    labels = index_unique(labels, lambda k: f"the label of patient {k[0]}, {k[1]}")
    cases = []
    for (number, modality), image in sorted(images.items()):
        if modality in modalities:
            cases.append(SourceCase(f"patient{number:03d}", modality, image, labels.get((number, modality))))
    return cases


def convert_mscmrseg(input_folder: str, dataset_id: int, output_root: str | None = None, *,
                     name: str = DEFAULT_NAME, modalities: Sequence[str] = DEFAULT_MODALITIES,
                     crop: Sequence[int] | None = None, split: str = "5-fold", seed: int = DEFAULT_SEED,
                     unpaired: bool = False, unlabelled_to_imagesTs: bool = False, overwrite: bool = False,
                     num_processes: int = 1, preprocessed_root: str | None = None) -> str:
    """Convert MS-CMRSeg 2019 to ``<output_root>/Dataset{ID:03d}_{name}`` and return that folder.

    Labels: 0 background, 1 myocardium (200), 2 LV blood pool (500), 3 RV blood pool (600).
    See :func:`dataset_conversion.common.run_conversion` for the common options.
    """
    modalities = parse_modalities(modalities, MODALITIES)
    cases = find_mscmrseg_cases(input_folder, modalities)
    return run_conversion(
        cases, converter="MS-CMRSeg 2019", source_folder=input_folder, dataset_id=dataset_id, name=name,
        modalities=modalities, scheme=CARDIAC_SCHEME, output_root=output_root,
        description="MS-CMRSeg 2019 multi-sequence cardiac MR (C0 = bSSFP, LGE, T2), modality-tagged",
        reference="Zhuang, X. Multivariate mixture model for myocardial segmentation combining multi-source "
                  "images. IEEE TPAMI 2019; https://zmiclab.github.io/zxh/0/mscmrseg19/",
        crop=crop, split=split, seed=seed, unpaired=unpaired, unlabelled_to_imagesTs=unlabelled_to_imagesTs,
        overwrite=overwrite, num_processes=num_processes, preprocessed_root=preprocessed_root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_convert_mscmrseg",
        description="Convert MS-CMRSeg 2019 (patient{N}_{C0,LGE,T2}.nii.gz with patient{N}_{SEQ}_manual.nii.gz "
                    "labels, anywhere under the input folder) into a modality-tagged nnU-Net v2 raw dataset. "
                    "Labels: 1 myocardium (200), 2 LV (500), 3 RV (600).")
    add_common_arguments(parser, MODALITIES, DEFAULT_MODALITIES, DEFAULT_NAME)
    args = parser.parse_args(argv)
    return run_main(convert_mscmrseg, args, input_folder=args.input, **common_kwargs(args))


if __name__ == "__main__":
    raise SystemExit(main())
