"""Run megatron-core's GPTModel on CPU (gloo), for tests and CPU-only machines.

megatron-core (0.12 to 0.16) assumes a CUDA device in three places that a forward/backward of
the local (non-TransformerEngine) layer spec reaches:

1. ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()`` on its
   first call. On a CPU-only process :func:`enable_cpu_execution` makes ``current_device``
   return ``"cpu"``. Where CUDA is unavailable that function raises anyway (no device, or a
   CPU-only torch build), so no code path that worked before changes.
2. Attention (and the embedding's dropout under sequence parallelism) runs inside
   ``get_cuda_rng_tracker().fork()``, which swaps in per-TP-rank CUDA RNG states. The shim
   installs a tracker whose ``fork`` does nothing: dropout is 0 in the RL configuration
   (``config.transformer_config_kwargs``), so no random number is ever drawn inside it.
3. Its tensor-parallel linear layers are autograd Functions whose backward replays the
   forward's autocast state for CUDA only (``custom_bwd(device_type="cuda")``): under CPU
   autocast (bf16 mixed precision on CPU) the backward would multiply a bf16 gradient by the
   fp32 weight and fail. The shim records the CPU autocast state in their forward and replays it
   in their backward, which is what ``custom_bwd`` does on CUDA, so CPU runs the same math.

Two more CUDA assumptions are avoided by the callers rather than patched: the default causal
mask is built on ``"cuda"`` (so the policy always passes an explicit ``attention_mask``), and
megatron's pipeline schedules allocate on ``"cuda"`` (so :mod:`.schedule` is our own).
Parameters are created on CPU with ``TransformerConfig(use_cpu_initialization=True)``.
"""

from __future__ import annotations

import contextlib

import torch


class NoOpRNGTracker:
    """Stands in for megatron's ``CudaRNGStatesTracker``: no states, ``fork`` is a no-op."""

    def fork(self, name: str | None = None):
        return contextlib.nullcontext()

    def reset(self) -> None:
        pass

    def add(self, name: str, seed: int) -> None:
        pass

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        pass


def _cpu_current_device() -> str:
    return "cpu"


def _replay_cpu_autocast(function: type) -> None:
    """Make the autograd Function ``function`` run its backward under the CPU autocast state of
    its forward (item 3 of the module doc); idempotent."""
    forward, backward = function.forward, function.backward
    if getattr(forward, "replays_cpu_autocast", False):
        return

    def forward_recording(ctx, *args, **kwargs):
        ctx.cpu_autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return forward(ctx, *args, **kwargs)

    def backward_replaying(ctx, *grads):
        enabled, dtype = ctx.cpu_autocast
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            return backward(ctx, *grads)

    forward_recording.replays_cpu_autocast = True
    function.forward = staticmethod(forward_recording)
    function.backward = staticmethod(backward_replaying)


def enable_cpu_execution() -> bool:
    """Apply the shims of the module doc when CUDA is unavailable; idempotent.

    Returns True when the process runs megatron on CPU (shims active), False on a CUDA machine
    (nothing is touched)."""
    if torch.cuda.is_available():
        return False
    from megatron.core.tensor_parallel import layers as mcore_layers
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_current_device
    for function in (mcore_layers.LinearWithGradAccumulationAndAsyncCommunication, mcore_layers.LinearWithFrozenWeight):
        _replay_cpu_autocast(function)
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, NoOpRNGTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = NoOpRNGTracker()
        # "initialised" keeps get_cuda_rng_tracker() from replacing it with a CUDA tracker
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return True


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[1, 1, T, T]`` bool, True above the diagonal (megatron masks where True).

    Right-padded rows need nothing more: a valid token attends only to earlier positions,
    never to the padding after it."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]
