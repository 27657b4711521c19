"""A command's output built in a hidden staging folder and moved into place whole; the staging folders
of a process killed before it could remove them (SIGKILL) do not pile up."""
import os
import socket
import subprocess
import sys

from nnunetv2_csa.atomic_files import staging_folder


def _dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def test_a_killed_runs_staging_folder_is_removed_and_no_other(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".exported_LGE.incomplete-{host}-{_dead_pid()}-abc123"
    running = tmp_path / f".exported_LGE.incomplete-{host}-{os.getpid()}-def456"  # this process: still running
    elsewhere = tmp_path / f".exported_LGE.incomplete-otherhost-{_dead_pid()}-ghi789"  # another machine's
    other_output = tmp_path / f".exported_C0.incomplete-{host}-{_dead_pid()}-jkl012"  # another output's
    users = tmp_path / ".exported_LGE.notes"
    for folder in (dead, running, elsewhere, other_output, users):
        folder.mkdir()
    new = staging_folder(str(tmp_path), "exported_LGE")
    assert os.path.basename(new).startswith(f".exported_LGE.incomplete-{host}-{os.getpid()}-")
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in (running, elsewhere, other_output, users)} | {
        os.path.basename(new)}
    assert not dead.exists()
