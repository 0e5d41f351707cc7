"""A GPipe pipeline schedule over megatron's pipeline group (Huang et al. 2019, arXiv:1811.06965).

All micro-batches go forward through this rank's stage, then all go backward in reverse
order. Between adjacent stages the activations ``[s, b, h]`` travel forward and their gradients
backward with point-to-point ``send``/``recv`` (any backend, gloo included). megatron's own
schedules are not used: they allocate on ``"cuda"`` and expect megatron's DDP wrapper.

In this SPMD design every rank holds the micro-batches' token ids, so each stage knows the
shape of what it will receive without a shape exchange. Every activation of every micro-batch
stays alive until its backward (GPipe's memory cost: a mini-batch's activations at once; with
one stage, pp=1, each micro-batch's backward runs right after its forward instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StageLinks:
    """Global ranks of the neighbouring stages (None at the ends) and the activation dtype."""

    prev: int | None
    next: int | None
    dtype: torch.dtype
    device: torch.device

    @property
    def is_last(self) -> bool:
        return self.next is None


def stage_links(pp_group, pp_rank: int, pp_size: int, dtype: torch.dtype, device: torch.device) -> StageLinks:
    """Neighbours of stage ``pp_rank`` in ``pp_group`` (any group when ``pp_size == 1``)."""
    prev = dist.get_global_rank(pp_group, pp_rank - 1) if pp_rank > 0 else None
    nxt = dist.get_global_rank(pp_group, pp_rank + 1) if pp_rank < pp_size - 1 else None
    return StageLinks(prev=prev, next=nxt, dtype=dtype, device=device)


# forward_step(i, received activation or None) -> this stage's output [s, b, h]
ForwardStep = Callable[[int, torch.Tensor | None], torch.Tensor]
# loss_step(i, last stage output) -> (scalar to backpropagate or None when forward-only, result)
LossStep = Callable[[int, torch.Tensor], tuple[torch.Tensor | None, object]]


def run_gpipe(num_micro: int, shapes: list[tuple[int, ...]], forward_step: ForwardStep, loss_step: LossStep,
              links: StageLinks, *, forward_only: bool) -> list:
    """Run the schedule; return the ``loss_step`` results per micro-batch on the last stage
    (``[]`` on other stages). ``shapes[i]`` is micro-batch i's activation shape ``[s, b, h]``."""
    inputs, outputs, losses, results = [], [], [], []
    single_stage = links.prev is None and links.next is None
    for i in range(num_micro):
        received = None
        if links.prev is not None:
            received = torch.empty(shapes[i], dtype=links.dtype, device=links.device)
            dist.recv(received, src=links.prev)
            received.requires_grad_(not forward_only)
        out = forward_step(i, received)
        if links.is_last:
            loss, result = loss_step(i, out)
            results.append(result)
            if single_stage and not forward_only:
                loss.backward()  # nothing to wait for: free this micro-batch's activations now
                continue
            losses.append(loss)
        else:
            dist.send(out.detach().contiguous(), dst=links.next)
        if not forward_only:  # keep the graph for the backward phase
            inputs.append(received)
            outputs.append(out)
    if forward_only or single_stage:
        return results
    for i in reversed(range(num_micro)):
        if links.is_last:
            losses[i].backward()
        else:
            grad = torch.empty(shapes[i], dtype=links.dtype, device=links.device)
            dist.recv(grad, src=links.next)
            torch.autograd.backward(outputs[i], grad)
        if links.prev is not None:
            dist.send(inputs[i].grad.contiguous(), dst=links.prev)
        inputs[i] = outputs[i] = None  # free the activations of micro-batch i
    return results
