"""Run a function on N gloo ranks with ``mp.spawn`` (a stable stand-in for torch's private test bases)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from spmd_rl.distributed.init import free_port


def _worker(rank: int, world_size: int, port: int, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from spmd_rl.distributed.init import destroy_distributed, exit_worker, init_distributed

    init_distributed(torch.device("cpu"))
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_distributed()
    exit_worker(0)  # a failure raised above and reached mp.spawn's error queue instead


def run_on_ranks(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on each of ``world_size`` processes; re-raise failures."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
