"""The 1F1B pipeline schedule over megatron's pipeline group (PipeDream-Flush: Narayanan et al.
2021, arXiv:2104.04473, section 2.2; megatron's ``forward_backward_pipelining_without_interleaving``).

Stage ``r`` of ``p`` runs ``p - r - 1`` warm-up forwards, then alternates one forward with one
backward, then drains the remaining backwards. A stage therefore holds the activations of at
most ``p - r`` micro-batches, where GPipe (all forwards, then all backwards) holds the whole
mini-batch's; gradients are the same sums (accumulated in another order). With one stage each
micro-batch's backward follows its forward.

Between adjacent stages the activations ``[s, b, h]`` travel forward and their gradients
backward point to point. Where a stage both sends and receives in one step the two go out as
one batch of non-blocking ops (``batch_isend_irecv``): two neighbours each sending first would
otherwise wait on each other. Any backend works, gloo included. megatron's own schedules are not
used: they allocate on ``"cuda"`` and expect megatron's DDP wrapper.

In this SPMD design every rank holds the micro-batches' token ids, so each stage knows the
shape of what it will receive without a shape exchange.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StageLinks:
    """Global ranks of the neighbouring stages (None at the ends), how many stages follow this
    one, and the activation dtype."""

    prev: int | None
    next: int | None
    dtype: torch.dtype
    device: torch.device
    stages_after: int = 0
    group: object | None = None  # the pipeline group the point-to-point ops go through (None: the world)

    @property
    def is_last(self) -> bool:
        return self.next is None


def stage_links(pp_group, pp_rank: int, pp_size: int, dtype: torch.dtype, device: torch.device) -> StageLinks:
    """Neighbours of stage ``pp_rank`` in ``pp_group`` (any group when ``pp_size == 1``)."""
    prev = dist.get_global_rank(pp_group, pp_rank - 1) if pp_rank > 0 else None
    nxt = dist.get_global_rank(pp_group, pp_rank + 1) if pp_rank < pp_size - 1 else None
    return StageLinks(prev=prev, next=nxt, dtype=dtype, device=device, stages_after=pp_size - pp_rank - 1,
                      group=pp_group)


# forward_step(i, received activation or None) -> this stage's output [s, b, h]
ForwardStep = Callable[[int, torch.Tensor | None], torch.Tensor]
# loss_step(i, last stage output) -> (scalar to backpropagate or None when forward-only, result)
LossStep = Callable[[int, torch.Tensor], tuple[torch.Tensor | None, object]]


def _exchange(links: StageLinks, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
              recv_prev: tuple[int, ...] | None = None, recv_next: tuple[int, ...] | None = None):
    """Post the sends and receives of one step together and wait for all of them; returns
    ``(from prev, from next)``, each None when not asked for or at the end of the pipeline."""
    ops, got_prev, got_next = [], None, None
    if send_next is not None and links.next is not None:
        activation = send_next.detach().to(links.dtype).contiguous()
        ops.append(dist.P2POp(dist.isend, activation, links.next, group=links.group))
    if send_prev is not None and links.prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.to(links.dtype).contiguous(), links.prev, group=links.group))
    if recv_prev is not None and links.prev is not None:
        got_prev = torch.empty(recv_prev, dtype=links.dtype, device=links.device)
        ops.append(dist.P2POp(dist.irecv, got_prev, links.prev, group=links.group))
    if recv_next is not None and links.next is not None:
        got_next = torch.empty(recv_next, dtype=links.dtype, device=links.device)
        ops.append(dist.P2POp(dist.irecv, got_next, links.next, group=links.group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return got_prev, got_next


def run_pipeline(num_micro: int, shapes: list[tuple[int, ...]], forward_step: ForwardStep, loss_step: LossStep,
                 links: StageLinks, *, forward_only: bool) -> list:
    """Run the micro-batches through this stage (1F1B when training); return the ``loss_step``
    results per micro-batch on the last stage (``[]`` on other stages). ``shapes[i]`` is
    micro-batch i's activation shape ``[s, b, h]``."""
    results: list = []
    if forward_only:
        for i in range(num_micro):
            received, _ = _exchange(links, recv_prev=shapes[i])
            out = forward_step(i, received)
            if links.is_last:
                results.append(loss_step(i, out)[1])
            _exchange(links, send_next=out)
        return results

    waiting: deque = deque()  # (received input, output or loss) of micro-batches awaiting backward

    def forward(i: int, received: torch.Tensor | None) -> torch.Tensor:
        if received is not None:
            received.requires_grad_(True)
        out = forward_step(i, received)
        if links.is_last:
            loss, result = loss_step(i, out)
            results.append(result)
            out = loss
        waiting.append((received, out))
        return out

    def backward(grad: torch.Tensor | None) -> torch.Tensor | None:
        received, out = waiting.popleft()  # oldest first: micro-batches finish in order
        if links.is_last:
            out.backward()
        else:
            torch.autograd.backward(out, grad.to(out.dtype))  # activations travel in links.dtype
        return received.grad if received is not None else None

    warmup = min(links.stages_after, num_micro)
    for i in range(warmup):
        received, _ = _exchange(links, recv_prev=shapes[i])
        _exchange(links, send_next=forward(i, received))
    received = _exchange(links, recv_prev=shapes[warmup])[0] if warmup < num_micro else None
    for k in range(num_micro - warmup):  # steady state: forward micro-batch warmup + k, backward k
        i = warmup + k
        out = forward(i, received)
        _, grad = _exchange(links, send_next=None if links.is_last else out, recv_next=shapes[k])
        grad_in = backward(grad)
        last = i == num_micro - 1
        received, _ = _exchange(links, send_prev=grad_in, recv_prev=None if last else shapes[i + 1])
    for k in range(num_micro - warmup, num_micro):  # cool-down: the warm-up micro-batches' backwards
        _, grad = _exchange(links, recv_next=shapes[k])
        _exchange(links, send_prev=backward(grad))
    return results
