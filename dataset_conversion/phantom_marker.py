"""The record the phantom generator (``nnunetv2_csa/tools/phantom.py``) leaves beside the data it
writes, read by the converters so that every dataset and report built on a phantom says that its
data are synthetic. Here, with the converters, so that they need not import the generator."""
from __future__ import annotations

import json
import os

#: written beside every phantom, so that a converter records (and every report can say) that
#: the data are synthetic, even though they carry a public dataset's names and codes
PHANTOM_MARKER = "nnunetv2_csa_phantom.json"


def read_phantom_marker(folder: str) -> dict | None:
    """What the phantom generator recorded in ``folder`` or below it (the converters search
    their input tree too): layout, seed, counts; None for data it did not write."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if PHANTOM_MARKER in files:
            with open(os.path.join(root, PHANTOM_MARKER)) as f:
                return json.load(f)
    return None
