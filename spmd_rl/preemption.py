"""Run a launcher so that a preemption the run saved through ends with exit code 0.

On preemption or near its time limit Slurm sends SIGTERM to each node's task, torchrun. torchrun
passes it on to its workers, which finish the step in flight, save a checkpoint and exit 0, but
torchrun itself then re-raises the signal and exits non-zero, so the job is reported as failed
although nothing was lost. This wrapper runs the launcher as its child, passes the signals it
gets on, and turns the launcher's failure into success when (a) a signal arrived and (b) the run
confirmed its preemption save: rank 0 writes the file named by ``SPMD_RL_PREEMPTED_FILE`` once
that checkpoint is committed (on a file system every node sees, e.g. the job's log folder).
Any other failure keeps its exit code.

    SPMD_RL_PREEMPTED_FILE=logs/job-42/preempted python -m spmd_rl.preemption torchrun ... -m spmd_rl.train ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PREEMPTED_FILE_ENV = "SPMD_RL_PREEMPTED_FILE"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def confirmed_save(marker: str | None, since: float) -> bool:
    """True when ``marker`` exists and was written at or after ``since`` (not left by an earlier job)."""
    if not marker:
        return False
    try:
        return os.stat(marker).st_mtime >= since
    except FileNotFoundError:
        return False


def exit_code(returncode: int) -> int:
    """A shell's exit status for a child's ``returncode`` (``-N``: killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m spmd_rl.preemption LAUNCHER [ARGS...]  (e.g. torchrun ... -m spmd_rl.train ...)",
              file=sys.stderr)
        return 2
    marker = os.environ.get(PREEMPTED_FILE_ENV)
    started = time.time() - 1.0  # file systems may store mtimes at a coarser resolution than time.time()
    received: list[int] = []
    child = subprocess.Popen(argv)

    def forward(signum, frame) -> None:
        received.append(signum)
        child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    returncode = child.wait()
    if returncode != 0 and received and confirmed_save(marker, started):
        print(f"preemption: {signal.Signals(received[0]).name} ended the launcher after the run saved its "
              f"checkpoint ({marker}); exiting 0", file=sys.stderr, flush=True)
        return 0
    return exit_code(returncode)


if __name__ == "__main__":
    sys.exit(main())
