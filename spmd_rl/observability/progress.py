"""A tqdm progress bar on rank 0 only (other ranks get a no-op)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...
    def write(self, text: str) -> None: ...


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                mininterval=1.0, leave=True)
