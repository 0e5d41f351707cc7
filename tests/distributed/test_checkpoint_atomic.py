"""SIGKILL at many points of a save never leaves the run without a loadable checkpoint.

A child process saves steps 1, 2, 3, ... in a loop, every parameter set to the step number; the
test kills it at staggered delays and then loads ``latest`` and checks that the folder it names is
complete and self-consistent (parameters, optimizer and trainer state all of that step)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spmd_rl.distributed.init import free_port, init_distributed
from spmd_rl.trainer.checkpoint import Checkpointer

torch.set_num_threads(1)
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """~2 M parameters (8 MB, plus 16 MB of Adam state): a save takes long enough to be hit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 512)).sum().backward()
    optimizer.step()  # optimizer state exists
    return model, optimizer


def fill(model, optimizer, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
            optimizer.state[p]["exp_avg"].fill_(step)


def save_forever(run_dir: str, async_save: bool, keep_last_k: int) -> None:
    """The child: save steps 1, 2, ... until killed (an async save overlaps the next fill)."""
    init_distributed(torch.device("cpu"))
    model, optimizer = make_model()
    ckpt = Checkpointer(run_dir, 0, keep_last_k=keep_last_k, async_save=async_save)
    step = 0
    while True:
        step += 1
        fill(model, optimizer, step)
        ckpt.save(step, {"actor": (model, optimizer)}, {"step": step})
        if step == 1:
            ckpt.wait()  # step 1 committed (async or not): the kills land in later saves
            print("saved 1", flush=True)


def check_latest(run_dir: Path, keep_last_k: int) -> int:
    """Load ``latest`` into a fresh model; every tensor must hold the step it names. Returns it."""
    ckpt = Checkpointer(run_dir, 0)
    path = ckpt.latest()
    assert path is not None, f"no loadable checkpoint in {run_dir}: {sorted(p.name for p in (run_dir / 'checkpoints').iterdir())}"
    model, optimizer = make_model()
    state = ckpt.load(path, {"actor": (model, optimizer)})
    step = int(path.name.removeprefix("step_"))
    assert state["step"] == step
    for p in model.parameters():
        assert torch.equal(p, torch.full_like(p, step)), f"{path.name} holds parameters of another step"
        assert torch.equal(optimizer.state[p]["exp_avg"], torch.full_like(p, step))
    if keep_last_k:
        assert len(ckpt.complete()) <= keep_last_k + 1  # +1: killed after the commit, before the prune
    return step


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_during_saves_leaves_latest_loadable(process_group, tmp_path, async_save):
    kills, steps_seen = 6, []
    for i in range(kills):
        run_dir = tmp_path / "run"  # the same folder every time: later saves land on earlier debris
        child = subprocess.Popen(
            [sys.executable, "-c", f"from tests.distributed.test_checkpoint_atomic import save_forever; "
                                   f"save_forever({str(run_dir)!r}, {async_save}, keep_last_k=2)"],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = child.stdout.readline()  # one committed save: the kill then lands in a later one
        assert first.startswith("saved"), first + child.stdout.read()[-2000:]
        time.sleep(0.013 + 0.061 * i)  # staggered over the phases of the next saves
        child.send_signal(signal.SIGKILL)
        child.wait()
        steps_seen.append(check_latest(run_dir, keep_last_k=2))
    assert len(set(steps_seen)) > 1  # the kills really landed at different points
