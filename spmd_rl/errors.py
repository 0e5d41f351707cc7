"""One-line errors for bad user input.

Entry points catch :class:`UserError` and print ``error: <message>`` without a traceback, so
every message must say what is wrong and how to fix it.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user (config, data, paths): shown as one line, no traceback."""


def exit_on_user_error(main):
    """Decorate an entry point so a :class:`UserError` prints one line and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            for line in str(e).splitlines() or [""]:
                print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
