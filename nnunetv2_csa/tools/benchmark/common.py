"""What every stage of the benchmark shares: its error type, its stage lines, JSON without NaN.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from tqdm import tqdm

from nnunetv2_csa.errors import UserInputError


FAILED = "FAILED"
NOT_AVAILABLE = "n/a"


class BenchmarkError(UserInputError, RuntimeError):
    """The benchmark cannot start (missing folders, unknown row, bad budget)."""


def log_stage(message: str) -> None:
    """One line per stage on stdout (progress bars go to stderr)."""
    tqdm.write(f"[benchmark] {message}", file=sys.stdout)
    sys.stdout.flush()


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value

