"""Whether an image file is complete, before SimpleITK reads it; whether two images share a grid.

SimpleITK reads a truncated .nii.gz without complaint and fills the missing voxels with
zeros, which a score then takes for the image (documentation/layout.md, design notes). Every
reader of this package (the converters, the evaluation, the benchmark, the prediction) checks
files here first. What a file is (gzip-compressed, NIfTI)
is decided by its bytes or by its name in any case, never by a case-sensitive ending: the
converters find ``.NII.GZ`` files, and so must every check of them.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import zlib

import numpy as np

from nnunetv2_csa.errors import UserInputError


class IncompleteFileError(UserInputError, ValueError):
    """The file is truncated or its compressed stream is corrupt, or is no image a reader can open;
    the message names it."""


def check_name_encoding(path: str) -> None:
    """Raise :class:`IncompleteFileError` for a path that is not UTF-8: Python hands such a name
    over with surrogates, which SimpleITK's C++ readers cannot take (a crash, not an exception)
    and which no message can print."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")
        raise IncompleteFileError(f"{shown}: the file name is not UTF-8; rename the file (UTF-8 letters only)") \
            from None


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a complete NIfTI-1/2 file holds (vox_offset + voxel data), from its header;
    None for anything that is not NIfTI (then sitk's own reader is the only check)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n_dims = dims[0]
    if not 1 <= n_dims <= 7:
        return None
    n_voxels = int(np.prod([max(d, 1) for d in dims[1:n_dims + 1]], dtype=np.int64))
    return max(vox_offset, 348) + n_voxels * bitpix // 8


_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: str) -> bool:
    """Whether the file is gzip-compressed, by its first bytes: a name's ending (``.GZ``, none)
    must not decide which check a file gets."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def is_nifti_name(name: str) -> bool:
    """Whether a file name says NIfTI (.nii, .nii.gz), in any case: ``.NII.GZ`` is read by
    SimpleITK and nibabel alike, so it gets the same checks."""
    return name.lower().endswith((".nii", ".nii.gz"))


#: a file name of a common medical image format, a trailing space included: a command that reads
#: only some of them names the others it skips instead of passing over them silently
LOOKS_LIKE_IMAGE = re.compile(r"\.(nii|nii\.gz|mha|mhd|nrrd|nhdr|mgz|mnc|dcm|hdr|img)\s*$", re.IGNORECASE)


def images_not_read(names, file_ending: str) -> list[str]:
    """The names that look like image files (any format, any case) but do not end in ``file_ending``:
    what a command reading ``*{file_ending}`` passes over, and so must name."""
    return sorted(name for name in names if not name.endswith(file_ending) and LOOKS_LIKE_IMAGE.search(name))


def check_file_complete(path: str, dimensions: tuple[int, ...] = (2, 3)) -> None:
    """Raise :class:`IncompleteFileError` unless ``path`` is a complete image that SimpleITK (and so
    nnU-Net's readers) can open, of one of ``dimensions`` with one value per voxel: its name is UTF-8,
    a NIfTI file holds every byte its header promises and its gzip stream is whole, and the header
    reads (an empty file, a text file named ``.nii.gz`` and a 4D image each get one line naming the
    file). The one check every command runs before it hands an image to SimpleITK or nnU-Net."""
    check_name_encoding(path)
    _check_stream_complete(path)
    _check_header(path, dimensions)


def _check_header(path: str, dimensions: tuple[int, ...]) -> None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        size = os.path.getsize(path)
        what = "is empty (0 bytes)" if size == 0 else "is not an image SimpleITK can read"
        reason = str(e).strip().splitlines()[-1] if size else ""
        raise IncompleteFileError(f"{path} {what}{f' ({reason})' if reason else ''}; download or copy it "
                                  f"again, or remove it") from None
    if reader.GetDimension() not in dimensions:
        raise IncompleteFileError(f"{path} is a {reader.GetDimension()}D image; expected "
                                  f"{' or '.join(f'{d}D' for d in dimensions)} (one file per channel): split "
                                  f"it, or give the right file")
    if reader.GetNumberOfComponents() != 1:
        raise IncompleteFileError(f"{path} has {reader.GetNumberOfComponents()} components per voxel; expected "
                                  f"one (a grey-value or label image; one file per channel)")


def _check_stream_complete(path: str) -> None:
    try:
        if _is_gzip(path):
            total, header = 0, b""
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    if len(header) < 540:
                        header += chunk[:540 - len(header)]
                    total += len(chunk)
        else:
            total = os.path.getsize(path)
            with open(path, "rb") as f:
                header = f.read(540)
    except (EOFError, OSError, zlib.error) as e:
        raise IncompleteFileError(f"{path} is corrupt or truncated ({e}); download or copy it again") from None
    expected = _nifti_expected_bytes(header)
    if expected is not None and total < expected:
        raise IncompleteFileError(f"{path} is truncated: its header promises {expected} bytes, the file holds "
                                  f"{total}; download or copy it again")


def count_non_finite_voxels(path: str) -> int:
    """NaN/Inf voxels stored in a NIfTI file (0 for integer data and other formats).

    Read with nibabel, because SimpleITK's NIfTI reader turns NaN and Inf into 0: a file that
    looks clean through SimpleITK can still hand NaN to a nibabel-based reader, such as
    nnU-Net's NibabelIO."""
    if not is_nifti_name(path):
        return 0
    import nibabel

    image = nibabel.load(path)
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return 0  # integer storage holds no NaN: the header says so without reading the voxels again
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))


class NonFiniteVoxelsError(UserInputError, ValueError):
    """An image holds NaN or Inf voxels; the message names the file and the count."""


def check_finite(path: str) -> None:
    """Raise :class:`NonFiniteVoxelsError` if a NIfTI image holds NaN or Inf voxels."""
    n_bad = count_non_finite_voxels(path)
    if n_bad:
        raise NonFiniteVoxelsError(f"{path} holds {n_bad} NaN/Inf voxel(s): they would reach nnU-Net (its "
                                   f"normalisation then makes the whole image NaN); repair the file (or leave the "
                                   f"case out)")


#: Headers written by different tools (image and label, prediction and reference) differ in
#: the last digits; beyond these a difference is a real misalignment
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
ORIGIN_RTOL = 1e-4  # scanner-space origins of a few hundred mm, stored as float32
DIRECTION_ATOL = 1e-4


def grid_differences(a, b) -> list[str]:
    """How two SimpleITK images' voxel grids differ (size exactly; spacing, origin and
    direction within the tolerances above); empty when they share one grid."""
    if a.GetSize() != b.GetSize():
        return [f"size {a.GetSize()} vs {b.GetSize()}"]
    checks = (("spacing", a.GetSpacing(), b.GetSpacing(), SPACING_RTOL, 0.0),
              ("origin", a.GetOrigin(), b.GetOrigin(), ORIGIN_RTOL, ORIGIN_ATOL_MM),
              ("direction", a.GetDirection(), b.GetDirection(), 0.0, DIRECTION_ATOL))
    return [f"{what} {tuple(round(v, 6) for v in x)} vs {tuple(round(v, 6) for v in y)}"
            for what, x, y, rtol, atol in checks if not np.allclose(x, y, rtol=rtol, atol=atol)]
