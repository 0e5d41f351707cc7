"""DAPO's overlong reward shaping (Yu et al. 2025, arXiv:2503.14476, Sec. 3.4 "Soft Overlong Punishment")."""

from __future__ import annotations

import torch


def overlong_penalty(response_lengths: torch.Tensor, *, max_response_length: int, buffer_len: int,
                     penalty_factor: float) -> torch.Tensor:
    """Reward added to each response for its length (0 or negative).

    Responses up to ``max_response_length - buffer_len`` tokens get 0; inside the buffer the
    penalty grows linearly and reaches ``-penalty_factor`` at ``max_response_length``::

        penalty = min(0, -(length - (max_response_length - buffer_len)) / buffer_len * penalty_factor)

    Args:
        response_lengths: ``[B]`` generated tokens per response.

    Returns:
        ``[B]`` float32 penalties.
    """
    if not 0 < buffer_len < max_response_length:
        raise ValueError(f"buffer_len must be in (0, max_response_length={max_response_length}), got {buffer_len}")
    expected = max_response_length - buffer_len
    exceed = response_lengths.float() - expected
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)
