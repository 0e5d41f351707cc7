"""Entry point of an RL run: ``torchrun -m spmd_rl.train --config x.yaml key=value ...``.

Every rank runs this same program; world size 1 (plain ``python -m``) is the same path."""

from __future__ import annotations

import sys

import torch.distributed

from spmd_rl.config import Config, check_world_size, load_config, parse_cli
from spmd_rl.distributed.init import destroy_distributed, exit_worker, init_parallel, resolve_device
from spmd_rl.errors import exit_on_user_error
from spmd_rl.trainer.ppo import PPOTrainer


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, float]:
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(Config, path, overrides)
    device = resolve_device(cfg.trainer.device)
    try:
        dims, mesh = init_parallel(cfg.parallel, device, cfg.trainer.collective_timeout_s)
        check_world_size(cfg, dims.dp_size)
        metrics = PPOTrainer.build(cfg, dims, mesh, device).fit()
        # Leave together: a rank that tears its groups down early can abort a peer still in them.
        torch.distributed.barrier()
        return metrics
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
    exit_worker(0)
