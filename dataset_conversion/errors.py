"""The converters' two ways of telling the user: an error that stops (naming the file and the fix)
and a warning that does not.
"""
from __future__ import annotations

from nnunetv2_csa.errors import UserInputError


class ConversionError(UserInputError):
    """Bad input or a bad request: the message names the file and the fix."""


class ConversionWarning(UserWarning):
    """Something the user should know about, but that does not stop the conversion."""

