"""Load a user's reward function from a Python file (``reward.custom_function.path``).

The function has verl's signature, so existing verl reward files work unchanged::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from spmd_rl.errors import UserError


def _module_name(path: Path) -> str:
    # unique per file, so two reward files that are both named reward.py do not collide
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"spmd_rl_custom_reward_{path.stem}_{digest}"


def load_custom_reward_function(path: str, name: str = "compute_score") -> Callable:
    """Import ``path`` as a module and return its callable ``name``.

    Raises:
        UserError: the file does not exist, or defines no callable ``name`` (the message lists
            the callables it does define). Errors raised by the file's own code propagate
            with their traceback, since they point at a line of the user's code.
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UserError(f"reward.custom_function.path: file not found: {path}; give the path of a Python file")
    module_name = _module_name(file)
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"reward.custom_function.path: cannot import {path} as Python; give a .py file")
    module = importlib.util.module_from_spec(spec)
    # registered before exec so that dataclasses/pickle inside the file can find the module
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(
            attr for attr, value in vars(module).items()
            if callable(value) and not attr.startswith("_") and not inspect.ismodule(value)
        )
        raise UserError(
            f"reward.custom_function.name: {path} has no function {name!r} "
            f"(callables found: {', '.join(found) or 'none'}); set reward.custom_function.name to one of them"
        )
    return fn
