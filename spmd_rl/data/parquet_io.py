"""Read and write verl-schema parquet files as lists of row dicts.

verl's data files hold one prompt per row with the columns ``data_source`` (str), ``prompt``
(list of ``{role, content}``), ``ability`` (str), ``reward_model`` (``{style, ground_truth}``) and
``extra_info`` (struct). pyarrow maps these nested structs to plain Python dicts and lists, so a
row read here is exactly what verl's own ``RLHFDataset`` sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from spmd_rl.errors import UserError


def as_file_list(files: str | Path | Sequence[str | Path]) -> list[str]:
    """Normalise one path or a list of paths to a non-empty list of strings."""
    if isinstance(files, (str, Path)):
        files = [files]
    out = [str(f) for f in files]
    if not out:
        raise UserError("no data files given: set data.train_files / data.val_files to parquet paths")
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read every row of one parquet file as a dict of Python values (nested structs -> dicts)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: check the path (relative paths resolve from {Path.cwd()})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # keep the message on one line
        raise UserError(f"data file {path} is not a readable parquet file ({reason})") from None
    return table.to_pylist()


def read_checked_rows(path: str | Path, required_columns: Sequence[str]) -> list[dict[str, Any]]:
    """Read one parquet file and check it is non-empty and has ``required_columns``."""
    rows = read_rows(path)
    if not rows:
        raise UserError(f"data file {path} has 0 rows: regenerate it or drop it from the file list")
    found = list(rows[0].keys())
    missing = [c for c in required_columns if c not in found]
    if missing:
        raise UserError(
            f"data file {path} lacks required column(s) {', '.join(missing)}; found columns: {', '.join(found)}"
            " (set data.prompt_key / data.response_key or rewrite the file in verl's schema)"
        )
    return rows


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write row dicts to one parquet file, creating parent folders; nested dicts become structs."""
    if not rows:
        raise ValueError(f"refusing to write an empty parquet file to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path
