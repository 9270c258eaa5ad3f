"""What every console command shares: user-facing errors as one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from difflab.utils.errors import fail

FLAG = "--validate"
_STATE = {"on": False}  # set by each console command from its own command line (the Hydra callback reads it)


def take_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--validate``; validate mode is on for this command exactly when it was there."""
    _STATE["on"] = FLAG in argv
    return [a for a in argv if a != FLAG]


def requested() -> bool:
    """Whether the running command is in validate mode."""
    return _STATE["on"]


def worker_error_line(err: BaseException) -> str:
    """The error's own message: a user error raised in a DataLoader worker (a corrupt image) reaches the main process
    re-raised by torch with the worker's whole traceback in its text (``Caught CorruptDataError in DataLoader worker
    process 0. Original Traceback ...``); its last line is the message."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        for line in reversed(text.splitlines()):
            head, sep, message = line.partition(": ")
            if sep and head.rsplit(".", 1)[-1] == type(err).__name__:
                return message
    return text


def run_reporting_errors(fn: Callable[..., Any], *args: Any, extra: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``fn(*args)``; a ``DifflabError`` (or one of ``extra``) becomes one ``error:`` line and exit status 2,
    also when a DataLoader worker raised it."""
    from difflab.utils.errors import DifflabError

    try:
        return fn(*args)
    except (DifflabError, *extra) as err:
        fail(worker_error_line(err))


def console_command(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a ``@hydra.main`` function as a console command: checks that must run before Hydra composes (an
    optional launcher plugin named on the command line) fail as one ``error:`` line too, and ``--validate``
    (``difflab.validate_mode``) is taken off the command line before Hydra parses it."""

    @functools.wraps(hydra_main)
    def main() -> Any:
        from difflab.utils.extras import check_command_line

        sys.argv = take_flag(sys.argv)  # --validate: check, describe the run, write nothing
        try:
            run_reporting_errors(check_command_line, sys.argv[1:])
            return hydra_main()
        finally:
            take_flag([])  # validate mode ends with the command (in-process callers run several)

    return main
