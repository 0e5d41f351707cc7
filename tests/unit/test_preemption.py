"""``python -m spmd_rl.preemption``: a launcher that fails only because a signal stopped a run
which confirmed its save exits 0; every other outcome keeps its exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spmd_rl.preemption import PREEMPTED_FILE_ENV, confirmed_save, exit_code

REPO = Path(__file__).resolve().parents[2]

# Stands in for torchrun: says it is ready, then on SIGTERM (optionally) writes the marker like
# rank 0 does after its save, and exits 1 like torchrun re-raising the signal.
LAUNCHER = """
import os, signal, sys, time
from pathlib import Path
def stop(signum, frame):
    if sys.argv[1] == "save":
        Path(os.environ["SPMD_RL_PREEMPTED_FILE"]).write_text("saved step 3")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[2]).write_text("ready")
if sys.argv[1] == "fail":
    sys.exit(3)
time.sleep(60)
"""


def launch(tmp_path, mode: str, *, marker: Path | None) -> subprocess.Popen:
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k != PREEMPTED_FILE_ENV}
    if marker is not None:
        env[PREEMPTED_FILE_ENV] = str(marker)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "spmd_rl.preemption", sys.executable, str(script), mode, str(ready)],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    return proc


@pytest.mark.parametrize("mode, with_marker, expected", [
    ("save", True, 0),  # preempted and saved: success
    ("nosave", True, 1),  # signalled but nothing confirmed the save: the launcher's failure stands
    ("save", False, 1),  # no marker file configured: nothing can confirm
])
def test_sigterm_outcomes(tmp_path, mode, with_marker, expected):
    marker = tmp_path / "logs/preempted" if with_marker else None
    if marker is not None:
        marker.parent.mkdir()
    proc = launch(tmp_path, mode if with_marker else "nosave", marker=marker)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == expected, err
    if expected == 0:
        assert f"preemption: SIGTERM ended the launcher after the run saved its checkpoint ({marker}); exiting 0" in err


def test_failure_without_a_signal_keeps_its_code(tmp_path):
    marker = tmp_path / "preempted"
    marker.write_text("an earlier job's")  # even a fresh marker does not excuse a plain crash
    proc = launch(tmp_path, "fail", marker=marker)
    proc.communicate(timeout=30)
    assert proc.returncode == 3


def test_stale_marker_and_exit_codes(tmp_path):
    marker = tmp_path / "preempted"
    assert not confirmed_save(str(marker), 0.0) and not confirmed_save(None, 0.0)
    marker.write_text("x")
    os.utime(marker, (1000.0, 1000.0))
    assert not confirmed_save(str(marker), 2000.0)  # left by an earlier job
    assert confirmed_save(str(marker), 500.0)
    assert exit_code(0) == 0 and exit_code(3) == 3 and exit_code(-signal.SIGTERM) == 143


def test_usage_without_a_launcher():
    result = subprocess.run([sys.executable, "-m", "spmd_rl.preemption"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: python -m spmd_rl.preemption LAUNCHER")
