"""Converters from public cardiac challenge layouts to modality-tagged nnU-Net v2 raw datasets.

``convert_mscmrseg``, ``convert_mmwhs`` and ``convert_myops`` (console scripts
``nnUNetv2_csa_convert_mscmrseg`` / ``_mmwhs`` / ``_myops``) each return the written
``Dataset{ID:03d}_{Name}`` folder; the shared machinery lives in :mod:`dataset_conversion.common`.
"""
from dataset_conversion.common import ConversionError, ConversionWarning
from dataset_conversion.mmwhs import convert_mmwhs
from dataset_conversion.mscmrseg import convert_mscmrseg
from dataset_conversion.myops import convert_myops

__all__ = ["ConversionError", "ConversionWarning", "convert_mscmrseg", "convert_mmwhs", "convert_myops"]
