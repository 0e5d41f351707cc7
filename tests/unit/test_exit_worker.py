"""A finished rank ends with its exit code and every buffered line printed, skipping teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, logging, sys
from spmd_rl.distributed.init import exit_worker
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
atexit.register(lambda: print("teardown ran"))
print("buffered line", end="")  # no newline: still in the buffer when the process ends
logging.getLogger("x").info("logged line")
exit_worker(3)
"""


def test_exit_worker_flushes_output_and_keeps_the_exit_code_without_teardown():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3
    assert result.stdout == "buffered line"  # flushed, and the atexit hook never ran
    assert "logged line" in result.stderr
