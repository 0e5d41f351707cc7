"""The 1F1B pipeline schedule (``spmd_rl.models.megatron.schedule``) on gloo, without megatron.

A toy model of ``p`` stages (each a ``Linear`` + tanh on ``[s, b, h]`` activations, the last
one also a squared-error loss) is split over ``p`` ranks. For several micro-batch counts, the
per-stage gradients, the losses and the forward-only outputs must equal one process running the
whole model, and no stage may hold more than ``p - r`` micro-batches' activations at once
(GPipe would hold all of them).
"""

import pytest
import torch
import torch.distributed as dist

from spmd_rl.models.megatron.schedule import run_pipeline, stage_links
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)
HIDDEN = 6
MICRO_COUNTS = (1, 2, 5)


def shapes(num_micro: int) -> list[tuple[int, int, int]]:
    return [(3 + i % 2, 2, HIDDEN) for i in range(num_micro)]  # ragged sequence lengths


def stage_modules(num_stages: int) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(HIDDEN, HIDDEN).double() for _ in range(num_stages)]


def micro_inputs(num_micro: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes(num_micro)]


def loss_of(out: torch.Tensor, i: int) -> torch.Tensor:
    return ((out - 0.1 * i) ** 2).sum()


def reference(num_stages: int, num_micro: int):
    layers = stage_modules(num_stages)
    losses, outputs = [], []
    for i, x in enumerate(micro_inputs(num_micro)):
        for layer in layers:
            x = torch.tanh(layer(x))
        outputs.append(x.detach())
        loss = loss_of(x, i)
        loss.backward()
        losses.append(loss.item())
    return [layer.weight.grad for layer in layers], losses, outputs


def _worker(rank, world_size, num_micro, out):
    layer = stage_modules(world_size)[rank]
    links = stage_links(dist.group.WORLD, rank, world_size, torch.float64, torch.device("cpu"))
    inputs = micro_inputs(num_micro)
    live, peak = [0], [0]  # micro-batches whose activations this stage holds

    def forward_step(i, received):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        y = torch.tanh(layer(inputs[i] if received is None else received))
        y.register_hook(lambda g: live.__setitem__(0, live[0] - 1) or g)  # its backward has reached this stage
        return y

    def loss_step(i, y):
        return loss_of(y, i), loss_of(y, i).item()

    losses = run_pipeline(num_micro, shapes(num_micro), forward_step, loss_step, links, forward_only=False)
    assert live[0] == 0
    grad = layer.weight.grad.clone()
    with torch.no_grad():
        outputs = run_pipeline(num_micro, shapes(num_micro), lambda i, r: torch.tanh(layer(inputs[i] if r is None else r)),
                               lambda i, y: (None, y.clone()), links, forward_only=True)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (grad, peak[0], losses, outputs))
    if rank == 0:
        torch.save(gathered, out)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_1f1b_equals_one_process_and_bounds_live_micro_batches(tmp_path, num_stages):
    for num_micro in MICRO_COUNTS:
        out = tmp_path / f"out_{num_micro}.pt"
        run_on_ranks(_worker, num_stages, num_micro, str(out))
        gathered = torch.load(out, weights_only=False)
        ref_grads, ref_losses, ref_outputs = reference(num_stages, num_micro)
        for rank, (grad, peak, losses, outputs) in enumerate(gathered):
            torch.testing.assert_close(grad, ref_grads[rank], rtol=1e-12, atol=1e-12)
            assert peak == min(num_stages - rank, num_micro), (rank, num_micro, peak)  # 1F1B's bound, reached
        assert gathered[-1][2] == pytest.approx(ref_losses, rel=1e-12)  # results come from the last stage
        assert all(g[2] == [] for g in gathered[:-1])
        for got, want in zip(gathered[-1][3], ref_outputs):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
