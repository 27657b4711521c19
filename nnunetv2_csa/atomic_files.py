"""Writing a file or a folder whole or not at all: what every command of this package (the converters,
the tagging, the evaluation, the benchmark, the mixed prediction, the export, the held-out copy) uses
for what a reader may find half-written otherwise."""
from __future__ import annotations

import os
import re
import shutil
import socket
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


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _staging_prefix(label: str, pid: int) -> str:
    # the host and the process id: a folder left by a process that died without cleaning up (SIGKILL,
    # a power loss) is recognised as such on this host, and never one of a process still running elsewhere
    return f".{label}.incomplete-{socket.gethostname()}-{pid}-"


def staging_folder(parent: str, label: str) -> str:
    """A new hidden folder in ``parent`` in which a command builds its output ``label`` before moving it
    into place whole. Folders an earlier process of this host left behind when it was killed before it
    could remove them (its process is gone) are removed first."""
    stale = re.compile(rf"\.{re.escape(label)}\.incomplete-{re.escape(socket.gethostname())}-(\d+)-\w+")
    for name in os.listdir(parent):
        match = stale.fullmatch(name)
        if match and not _process_is_running(int(match[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=_staging_prefix(label, os.getpid()), dir=parent)

