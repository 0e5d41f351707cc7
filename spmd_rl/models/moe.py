"""Sparse mixture-of-experts feed-forward (Mixtral, arXiv:2401.04088; Qwen3-MoE).

Token-choice top-k routing: a linear router scores every expert, the softmax (in fp32) of those
scores picks each token's ``k`` best experts, and the token's output is the sum of those experts'
SwiGLU outputs weighted by their probabilities (renormalised over the ``k`` when the model says
so: always for Mixtral, ``norm_topk_prob`` for Qwen3-MoE). There is no auxiliary
load-balancing loss: the router trains on the RL loss alone.

Under tensor parallelism every expert is split like the dense MLP (gate/up by output features,
down by input features) and computes on its local shards: the block adds the experts' partial
outputs and all-reduces once; in the backward the experts' input gradient and the routing
weights' gradient (they scale only the local slices) are each summed over the group once.

The (token, slot) pairs are sorted by expert (one sort) so each expert gathers its own tokens
(one host sync per layer for the slice sizes; experts run one after another, no grouped GEMM).
Every expert runs on every forward, also on zero tokens: each parameter then gets a gradient
(zeros for an idle expert) on every rank, which FSDP's reduce-scatter needs.

Parameter names follow the HF checkpoints: ``gate`` (router) and ``experts.{e}.{gate,up,down}_proj`` (Qwen3-MoE) or ``experts.{e}.{w1,w3,w2}``
(Mixtral), under the layer's ``mlp`` or ``block_sparse_moe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from spmd_rl.kernels.logprob import copy_to_tensor_parallel, reduce_from_tensor_parallel


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)`` ``[N, k]``: each token's ``k`` most probable experts and their fp32
    probabilities, renormalised to sum to 1 when ``normalize``."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class Expert(nn.Module):
    """One SwiGLU expert, ``down(silu(gate(x)) * up(x))``, with the family's parameter names.

    Under tensor parallelism its weights are DTensors (gate/up split by rows of the output, down
    by columns) and it computes with the local shards: a slice of the intermediate features and a
    partial sum of the output, with no collective of its own (``distributed/tensor_parallel.py``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, mixtral_names: bool) -> None:
        super().__init__()
        self.names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = self.names
        setattr(self, gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, up, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, down, nn.Linear(intermediate_size, hidden_size, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (_local(getattr(self, n).weight) for n in self.names)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


class SparseMoE(nn.Module):
    """Router + ``num_experts`` experts; ``[..., H] -> [..., H]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 normalize: bool, mixtral_names: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.normalize = normalize
        # transformers' Mixtral scales the experts' outputs by fp32 routing weights, Qwen3-MoE by
        # weights cast to the hidden dtype: the same here, so bf16 outputs agree bit for bit.
        self.fp32_weights = mixtral_names
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden_size, intermediate_size, mixtral_names) for _ in range(num_experts))
        self.tp_mesh = None  # set by tensor parallelism (distributed/tensor_parallel.py: shard_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = route(self.gate(flat), self.top_k, self.normalize)
        if not self.fp32_weights:
            weights = weights.to(flat.dtype)
        expert_input = flat
        if self.tp_mesh is not None:  # both scale or feed only this rank's slices of the experts
            group = self.tp_mesh.get_group()
            weights, expert_input = copy_to_tensor_parallel(weights, group), copy_to_tensor_parallel(flat, group)
        # Group the (token, slot) pairs by expert: one sort and one host sync per layer.
        order = torch.argsort(chosen.reshape(-1), stable=True)
        counts = torch.bincount(chosen.reshape(-1), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(flat)
        for expert, slots in zip(self.experts, order.split(counts)):
            token = slots // self.top_k
            routed = expert(expert_input[token]) * weights.reshape(-1)[slots, None]
            out.index_add_(0, token, routed.to(out.dtype))  # bf16 under autocast, into the fp32 stream
        if self.tp_mesh is not None:  # each rank summed its slices of every expert: one all-reduce
            out = reduce_from_tensor_parallel(out, self.tp_mesh.get_group())
        return out.view_as(x)
