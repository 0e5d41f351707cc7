"""Tensor parallelism and FSDP over NCCL on 2 GPUs equal one process (skipped below 2 GPUs)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spmd_rl.distributed.init import free_port
from tests.distributed.test_model_parallel import ARGS, full, global_batch, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _worker(rank, world_size, port, degrees, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from spmd_rl.distributed.collectives import all_reduce_sum, clip_grad_norm_
    from spmd_rl.distributed.init import destroy_distributed, init_distributed, resolve_device
    from spmd_rl.distributed.parallel_dims import ParallelDims
    from spmd_rl.distributed.parallelize import apply_fsdp, apply_model_parallel
    from spmd_rl.models import build_model
    from spmd_rl.trainer.optim import build_optimizer
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs
    from tests.distributed.test_model_parallel import OPTIM

    device = resolve_device("cuda")
    init_distributed(device)
    try:
        dims = ParallelDims(*degrees, 1, world_size)
        mesh = dims.build_mesh("cuda")
        decoder = build_model(None, args=ARGS, seed=0, device=device)
        policy = apply_fsdp(PolicyModel(decoder, sp_group=apply_model_parallel(decoder, dims, mesh)), dims.fsdp_mesh(mesh))
        prompts, responses = global_batch()
        share = len(prompts) // dims.dp_size
        mine = slice(mesh["dp"].get_local_rank() * share, (mesh["dp"].get_local_rank() + 1) * share)
        optimizer = build_optimizer(policy, OPTIM)
        tokens = all_reduce_sum(sum(map(len, responses[mine])), mesh["dp"].get_group(), device)
        logprobs, _ = policy(build_scoring_inputs(prompts[mine], responses[mine], device))
        (-logprobs.sum() / tokens * dims.dp_size).backward()
        clip_grad_norm_(policy.parameters(), OPTIM.grad_clip)
        optimizer.step()
        params = {k: full(v).cpu() for k, v in policy.decoder.state_dict().items()}
        if rank == 0:
            torch.save(params, out_path)
        dist.barrier()
    finally:
        destroy_distributed()


@pytest.mark.parametrize("degrees", [(1, 1, 1, 2), (1, 1, 2, 1), (1, 2, 1, 1)], ids=["tp2", "sp2", "fsdp2"])
def test_nccl_step_equals_single_process(tmp_path, degrees):
    out = tmp_path / "params.pt"
    mp.spawn(_worker, args=(2, free_port(), degrees, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for name, value in reference(tied=False)["params"].items():  # the fp32 CPU reference
        assert torch.allclose(got[name], value, atol=1e-5, rtol=1e-4), name
