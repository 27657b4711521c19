"""One line for an error the user can fix, a traceback for everything else.

Every error class this package raises for input a user can fix (a file, an option, a model
folder) derives from :class:`UserInputError`; its message names the file and the fix. The
console commands of this package print it as one line ``error: <message>`` on stderr and
exit with status 2. nnU-Net's own commands (``nnUNetv2_train``, ``nnUNetv2_predict``) import
this package's trainers; :func:`install_one_line_errors` gives them the same line for this
package's errors only, through ``sys.excepthook`` (Python's hook for uncaught exceptions),
and leaves every other exception to the usual traceback.

``NNUNETV2_CSA_TRACEBACK=1`` shows the full traceback instead of the line.
"""
from __future__ import annotations

import functools
import os
import sys

TRACEBACK_ENV = "NNUNETV2_CSA_TRACEBACK"


class UserInputError(Exception):
    """Base of the errors a user can fix; the message says what and how."""


def first_few(items, limit: int) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are: what a message
    about many files or cases names."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def tracebacks_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV) == "1"


def _print_line(error: BaseException) -> None:
    print(f"error: {error}", file=sys.stderr)


def one_line_errors(*also: type[BaseException]):
    """Decorator for a console command's ``main``: a :class:`UserInputError` (or one of
    ``also``) ends the command with one ``error:`` line and exit status 2."""
    caught = (UserInputError, *also)

    def decorate(main):
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except caught as error:
                if tracebacks_wanted():
                    raise
                _print_line(error)
                sys.exit(2)
        return wrapper
    return decorate


def _one_line_excepthook(previous):
    def hook(kind, error, traceback):
        if isinstance(error, UserInputError) and not tracebacks_wanted():
            _print_line(error)
            print(f"(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        else:
            previous(kind, error, traceback)
    hook.csa_one_line_errors = True
    return hook


def install_one_line_errors() -> None:
    """For nnU-Net's own commands: this package's errors reach the user as one line. Idempotent."""
    if not getattr(sys.excepthook, "csa_one_line_errors", False):
        sys.excepthook = _one_line_excepthook(sys.excepthook)
