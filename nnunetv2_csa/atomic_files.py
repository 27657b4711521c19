"""Writing a file whole or not at all: what every command of this package (the converters, the
tagging, the evaluation, the benchmark, the mixed prediction) uses for a file a reader may find
half-written otherwise."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(target: str, write: Callable[[str], None]) -> None:
    """``write(path)`` fills a temporary file beside ``target``, which is then renamed over
    ``target``: no reader, and no run interrupted half-way, ever finds half a file there."""
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".incomplete",
                                         dir=os.path.dirname(target))
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes it private (0600)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
