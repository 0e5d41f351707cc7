"""Sharded checkpoints with DCP: written to a temp folder, renamed when complete, ``latest`` last.

Layout of ``<run_dir>/checkpoints``::

    step_000010/            model + optimizer shards of the actor (and critic) (DCP),
                            trainer_state.pt (rank 0) and rng_rank<R>.pt (every rank)
    latest                  text file naming the newest complete step folder

A crash or SIGKILL while saving leaves only a ``*.tmp`` folder behind (removed by the next save);
``latest`` still names the previous complete checkpoint. Old checkpoints are pruned
(``keep_last_k``) only after the new one is complete. With ``async_save`` the state is copied to
CPU at once and written by a background thread; it is committed (renamed, ``latest`` updated) at
the next save or at :meth:`Checkpointer.wait`.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from spmd_rl.durable_files import fsync_dir, fsync_tree, write_text_atomic
from spmd_rl.errors import UserError
from spmd_rl.trainer.rng import capture_rng_state, restore_rng_state

STEP_DIR = re.compile(r"step_(\d{6,})(\.old)?")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


Trained = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]  # "actor" / "critic" -> (model, optimizer)


class Checkpointer:
    """Saves and restores models with their optimizers, and a small trainer-state dict
    (schedulers, sampler, KL controller, step).

    Its collectives run on a process group of their own: its timeout (``timeout_s``) fits slow
    storage rather than a training step, and an async save's background thread never
    interleaves with the training collectives."""

    def __init__(self, run_dir: str | Path, rank: int, *, keep_last_k: int = 0, async_save: bool = False,
                 timeout_s: float = 3600):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last_k = keep_last_k
        self.async_save = async_save
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pending: tuple[Future, int] | None = None  # async save in flight: (future, step)

    def save(self, step: int, trained: Trained, trainer_state: dict) -> Path:
        """Write ``step``; returns its final folder (complete once :meth:`wait` returns when async)."""
        self.wait()
        tmp = self._tmp_dir(step)
        if self.rank == 0:
            for stale in self.root.glob("step_*.tmp"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(capture_rng_state(), tmp / f"rng_rank{self.rank}.pt")  # every rank its own generators
        if self.rank == 0:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        state = _state_dicts(trained)
        if self.async_save:  # copies the state to CPU now, writes in a thread
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group), step)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
            self._commit(step)
        return self.root / step_dir_name(step)

    def wait(self) -> None:
        """Finish and commit an async save in flight (every rank calls it at the same point)."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        future.result()
        self._commit(step)

    def _commit(self, step: int) -> None:
        """All ranks' files are in the temp folder: make it the checkpoint of ``step``."""
        self._barrier()
        if self.rank == 0:
            tmp, final = self._tmp_dir(step), self.root / step_dir_name(step)
            fsync_tree(tmp)
            aside = final.with_name(final.name + ".old")
            if final.exists():  # re-saving a step (resumed from an older checkpoint): keep the old one until replaced
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(tmp, final)
            fsync_dir(self.root)
            write_text_atomic(self.root / "latest", final.name)
            shutil.rmtree(aside, ignore_errors=True)
            self._prune(keep=final)
        self._barrier()

    def _prune(self, keep: Path) -> None:
        if self.keep_last_k <= 0:
            return
        for old in self.complete()[:-self.keep_last_k]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (by when they were written)."""
        found = [p for p in self.root.glob("step_*") if STEP_DIR.fullmatch(p.name) and _is_complete(p)]
        return sorted(found, key=lambda p: ((p / "trainer_state.pt").stat().st_mtime_ns, p.name))

    def has(self, step: int) -> bool:
        """A complete checkpoint of ``step`` exists."""
        return _is_complete(self.root / step_dir_name(step))

    def latest(self) -> Path | None:
        """The folder ``latest`` names; if that is missing or incomplete (a crash between the
        renames of a re-save), the most recently completed checkpoint."""
        marker = self.root / "latest"
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if _is_complete(path):
                return path
        complete = self.complete()
        return complete[-1] if complete else None

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
            dcp.load(state, checkpoint_id=str(path), process_group=self.group)
        except (Exception, CheckpointException) as e:  # e.g. a critic-less checkpoint into a run with a critic
            raise UserError(f"checkpoint {path} does not match this run's models {sorted(trained)} "
                            f"({_first_cause(e)}). "
                            "Resume with the same actor/critic setup (checkpoints from before the critic was "
                            "added store the policy as model/optim and cannot be resumed) or set trainer.resume=never") from e
        for name, (model, optimizer) in trained.items():
            if _dp_sharded(optimizer):
                set_model_state_dict(model, state[f"{name}/model"])
                optimizer.load_checkpoint_state(name, {key: state[key] for key in optimizer.checkpoint_state(name)})
            else:
                set_state_dict(model, optimizer, model_state_dict=state[f"{name}/model"],
                               optim_state_dict=state[f"{name}/optim"])
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh generators
            restore_rng_state(torch.load(rng_file, weights_only=True))
        return torch.load(path / "trainer_state.pt", weights_only=True)

    def _tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".tmp")

    def _barrier(self) -> None:
        dist.barrier(group=self.group)


def _first_cause(error: BaseException) -> str:
    """A one-line reason; DCP wraps per-rank failures (``failures``), whose text names the missing key."""
    failures = getattr(error, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        error = inner[0] if isinstance(inner, tuple) else inner  # (exception, traceback) in some versions
    text = " ".join(str(error).split())
    key = re.search(r"Missing key in checkpoint state_dict: [^.\s]+(?:\.[^.\s]+)*", text)
    return key.group(0) if key else (text[:300] or type(error).__name__)


def _is_complete(folder: Path) -> bool:
    """trainer_state.pt is written before the rename, DCP's .metadata last of the shards."""
    return (folder / "trainer_state.pt").is_file() and (folder / ".metadata").is_file()


def _dp_sharded(optimizer) -> bool:
    """An optimizer whose state is sharded over data parallel (the megatron backend's ZeRO-1):
    it lays out its own state dict (DTensors over the dp mesh, DCP reshards them)."""
    from spmd_rl.models.megatron.distributed_optimizer import ShardedAdamW  # pure python: no megatron-core

    return isinstance(optimizer, ShardedAdamW)


def _state_dicts(trained: Trained) -> dict:
    state = {}
    for name, (model, optimizer) in trained.items():
        if _dp_sharded(optimizer):
            state[f"{name}/model"] = get_model_state_dict(model)
            state.update(optimizer.checkpoint_state(name))
        else:
            state[f"{name}/model"], state[f"{name}/optim"] = get_state_dict(model, optimizer)
    return state
