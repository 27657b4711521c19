"""Every console command of the package answers --help without importing torch (a new user's
first call should not wait 5-10 s for it) and prints its usage; errors a user can fix end in one
line, also in nnU-Net's own commands once they have imported this package's trainers."""
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    CONSOLE_SCRIPTS = tomllib.load(_f)["project"]["scripts"]

_PROBE = """
import sys
from {module} import {function} as main
sys.argv = [{name!r}, "--help"]
try:
    main()
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "TORCH_NOT_IMPORTED")
"""


@pytest.mark.parametrize("name", sorted(CONSOLE_SCRIPTS))
def test_help_answers_without_importing_torch(name):
    module, function = CONSOLE_SCRIPTS[name].split(":")
    completed = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, function=function, name=name)],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert f"usage: {name}" in completed.stdout
    assert completed.stdout.strip().endswith("TORCH_NOT_IMPORTED")


def test_importing_the_trainers_turns_this_packages_errors_into_one_line(trainer_import_probe):
    # two errors handed to the hook as the interpreter would, then a real uncaught one
    asked, other, ours = trainer_import_probe.stderr.split("=====\n")
    assert trainer_import_probe.returncode == 1
    assert ours.startswith("error: nnUNet_csa_modality is not set; this model knows [LGE, C0]\n")
    assert "Traceback" not in ours and "NNUNETV2_CSA_TRACEBACK=1" in ours
    assert "Traceback" in asked and "ModalityTagError: x" in asked
    # anything else is not this package's input error: the full traceback stays
    assert "Traceback" in other and "RuntimeError: a bug" in other


def test_a_console_commands_input_error_is_one_line_with_exit_status_2(tmp_path):
    completed = subprocess.run([sys.executable, "-c", "from nnunetv2_csa.tools.export import main; main()",
                                "-m", str(tmp_path / "missing"), "--modality", "LGE", "-o", str(tmp_path / "out")],
                               capture_output=True, text=True, cwd=ROOT, timeout=120,
                               env={**os.environ, "NNUNETV2_CSA_TRACEBACK": "0"})
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing' / 'plans.json'} does not exist: -m must be a trained model folder "
        f"(…/DatasetXXX/<trainer>__<plans>__<configuration>)"]
