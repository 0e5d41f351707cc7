"""Sharded checkpoints with DCP: written to a temp folder, renamed when complete, ``latest`` last.

Layout of ``<run_dir>/checkpoints``::

    step_000010/            model + optimizer shards of the actor (and critic) (DCP),
                            trainer_state.pt (rank 0) and rng_rank<R>.pt (every rank)
    latest                  text file naming the newest complete step folder

A crash while saving leaves only a ``*.tmp`` folder behind; ``latest`` still names the previous
complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from spmd_rl.errors import UserError
from spmd_rl.trainer.rng import capture_rng_state, restore_rng_state


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


Trained = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]  # "actor" / "critic" -> (model, optimizer)


class Checkpointer:
    """Saves and restores models with their optimizers, and a small trainer-state dict
    (schedulers, sampler, KL controller, step)."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank

    def save(self, step: int, trained: Trained, trainer_state: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(_state_dicts(trained), checkpoint_id=str(tmp))
        torch.save(capture_rng_state(), tmp / f"rng_rank{self.rank}.pt")  # every rank its own generators
        dist.barrier()
        if self.rank == 0:
            torch.save(trainer_state, tmp / "trainer_state.pt")
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", final.name)
        dist.barrier()
        return final

    def has(self, step: int) -> bool:
        """A complete checkpoint of ``step`` exists."""
        return (self.root / step_dir_name(step) / "trainer_state.pt").is_file()

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    def resolve(self, resume: str) -> Path | None:
        """``auto`` = latest if any, ``never`` = None, anything else = that checkpoint path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "trainer_state.pt").is_file():
            raise UserError(f"trainer.resume={resume} is not a checkpoint folder (no trainer_state.pt): "
                            "use auto, never, or a checkpoints/step_XXXXXX folder")
        return path

    def load(self, path: Path, trained: Trained) -> dict:
        """Restore models and optimizers in place; return the trainer state."""
        state = _state_dicts(trained)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # e.g. resuming a critic-less checkpoint into a run with a critic
            raise UserError(f"checkpoint {path} does not match this run's models {sorted(trained)} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
                            "Resume with the same actor/critic setup (checkpoints from before the critic was "
                            "added store the policy as model/optim and cannot be resumed) or set trainer.resume=never") from e
        for name, (model, optimizer) in trained.items():
            set_state_dict(model, optimizer, model_state_dict=state[f"{name}/model"],
                           optim_state_dict=state[f"{name}/optim"])
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh generators
            restore_rng_state(torch.load(rng_file, weights_only=True))
        return torch.load(path / "trainer_state.pt", weights_only=True)


def _state_dicts(trained: Trained) -> dict:
    state = {}
    for name, (model, optimizer) in trained.items():
        state[f"{name}/model"], state[f"{name}/optim"] = get_state_dict(model, optimizer)
    return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
