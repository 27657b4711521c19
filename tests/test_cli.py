"""Every console command of the package answers --help without importing torch (a new user's
first call should not wait 5-10 s for it) and prints its usage."""
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
