"""How the tools run a console command (nnU-Net's or this package's): as a user would, in a
fresh process with this interpreter, its output appended to a log file.

A fresh process because nnU-Net reads its environment (``nnUNet_raw``, ``nnUNet_extTrainer``,
``nnUNet_n_proc_DA``) at import; the same interpreter because a command found on PATH may
belong to another Python environment. The command's entry point (the function its script
calls, with the same arguments) runs with ``python -P -c`` rather than the script: nnU-Net's
worker pools start in spawn mode, and a spawned worker re-runs the main script's imports
(for ``nnUNetv2_train`` all of nnU-Net's training code), where after ``-c`` it imports only
what it runs, which makes a short training several seconds faster (its final validation starts
two such pools; documentation/layout.md, design notes). ``environment`` sets variables for what runs
in this process instead (nnU-Net reads some of them at each access).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import os
import signal
import subprocess
import sys
import tomllib
from typing import IO, Sequence

from nnunetv2_csa.errors import UserInputError


#: the checkout this package runs from, if it runs uninstalled (the GPU check does)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CommandNotFound(UserInputError, RuntimeError):
    """A console command is neither installed beside this interpreter nor an entry point."""


@contextlib.contextmanager
def environment(overrides: dict):
    """``os.environ`` with ``overrides`` (None: unset) for the duration."""
    saved = {key: os.environ.get(key) for key in overrides}

    def apply(values):
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    apply(overrides)
    try:
        yield
    finally:
        apply(saved)


#: nnU-Net's commands whose experiment planner calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which
#: refuses the value 0 (augmentation in the training process: the fastest setting for CPU training)
_PLANNING_COMMANDS = frozenset({"nnUNetv2_plan_and_preprocess", "nnUNetv2_plan_experiment"})


def python_command(*args: str) -> list[str]:
    """The argv that runs ``args`` (``-c code``, ``-m module`` or a script) with this interpreter and
    nothing of the current folder on ``sys.path`` (``-P``): a file such as ``torch.py`` or ``nnunetv2.py``
    in the folder a user starts a command from is never imported in place of the real module, in the
    child or in the workers nnU-Net spawns from it (they inherit the interpreter's flags)."""
    return [sys.executable, "-P", *args]


def command_environment(name: str, env: dict | None) -> dict | None:
    """The environment console command ``name`` runs with: ``env`` (None: this process's), without an
    ``nnUNet_n_proc_DA`` of 0 for nnU-Net's planning commands (see ``_PLANNING_COMMANDS``); every other
    command keeps it."""
    if name not in _PLANNING_COMMANDS:
        return env
    env = dict(os.environ if env is None else env)
    if env.get("nnUNet_n_proc_DA", "").strip() == "0":
        del env["nnUNet_n_proc_DA"]
    return env


def _script_beside_interpreter(name: str) -> str | None:
    script = os.path.join(os.path.dirname(sys.executable), name)
    return script if os.path.isfile(script) else None


@functools.lru_cache(maxsize=None)
def _entry_point(name: str) -> str | None:
    """``module:function`` of console command ``name``: installed distributions, then this
    checkout's pyproject.toml (the package runs uninstalled on the GPU machine)."""
    target = next((entry.value for entry in importlib.metadata.entry_points(group="console_scripts")
                   if entry.name == name), None)
    pyproject = os.path.join(CHECKOUT, "pyproject.toml")
    if target is None and os.path.isfile(pyproject):
        with open(pyproject, "rb") as f:
            target = tomllib.load(f).get("project", {}).get("scripts", {}).get(name)
    return target


def console_command(name: str) -> list[str]:
    """The argv prefix that runs console command ``name`` with this interpreter: its entry
    point with ``python -c`` (see the module's docstring); a script beside the interpreter
    that no entry point names, as it is."""
    target = _entry_point(name)
    if target is None:
        script = _script_beside_interpreter(name)
        if script:
            return [script]
        raise CommandNotFound(f"{name} is neither installed beside {sys.executable} nor an entry point of an "
                              f"installed package: install nnunetv2 and this package into that environment")
    module, function = target.split(":")
    return python_command(
        "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as main; sys.exit(main())")


def run_console(name: str, args: Sequence, log: IO[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run console command ``name`` with ``args``; a ``$ name args`` line with the time, then
    its stdout and stderr, are appended to the open text file ``log``. ``env``: the whole
    environment of the command (None: this process's), as :func:`command_environment` adapts it."""
    args = [str(a) for a in args]
    log.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')} $ {' '.join([name, *args])}\n")
    log.flush()
    return subprocess.run(console_command(name) + args, stdout=log, stderr=subprocess.STDOUT,
                          env=command_environment(name, env))


@contextlib.contextmanager
def sigterm_unwinds():
    """SIGTERM ends the command as Ctrl-C does, by an exception (``SystemExit(143)``) that unwinds
    through every ``finally`` and ``except BaseException``: a command's all-or-nothing cleanup
    (its staging folder removed) runs when it is terminated, not only when it is interrupted."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
