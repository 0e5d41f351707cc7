"""Masked reductions over padded ``[B, T]`` tensors (verl ``torch_functional`` semantics).

Every function takes an optional data-parallel ``dp_group``: when given, the sums behind a
statistic are all-reduced over that group, so that ``dp`` shards compute the statistic of the
global batch. ``torch.distributed`` is imported lazily, only when a group is actually passed,
which keeps this package a set of pure tensor functions.
"""

from __future__ import annotations

from typing import Any

import torch


def all_reduce_sum(tensor: torch.Tensor, group: Any | None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` in place and return it; a no-op when ``group`` is None."""
    if group is None:
        return tensor
    import torch.distributed as dist  # lazy: the algorithms package stays process-group free

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is non-zero.

    Args:
        x: values, any shape (``[B, T]`` in practice).
        mask: same shape as ``x``; 0/1 (bool or numeric).
        dim: dimension to reduce; ``None`` reduces everything to a 0-d tensor.
    """
    # where() first so NaN/inf in padded positions cannot leak into the sum (0 * nan = nan)
    valid = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (valid * mask).sum() if dim is None else (valid * mask).sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, dp_group: Any | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the masked elements; ``sum / (count + 1e-8)`` as in verl.

    With ``dp_group`` (only for ``dim=None``) the sum and the count are global over the group.
    """
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    if dp_group is not None:
        if dim is not None:
            raise ValueError("masked_mean: dp_group is only supported with dim=None")
        # one collective for both numbers; float64 keeps the counts exact
        packed = torch.stack([total.double(), count.double()])
        total, count = all_reduce_sum(packed, dp_group).to(x.dtype).unbind()
    return total / (count + 1e-8)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, *, dp_group: Any | None = None
) -> torch.Tensor:
    """Variance of ``x`` over all masked elements (0-d tensor), Bessel-corrected when ``unbiased``.

    Raises ValueError when fewer than two elements are selected and ``unbiased`` is set,
    because the correction ``n / (n - 1)`` is then undefined.
    """
    mean = masked_mean(x, mask, dp_group=dp_group)
    variance = masked_mean((x - mean) ** 2, mask, dp_group=dp_group)
    if unbiased:
        count = all_reduce_sum(mask.sum().double(), dp_group)
        if count == 0:
            raise ValueError("masked_var: the mask selects no element")
        if count == 1:
            raise ValueError("masked_var: the mask selects one element; unbiased variance divides by zero")
        variance = variance * (count / (count - 1)).to(variance.dtype)
    return variance


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, dp_group: Any | None = None
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked elements.

    ``shift_mean=False`` only rescales: the original mean is added back after whitening.
    Positions outside the mask are transformed too (callers multiply by the mask if needed).
    """
    mean = masked_mean(x, mask, dp_group=dp_group)
    var = masked_var(x, mask, dp_group=dp_group)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened
