"""Converters from public cardiac challenge layouts to modality-tagged nnU-Net v2 raw datasets.

``convert_mscmrseg``, ``convert_mmwhs`` and ``convert_myops`` (console scripts
``nnUNetv2_csa_convert_mscmrseg`` / ``_mmwhs`` / ``_myops``) each return the written
``Dataset{ID:03d}_{Name}`` folder; the shared machinery lives in :mod:`dataset_conversion.common`.
"""
from dataset_conversion.errors import ConversionError, ConversionWarning


__all__ = ["ConversionError", "ConversionWarning", "convert_mscmrseg", "convert_mmwhs", "convert_myops"]

_CONVERTERS = {"convert_mscmrseg": "mscmrseg", "convert_mmwhs": "mmwhs", "convert_myops": "myops"}


def __getattr__(name):
    # imported on first use, so that ``python -m dataset_conversion.myops`` runs the module once
    if name in _CONVERTERS:
        import importlib
        return getattr(importlib.import_module(f"dataset_conversion.{_CONVERTERS[name]}"), name)
    raise AttributeError(f"module 'dataset_conversion' has no attribute {name!r}")
