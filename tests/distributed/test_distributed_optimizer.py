"""The megatron backend's ZeRO-1 AdamW (``spmd_rl.models.megatron.distributed_optimizer``) on gloo.

A toy model whose parameter count does not divide by dp (so the last range is padded) trains
on a global batch split over dp ranks, its loss normalised by the global row count, through the
same ``grads.optimizer_step`` the megatron actor uses. Against one process running plain AdamW
on the whole batch: the same gradient norm (clipping active), the same parameters after every
step, while each rank keeps only ``ceil(N / dp)`` elements of each moment. A non-finite
gradient on one rank makes every rank skip the step; host offload between steps changes
nothing. A checkpoint written on dp=2 resumes on
dp=3 (DCP reshards the moments) and the next step still equals the one-process run.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from spmd_rl.config import OptimConfig
from spmd_rl.models.megatron import grads
from spmd_rl.models.megatron.distributed_optimizer import STATE_KEY, ShardedAdamW
from spmd_rl.trainer.optim import build_lr_scheduler, build_optimizer
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, eps=1e-4, warmup_steps=2)
ROWS, STEPS = 12, 3


def toy_model() -> nn.Module:
    torch.manual_seed(0)  # 5*7 + 7 + 7*3 + 3 + 3 + 1 = 70 parameters: not a multiple of 3 or 4
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def step_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(ROWS, 5, generator=g), torch.randn(ROWS, 1, generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum() / ROWS  # global normaliser: the dp-sum of rank losses is the whole loss


def reference(steps: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Plain AdamW on the whole batch, one process: norms and parameters after each step."""
    model = toy_model()
    optimizer = build_optimizer(model, OPTIM)
    scheduler = build_lr_scheduler(optimizer, OPTIM, total_steps=10)
    norms, params = [], []
    for step in range(steps):
        loss_of(model, *step_batch(step)).backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        params.append({k: v.clone() for k, v in model.state_dict().items()})
    return norms, params


def sharded_setup(dp_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp_size, 1), mesh_dim_names=("dp", "mp"))
    model = toy_model()
    optimizer = ShardedAdamW(model, OPTIM, mesh["dp"], tp_rank=0, skip_tied_copy=False)
    scheduler = build_lr_scheduler(optimizer, OPTIM, total_steps=10)
    groups = SimpleNamespace(dp=mesh["dp"].get_group(), dp_size=dp_size, model_parallel=mesh["mp"].get_group(),
                             embedding=None, tp=None, tp_size=1)
    return model, optimizer, scheduler, groups


def train_step(model, optimizer, scheduler, groups, step: int, rank: int, dp_size: int) -> float:
    x, y = step_batch(step)
    share = ROWS // dp_size
    rows = slice(rank * share, (rank + 1) * share)
    half = share // 2  # two micro-batches: gradients accumulate in the flat buffer
    loss_of(model, x[rows][:half], y[rows][:half]).backward()
    loss_of(model, x[rows][half:], y[rows][half:]).backward()
    return grads.optimizer_step(model, optimizer, scheduler, OPTIM.grad_clip, groups=groups, tp_rank=0,
                                skip_tied_copy=False)


def offload_and_reload(model, optimizer, chunk: int) -> None:
    """``actor.offload``: the flat parameter buffer and the moments move to host buffers (the
    cleared gradient buffer is dropped), every parameter view follows, and all comes back."""
    from spmd_rl.trainer.offload import HostOffload

    before = {k: v.clone() for k, v in model.state_dict().items()}
    offload = HostOffload([optimizer], [optimizer], device="cpu")
    flat = optimizer.buckets[0].flat
    moved = offload.offload()
    # parameters (padded) + exp_avg + exp_avg_sq + AdamW's step counter (on the compute device here: the CPU)
    assert moved == 4 * flat.numel() + 2 * 4 * chunk + 4
    assert optimizer.buckets[0].flat is not flat and optimizer.buckets[0].flat_grad is None
    assert all(p.grad is None for p in model.parameters())
    host = optimizer.buckets[0].flat.data_ptr()
    assert all(host <= p.data_ptr() < host + 4 * optimizer.buckets[0].flat.numel() for p in model.parameters())
    assert optimizer.buckets[0].shard.data_ptr() == host + 4 * optimizer.buckets[0].start
    assert offload.reload() == moved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def _train_worker(rank, world_size, out_path):
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # a plain AdamW first: torch wraps AdamW.step then
    model, optimizer, scheduler, groups = sharded_setup(world_size)
    numel = sum(p.numel() for p in model.parameters())
    chunk = math.ceil(numel / world_size)
    moments = optimizer._moments(optimizer.buckets[0])
    assert optimizer.buckets[0].shard.numel() == chunk and moments["exp_avg"].numel() == chunk
    assert all(p.data_ptr() in range(optimizer.buckets[0].flat.data_ptr(), optimizer.buckets[0].flat.data_ptr() + 4 * numel)
               for p in model.parameters())  # the parameters are views into the flat buffer
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append(1))
    norms, params = [], []
    for step in range(STEPS):
        norms.append(train_step(model, optimizer, scheduler, groups, step, rank, world_size))
        params.append({k: v.clone() for k, v in model.state_dict().items()})
        if step == 0:
            offload_and_reload(model, optimizer, chunk)
        if step == 1:  # between updates the gradient buffer is freed; the next backward recreates it
            optimizer.release_grads()
            assert optimizer.buckets[0].flat_grad is None and all(p.grad is None for p in model.parameters())
    assert len(calls) == STEPS  # torch's step wrapper (hooks, profiler) runs once per step
    # A NaN gradient on one rank: the norm is NaN everywhere and every rank skips the step.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moment = moments["exp_avg"].clone()
    loss = loss_of(model, *step_batch(STEPS))
    (loss * (float("nan") if rank == world_size - 1 else 1.0)).backward()
    skipped = grads.optimizer_step(model, optimizer, scheduler, OPTIM.grad_clip, groups=groups, tp_rank=0,
                                   skip_tied_copy=False)
    assert not math.isfinite(skipped)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(moments["exp_avg"], moment)
    if rank == 0:
        torch.save({"norms": norms, "params": params}, out_path)


