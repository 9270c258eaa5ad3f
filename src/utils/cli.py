"""What every console command shares: user-facing errors as one line on stderr and exit status 2, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

USER_ERROR_EXIT = 2


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2 (a user error: bad input, missing file)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def run_reporting_errors(fn: Callable[..., Any], *args: Any, extra: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``fn(*args)``; a ``DifflabError`` (or one of ``extra``) becomes one ``error:`` line and exit status 2."""
    from difflab.utils.errors import DifflabError

    try:
        return fn(*args)
    except (DifflabError, *extra) as err:
        fail(str(err))


def console_command(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a ``@hydra.main`` function as a console command: checks that must run before Hydra composes (an
    optional launcher plugin named on the command line) fail as one ``error:`` line too."""

    @functools.wraps(hydra_main)
    def main() -> Any:
        from difflab.utils.extras import check_command_line

        run_reporting_errors(check_command_line, sys.argv[1:])
        return hydra_main()

    return main
