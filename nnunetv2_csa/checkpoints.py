"""Reading nnU-Net checkpoints without executing code from them.

A checkpoint is a pickle, and unpickling an untrusted file can run arbitrary code. Models
are shared between groups, so every command of this package that reads a checkpoint it
did not just write (the export, the benchmark's training logs) loads it with
``torch.load(weights_only=True)``, which only rebuilds tensors, containers and plain values,
plus an allow-list of exactly the other types nnU-Net puts into a checkpoint: NumPy scalars
and their dtypes (nnU-Net logs losses and pseudo Dice as ``np.float64``/``np.float32``).
Anything else is refused unless the user says ``--trust-checkpoint``.

nnU-Net's own commands (``nnUNetv2_train --c``, ``nnUNetv2_predict``) load checkpoints
with ``weights_only=False``; that is nnU-Net's behaviour and outside this package.
"""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import torch

from nnunetv2_csa.errors import UserInputError

try:  # NumPy 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # NumPy 1
    from numpy.core.multiarray import scalar as _numpy_scalar

#: the non-torch types in the checkpoints of every trainer of this package and of nnU-Net's own
#: trainer: NumPy's scalar constructor and the dtypes of the float32/float64 values it logs
NNUNET_CHECKPOINT_GLOBALS = (_numpy_scalar, np.dtype, type(np.dtype("float32")), type(np.dtype("float64")))


class CheckpointError(UserInputError, ValueError):
    """A checkpoint that cannot or must not be loaded; the message names the file and the fix."""


def load_checkpoint(path: str, trust: bool = False, map_location="cpu") -> dict:
    """The checkpoint at ``path``, unpickled safely (``trust=True``: as nnU-Net does, which
    can run code from the file)."""
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(NNUNET_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; the line that names the refused type is the useful one
        lines = [line.strip() for line in str(e).splitlines() if "got <" in line or "Unsupported global" in line]
        reason = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{path} holds objects that an nnU-Net checkpoint does not ({reason[:200]}); it was not loaded, "
            f"because loading it could run code from the file. If you trust where it comes from, pass "
            f"--trust-checkpoint") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{path} does not exist") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({str(e).strip().splitlines()[0][:200]}); "
                              f"it may be truncated or corrupt: copy it again, or retrain") from None


def check_checkpoint_readable(path: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless it is a complete torch checkpoint
    (a zip archive whose members pass their CRC check); reads the file once, runs nothing."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        broken = f"not a complete zip archive ({e})"
    if broken is not None:
        raise CheckpointError(f"{path} is not a readable checkpoint ({broken}); it may be truncated or corrupt: "
                              f"delete it to start again from an earlier checkpoint, or copy it again")
