"""The one way the tools run console commands (benchmark, demo, GPU check)."""
import subprocess
import sys

import pytest

from nnunetv2_csa.tools import commands


def test_an_installed_command_runs_its_entry_point_with_this_interpreter():
    command = commands.console_command("nnUNetv2_train")
    assert command[:2] == [sys.executable, "-c"]
    assert "sys.argv[0] = 'nnUNetv2_train'; from nnunetv2.run.run_training import run_training_entry" in command[2]
    # run here with a command that imports no torch; nnU-Net's own run this way in every integration test
    from nnunetv2_csa.ext_trainers import TRAINER_DIR
    completed = subprocess.run(commands.console_command("nnUNetv2_csa_trainer_dir"), capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == TRAINER_DIR


def test_console_command_falls_back_to_the_checkouts_pyproject_when_the_package_is_not_installed(monkeypatch):
    # on the GPU machine the package runs from the checkout: its console scripts are not installed
    monkeypatch.setattr(commands, "_script_beside_interpreter", lambda name: None)
    monkeypatch.setattr(commands.importlib.metadata, "entry_points", lambda group: [])
    commands._entry_point.cache_clear()
    try:
        command = commands.console_command("nnUNetv2_csa_heldout")
    finally:
        commands._entry_point.cache_clear()
    assert command[:2] == [sys.executable, "-c"]
    assert "from nnunetv2_csa.tools.heldout import main as main" in command[2]
    completed = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=commands.CHECKOUT)
    assert completed.returncode == 0 and "held-out" in completed.stdout


def test_a_script_beside_the_interpreter_that_no_entry_point_names_runs_as_it_is(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "some_tool"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho hello\n")
    monkeypatch.setattr(commands.sys, "executable", str(tmp_path / "bin" / "python"))
    assert commands.console_command("some_tool") == [str(script)]


def test_an_unknown_command_is_a_one_line_error_that_names_it(monkeypatch):
    with pytest.raises(commands.CommandNotFound, match="nnUNetv2_no_such_command is neither installed"):
        commands.console_command("nnUNetv2_no_such_command")


def test_run_console_appends_the_command_line_and_its_output_to_the_log_and_returns_its_exit_status(tmp_path):
    log_file = tmp_path / "log.txt"
    log_file.write_text("earlier\n")
    with open(log_file, "a") as log:
        completed = commands.run_console("nnUNetv2_csa_heldout", ["--no-such-option"], log)
    text = log_file.read_text()
    assert completed.returncode == 2
    assert text.startswith("earlier\n")
    assert "$ nnUNetv2_csa_heldout --no-such-option\n" in text
    assert "the following arguments are required: -d, -o" in text.split("$ nnUNetv2_csa_heldout")[1]
