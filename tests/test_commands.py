"""The one way the tools run console commands (benchmark, demo, GPU check)."""
import subprocess
import sys

import pytest

from nnunetv2_csa.tools import commands


def test_an_installed_command_runs_its_entry_point_with_this_interpreter():
    command = commands.console_command("nnUNetv2_train")
    assert command[:3] == [sys.executable, "-P", "-c"]
    assert "sys.argv[0] = 'nnUNetv2_train'; from nnunetv2.run.run_training import run_training_entry" in command[3]
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
    assert command[:3] == [sys.executable, "-P", "-c"]
    assert "from nnunetv2_csa.tools.heldout import main as main" in command[3]
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


# ---------------------------------------------------------------- nothing from the working folder runs
PLANTED = "open('PLANTED_RAN', 'w').write('x')\nraise SystemExit(3)\n"


def _run_in_planted_folder(tmp_path, planted_module: str, command: list) -> subprocess.CompletedProcess:
    folder = tmp_path / "working_folder"
    folder.mkdir(parents=True)
    (folder / f"{planted_module}.py").write_text(PLANTED)
    completed = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)
    assert not (folder / "PLANTED_RAN").exists(), f"{folder}/{planted_module}.py ran:\n{completed.stderr[-2000:]}"
    return completed


def test_planted_module_runs_under_plain_python_c(tmp_path):
    # the negative control: what the tools started before (python -c), from the same folder, runs it
    _run_in_planted_folder(tmp_path / "a", "nnunetv2_csa", [sys.executable, "-c", "import sys"])  # nothing imported
    with pytest.raises(AssertionError, match="ran"):
        _run_in_planted_folder(tmp_path / "b", "nnunetv2_csa", [sys.executable, "-c", "import nnunetv2_csa"])


def test_console_commands_import_nothing_from_the_working_folder(tmp_path):
    # nnUNetv2_csa_predict's nnUNetv2_predict, the benchmark's nnUNetv2_train, the demo's and the GPU
    # check's commands all start through console_command
    from nnunetv2_csa.ext_trainers import TRAINER_DIR
    completed = _run_in_planted_folder(tmp_path, "nnunetv2_csa", commands.console_command("nnUNetv2_csa_trainer_dir"))
    assert completed.returncode == 0 and completed.stdout.strip() == TRAINER_DIR


def test_python_modules_the_tools_start_import_nothing_from_the_working_folder(tmp_path):
    # the benchmark's timing process (python -m nnunetv2_csa.tools.timing)
    completed = _run_in_planted_folder(tmp_path, "nnunetv2_csa",
                                       commands.python_command("-m", "nnunetv2_csa.tools.timing", "--help"))
    assert completed.returncode == 0 and "-tr" in completed.stdout


def test_workers_spawned_by_a_child_import_nothing_from_the_working_folder(tmp_path):
    # nnU-Net's worker pools start in spawn mode: each worker is a fresh interpreter that imports
    # multiprocessing first; it inherits the child's -P
    spawn = ("import multiprocessing as mp\nif __name__ == '__main__':\n    p = mp.get_context('spawn').Process("
             "target=print)\n    p.start(); p.join(); raise SystemExit(p.exitcode)")
    completed = _run_in_planted_folder(tmp_path, "multiprocessing", commands.python_command("-c", spawn))
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_planning_commands_run_whatever_nnunet_n_proc_da_is(monkeypatch):
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which refuses 0, the fastest
    # setting for training on a CPU; the planning commands run without it, every other command keeps it
    environment = {"nnUNet_n_proc_DA": "0", "other": "1"}
    for planning in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_plan_experiment"):
        assert commands.command_environment(planning, environment) == {"other": "1"}
    assert commands.command_environment("nnUNetv2_train", environment) == environment
    assert commands.command_environment("nnUNetv2_plan_experiment", {"nnUNet_n_proc_DA": "2"}) == \
        {"nnUNet_n_proc_DA": "2"}
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    assert "nnUNet_n_proc_DA" not in commands.command_environment("nnUNetv2_plan_and_preprocess", None)
    assert environment == {"nnUNet_n_proc_DA": "0", "other": "1"}  # the caller's dict is left as it was