@pytest.mark.parametrize("dp", [2, 3])
def test_sharded_adamw_equals_one_process_adamw(tmp_path, dp):
    out = tmp_path / "out.pt"
    run_on_ranks(_train_worker, dp, str(out))
    got = torch.load(out, weights_only=True)
    ref_norms, ref_params = reference(STEPS)
    assert min(ref_norms) > OPTIM.grad_clip  # clipping is active on every step
    assert got["norms"] == pytest.approx(ref_norms, rel=1e-6)
    for step, (mine, theirs) in enumerate(zip(got["params"], ref_params)):
        for name, value in theirs.items():
            torch.testing.assert_close(mine[name], value, rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")


def _save_worker(rank, world_size, run_dir, out_path):
    from spmd_rl.trainer.checkpoint import Checkpointer

    model, optimizer, scheduler, groups = sharded_setup(world_size)
    for step in range(STEPS):
        train_step(model, optimizer, scheduler, groups, step, rank, world_size)
    state = optimizer.checkpoint_state("actor/tp0_pp0")[f"actor/tp0_pp0/{STATE_KEY}"]
    full = {key: state[key].full_tensor() for key in ("exp_avg", "exp_avg_sq")}  # gathered over dp
    Checkpointer(run_dir, rank).save(STEPS, {"actor/tp0_pp0": (model, optimizer)},
                                     {"scheduler": scheduler.state_dict()})
    if rank == 0:
        torch.save(full, out_path)


def _resume_worker(rank, world_size, run_dir, saved_path, out_path):
    from spmd_rl.export import checkpoint_state_names
    from spmd_rl.trainer.checkpoint import Checkpointer

    model, optimizer, scheduler, groups = sharded_setup(world_size)
    checkpointer = Checkpointer(run_dir, rank)
    path = checkpointer.latest()
    assert checkpoint_state_names(path) == ["actor/tp0_pp0/model", f"actor/tp0_pp0/{STATE_KEY}"]
    trainer_state = checkpointer.load(path, {"actor/tp0_pp0": (model, optimizer)})
    scheduler.load_state_dict(trainer_state["scheduler"])
    state = optimizer.checkpoint_state("actor/tp0_pp0")[f"actor/tp0_pp0/{STATE_KEY}"]
    saved = torch.load(saved_path, weights_only=True)
    for key in ("exp_avg", "exp_avg_sq"):  # resharded from 2 ranges to 3
        assert torch.equal(state[key].full_tensor(), saved[key]), key
    assert float(state["step"]) == STEPS
    norm = train_step(model, optimizer, scheduler, groups, STEPS, rank, world_size)
    if rank == 0:
        torch.save({"norm": norm, "params": dict(model.state_dict())}, out_path)


def test_checkpoint_written_on_dp2_resumes_on_dp3(tmp_path):
    run_dir, saved, out = tmp_path / "run", tmp_path / "saved.pt", tmp_path / "out.pt"
    run_on_ranks(_save_worker, 2, str(run_dir), str(saved))
    run_on_ranks(_resume_worker, 3, str(run_dir), str(saved), str(out))
    got = torch.load(out, weights_only=True)
    ref_norms, ref_params = reference(STEPS + 1)
    assert got["norm"] == pytest.approx(ref_norms[-1], rel=1e-6)
    for name, value in ref_params[-1].items():
        torch.testing.assert_close(got["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)
