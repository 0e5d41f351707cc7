"""Process-group setup: the same path for torchrun and a plain ``python`` (world size 1)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from spmd_rl.errors import UserError


def free_port() -> int:
    """A TCP port on localhost that is free right now (for a one-machine rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(choice: str = "auto") -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is chosen or available, else CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu or auto")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout_s: int = 1800) -> tuple[int, int]:
    """Initialise the default process group (gloo on CPU, nccl on CUDA); return (rank, world).

    Without torchrun's environment this becomes a one-rank group, so the rest of the code never
    special-cases world size 1."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        # On GPU, CPU tensors (metrics, counts, objects) still need a backend: gloo beside nccl.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int = 0):
    """End a finished rank without Python's interpreter teardown.

    A gloo worker thread can drop the last tensors of a finished collective a moment after the
    main thread moved on; if that lands during interpreter finalization the thread cannot take
    the GIL and the whole process aborts (SIGABRT, "terminate called without an active
    exception") although the run succeeded. Callers have closed their files and trackers."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_parallel(parallel_cfg, device: torch.device, timeout_s: int = 1800):
    """Process group, validated degrees and the named mesh of an entry point: ``(dims, mesh)``.
    ``timeout_s`` bounds every collective, so a dead or stuck rank ends the run instead of hanging it.

    On CPU the ranks of one machine share its cores, so each takes its share of the threads."""
    from spmd_rl.distributed.parallel_dims import ParallelDims

    _, world_size = init_distributed(device, timeout_s)
    p = parallel_cfg
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.sp, p.tp, p.pp, world_size, ep=p.ep)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    return dims, dims.build_mesh(device.type)
