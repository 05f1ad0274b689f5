"""What every command-line tool shares: one-line errors and non-zero exits for bad input."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from tresnet_jax.errors import InputError

EXIT_INPUT_ERROR = 1
EXIT_INTERRUPTED = 130


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI's ``main(argv) -> exit code``: bad input and operating-system failures (disk
    full, permissions) print ``error: <reason>`` on one line and return 1, Ctrl-C returns 130;
    other exceptions are bugs and keep their traceback."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (InputError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapped
