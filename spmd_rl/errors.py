"""One-line errors for bad user input.

Entry points catch :class:`UserError` and print ``error: <message>`` without a traceback, so
every message must say what is wrong and how to fix it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


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


def training_checkpoint_hint(folder: str | os.PathLike) -> str:
    """For a message about a folder that should be an HF model: how to make one, when it is a
    training checkpoint (a DCP folder holds .metadata), else ""."""
    if not (Path(folder) / ".metadata").is_file():
        return ""
    return (f" ({folder} is a training checkpoint: export it with python -m spmd_rl.export {folder} OUT_DIR "
            "and use OUT_DIR)")
