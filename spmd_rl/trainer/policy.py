"""The policy as the trainer sees it: packed sequences in, per-token logprobs out.

The lm-head projection happens inside this module's ``forward`` so that FSDP2, which wraps this
module as its root, has the embedding/lm-head parameters gathered while they are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spmd_rl.data.packing import pack_sequences
from spmd_rl.kernels.logprob import logprobs_and_entropy


@dataclass
class ScoringInputs:
    """Packed prompt+response sequences and which positions predict which response tokens."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    cu_seqlens: torch.Tensor  # [S+1] int32
    target_positions: torch.Tensor  # [M] index into N of the hidden state predicting each target
    targets: torch.Tensor  # [M] response token ids
    response_lengths: list[int]  # [S] M = sum(response_lengths)


def build_scoring_inputs(prompts: list[list[int]], responses: list[list[int]], device) -> ScoringInputs:
    """Pack ``prompt + response`` per sequence; the hidden state at position t predicts token t+1."""
    packed = pack_sequences([p + r for p, r in zip(prompts, responses)])
    positions, targets, offset = [], [], 0
    for p, r in zip(prompts, responses):
        start = offset + len(p) - 1  # last prompt token predicts the first response token
        positions.extend(range(start, start + len(r)))
        targets.extend(r)
        offset += len(p) + len(r)
    return ScoringInputs(
        input_ids=packed.input_ids.to(device),
        position_ids=packed.position_ids.to(device),
        cu_seqlens=packed.cu_seqlens.to(device),
        target_positions=torch.tensor(positions, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        response_lengths=[len(r) for r in responses],
    )


class PolicyModel(nn.Module):
    """Wraps a decoder (native or generic) to return logprobs of the response tokens."""

    def __init__(self, decoder: nn.Module, kernels: str = "torch"):
        super().__init__()
        self.decoder = decoder
        self.kernels = kernels  # "torch" | "triton": the lm-head -> logprob implementation

    def forward(self, inputs: ScoringInputs, temperature: float = 1.0, with_entropy: bool = False):
        """Return ``(logprobs [M], entropy [M] or None)`` in fp32."""
        hidden = self.decoder(inputs.input_ids, inputs.position_ids, cu_seqlens=inputs.cu_seqlens)
        hidden = hidden.reshape(-1, hidden.shape[-1])[inputs.target_positions]  # [M, H]
        return logprobs_and_entropy(hidden, self.decoder.lm_head_weight(), inputs.targets, backend=self.kernels,
                                    temperature=temperature, with_entropy=with_entropy)


def pad_by_lengths(values: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Scatter a flat ``[M]`` tensor of per-sequence runs into a right-padded ``[S, width]``."""
    out = values.new_zeros(len(lengths), width)
    for i, chunk in enumerate(torch.split(values, lengths)):
        out[i, : len(chunk)] = chunk
    return out
