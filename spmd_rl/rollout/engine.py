"""The one protocol every generation engine implements, and the factory that picks one.

An engine lives inside each training process (no server, no RPC): the trainer hands it prompts
as token ids, gets :class:`Completion` objects back, pushes fresh weights into it after each
update, and puts it to sleep while training so the KV cache does not hold GPU memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from spmd_rl.errors import UserError
from spmd_rl.rollout.types import Completion, SamplingParams

ENGINE_NAMES = ("native", "hf", "vllm", "sglang")


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine embedded in the training process.

    The contract is engine-agnostic on purpose (a paged continuous-batching engine, an HF model
    or a vLLM/SGLang in-process adapter must all fit): it is expressed in token ids and
    parameter names only, and makes no promise about batching, caching or scheduling.
    """

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """Sample ``params.n`` responses for each prompt, all on this rank (no collectives).

        Args:
            prompts: token ids of each prompt, unpadded (``[num_prompts][prompt_len]``).
            params: sampling parameters shared by all prompts.
            seeds: optional seed per prompt. Without it prompt i uses ``params.seed + i``, or a
                seed drawn from torch's global RNG when ``params.seed`` is None. Sample j of
                prompt i is seeded from ``(seed_i, j)``; with the same seeds and weights an engine
                returns the same tokens whatever the other prompts in the call.

        Returns:
            ``result[i][j]`` is sample j of prompt i (``len(result) == len(prompts)``,
            ``len(result[i]) == params.n``). Each :class:`Completion` holds the response tokens
            (the stop token included when one ended it), the logprob of each token under
            ``log_softmax(logits / T)`` before top-k/top-p (T = 1 for greedy) and a
            ``finish_reason`` of ``"stop"`` or ``"length"``.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors into the engine's model, matched by HF parameter name.

        ``named_tensors`` may be a one-shot generator (tensors gathered one at a time); the
        engine copies what it needs and keeps no reference to the caller's tensors. A name the
        model does not have raises ``ValueError``.
        """
        ...

    def sleep(self) -> None:
        """Release generation memory (KV cache, scratch buffers) so training can use it.

        Weights are kept; a later :meth:`wake_up` (or ``generate``) makes the engine usable again.
        """
        ...

    def wake_up(self) -> None:
        """Re-acquire what :meth:`sleep` released, before the next ``generate``."""
        ...


def validate_prompts(prompts: list[list[int]], max_seq_len: int | None, vocab_size: int | None = None) -> None:
    """UserError for a prompt no engine can answer: empty, leaving no room for one response
    token under ``max_seq_len`` (prompt + response budget; None = unbounded), or holding a token
    id outside ``[0, vocab_size)`` (on a GPU the embedding would fail with a device-side assert)."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token")
        # min/max scan at C speed: this runs over every prompt token of a rollout
        if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise UserError(f"prompt {i} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): "
                            "tokenize with the model's own tokenizer")
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            raise UserError(
                f"prompt {i} has {len(prompt)} tokens, no room left under rollout max_seq_len="
                f"{max_seq_len}; raise max_seq_len or filter long prompts"
            )


def build_engine(name: str, model: Any, **kwargs: Any) -> RolloutEngine:
    """Build the engine called ``name`` over ``model`` (the engine's own model instance).

    ``"native"`` takes a native ``Transformer`` (:class:`~spmd_rl.rollout.native.engine.NativeEngine`);
    ``"hf"`` takes any transformers causal LM or a ``GenericCausalLM`` (:class:`~spmd_rl.rollout.hf.HFEngine`).
    ``"vllm"`` / ``"sglang"`` take a model folder or a native/transformers module whose config and
    weights seed the engine (:class:`~spmd_rl.rollout.vllm.VLLMEngine`,
    :class:`~spmd_rl.rollout.sglang.SGLangEngine`; CUDA and the ``vllm`` / ``sglang`` extra needed).
    ``kwargs`` go to the engine's constructor; all accept ``max_num_seqs``, ``max_seq_len``,
    ``device``, ``dtype`` and ``show_progress``.
    """
    if name == "native":
        from spmd_rl.rollout.native.engine import NativeEngine

        return NativeEngine(model, **kwargs)
    if name == "hf":
        from spmd_rl.rollout.hf import HFEngine

        return HFEngine(model, **kwargs)
    if name == "vllm":
        from spmd_rl.rollout.vllm import VLLMEngine

        return VLLMEngine(model, **kwargs)
    if name == "sglang":
        from spmd_rl.rollout.sglang import SGLangEngine

        return SGLangEngine(model, **kwargs)
    raise UserError(f"unknown rollout engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
