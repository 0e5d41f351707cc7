"""The policy as the trainer sees it: packed sequences in, per-token logprobs out.

The lm-head projection happens inside this module's ``forward`` so that FSDP2, which wraps this
module as its root, has the embedding/lm-head parameters gathered while they are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spmd_rl.data.packing import pack_sequences
from spmd_rl.distributed.tensor_parallel import local_vocab_shard
from spmd_rl.distributed.ulysses import gather_sequence, shard_packed_row
from spmd_rl.kernels.logprob import logprobs_and_entropy


@dataclass
class ScoringInputs:
    """Prompt+response sequences, packed into one row (``cu_seqlens`` set: decoder mode 1) or
    right-padded rows (``cu_seqlens`` None: mode 2), and which positions predict which response tokens."""

    input_ids: torch.Tensor  # [1, N] packed, or [S, T] right-padded
    position_ids: torch.Tensor  # same shape as input_ids
    cu_seqlens: torch.Tensor | None  # [S+1] int32 when packed, None when padded
    target_positions: torch.Tensor  # [M] index into the flat input (N or S*T) of the state predicting each target
    targets: torch.Tensor  # [M] response token ids
    response_lengths: list[int]  # [S] M = sum(response_lengths)


def build_scoring_inputs(prompts: list[list[int]], responses: list[list[int]], device,
                         packed: bool = True) -> ScoringInputs:
    """``prompt + response`` per sequence; the hidden state at position t predicts token t+1.

    ``packed``: one row with ``cu_seqlens`` (padding-free). Otherwise ``[S, T]`` rows right-padded
    to the longest sequence with token 0 and plain causal attention per row: a valid token only
    attends to earlier positions, never to the padding after it, so its result is the same
    (up to kernel rounding); the padding costs compute, which is what padding-free training saves."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max((len(s) for s in seqs), default=0)
    positions, targets, offset = [], [], 0
    for p, r in zip(prompts, responses):
        start = offset + len(p) - 1  # last prompt token predicts the first response token
        positions.extend(range(start, start + len(r)))
        targets.extend(r)
        offset += len(p) + len(r) if packed else width  # padded: row s starts at s * T
    if packed:
        rows = pack_sequences(seqs)
        input_ids, position_ids, cu_seqlens = rows.input_ids, rows.position_ids, rows.cu_seqlens.to(device)
    else:
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.long).reshape(len(seqs), width)
        position_ids = torch.arange(width, dtype=torch.long).expand(len(seqs), width).contiguous()
        cu_seqlens = None
    return ScoringInputs(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        cu_seqlens=cu_seqlens,
        target_positions=torch.tensor(positions, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        response_lengths=[len(r) for r in responses],
    )


class PolicyModel(nn.Module):
    """Wraps a decoder (native or generic) to return logprobs of the response tokens."""

    def __init__(self, decoder: nn.Module, kernels: str = "torch", sp_group=None):
        super().__init__()
        self.decoder = decoder
        self.kernels = kernels  # "torch" | "triton": the lm-head -> logprob implementation
        self.sp_group = sp_group  # Ulysses sequence-parallel group (None = off)

    def forward(self, inputs: ScoringInputs, temperature: float = 1.0, with_entropy: bool = False):
        """Return ``(logprobs [M], entropy [M] or None)`` in fp32."""
        hidden = decoder_hidden(self.decoder, inputs, self.sp_group)[inputs.target_positions]  # [M, H]
        # Under tensor parallelism each rank holds a vocab slice of the lm-head: the logprob
        # combines partial softmax statistics over the tp group instead of gathering the logits.
        weight, vocab_start, tp_group = local_vocab_shard(self.decoder.lm_head_weight())
        return logprobs_and_entropy(hidden, weight, inputs.targets, backend=self.kernels, temperature=temperature,
                                    with_entropy=with_entropy, vocab_start=vocab_start, tp_group=tp_group)


def decoder_hidden(decoder: nn.Module, inputs: ScoringInputs, sp_group=None) -> torch.Tensor:
    """Final hidden states ``[N, H]`` of every token of the packed row.

    With ``sp_group`` each rank runs the decoder on its slice of the row (Ulysses) and the slices
    are gathered back, so what follows is the same on every rank of the group."""
    if sp_group is not None and inputs.cu_seqlens is None:
        raise ValueError("sequence parallelism splits packed rows: build the inputs with packed=True")
    if sp_group is None:  # packed (mode 1) or padded (mode 2) alike: [1, N, H] or [S, T, H]
        hidden = decoder(inputs.input_ids, inputs.position_ids, cu_seqlens=inputs.cu_seqlens)
        return hidden.reshape(-1, hidden.shape[-1])
    shard = shard_packed_row(inputs.input_ids, inputs.position_ids, inputs.cu_seqlens, sp_group)
    hidden = decoder(shard.input_ids, shard.position_ids, cu_seqlens=shard.cu_seqlens)[0]  # [N_local, H]
    return gather_sequence(hidden, sp_group, shard.total)


def pad_by_lengths(values: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Scatter a flat ``[M]`` tensor of per-sequence runs into a right-padded ``[S, width]``."""
    out = values.new_zeros(len(lengths), width)
    for i, chunk in enumerate(torch.split(values, lengths)):
        out[i, : len(chunk)] = chunk
    return out
