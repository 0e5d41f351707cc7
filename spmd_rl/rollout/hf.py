"""Generation with a transformers model's own ``generate``: the generic path for architectures the
native decoder does not cover, and a reference for the native engine.

It is simple rather than fast: one ``generate`` call per prompt (its n samples batched), then one
forward pass over prompt + responses to recompute the logprobs exactly as the trainer does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from spmd_rl.kernels.logprob import logprobs_from_logits
from spmd_rl.rollout.engine import validate_prompts
from spmd_rl.rollout.sampling import resolve_prompt_seeds
from spmd_rl.rollout.types import Completion, SamplingParams

# Prefix of the HF model's parameter names inside spmd_rl.models.GenericCausalLM.
_WRAPPER_PREFIX = "hf_model."


class HFEngine:
    """:class:`~spmd_rl.rollout.engine.RolloutEngine` over a transformers causal LM.

    Seeding: ``torch.manual_seed(seed_i)`` before prompt i's ``generate`` (inside a forked RNG
    state, so the caller's global RNG is untouched); the n samples of a prompt share that stream,
    so unlike the native engine sample j is not reproducible alone, only the prompt's group is.

    Args:
        model: a transformers causal LM, or spmd_rl's ``GenericCausalLM`` wrapping one.
        max_num_seqs: accepted for a uniform factory; one prompt's n samples run together.
        max_seq_len: prompt + response budget (None = only ``max_new_tokens`` bounds it).
        device, dtype: where and in which precision to run; default: the model's.
        show_progress: show a tqdm bar of finished prompts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_num_seqs: int = 64,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        show_progress: bool = False,
    ) -> None:
        # Accept the trainer's GenericCausalLM wrapper too: generate with the HF model inside.
        model = getattr(model, "hf_model", model)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.model = model.to(device=self.device, dtype=dtype or first.dtype).eval()
        self.max_num_seqs, self.max_seq_len = max_num_seqs, max_seq_len
        self.show_progress = show_progress
        # A checkpoint's generation_config.json (top_k=20, repetition_penalty=1.05, eos ids, ...)
        # would otherwise fill in every option SamplingParams leaves unset and silently change
        # the sampled distribution away from the one the logprobs describe.
        self.model.generation_config = GenerationConfig()

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """See :meth:`RolloutEngine.generate`."""
        validate_prompts(prompts, self.max_seq_len)
        prompt_seeds = resolve_prompt_seeds(len(prompts), params, seeds)
        bar = tqdm(zip(prompts, prompt_seeds), total=len(prompts), desc="rollout", unit="prompt",
                   disable=not self.show_progress)
        return [self._generate_one(p, params, s) for p, s in bar]

    def _generate_one(self, prompt: list[int], params: SamplingParams, seed: int) -> list[Completion]:
        """The n completions of one prompt."""
        if self.max_seq_len is not None and len(prompt) + params.max_new_tokens > self.max_seq_len:
            params = dataclasses.replace(params, max_new_tokens=self.max_seq_len - len(prompt))
        input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # [1, L]
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=_generation_config(params),
            )  # [n, L + R], rows that stopped early are right-padded
        logprobs = self._response_logprobs(sequences, len(prompt), params.logprob_temperature)
        responses = sequences[:, len(prompt) :].tolist()
        return [_to_completion(responses[j], logprobs[j].tolist(), params) for j in range(params.n)]

    def _response_logprobs(self, sequences: torch.Tensor, prompt_len: int, temperature: float) -> torch.Tensor:
        """Logprob ``[n, R]`` of each response token from one forward pass over ``sequences``.

        Right padding needs no mask: a causal model's earlier positions never see it, and the
        padded tail is cut off by :func:`_to_completion`.
        """
        logits = self.model(input_ids=sequences, use_cache=False).logits  # [n, L + R, V]
        logits = logits[:, prompt_len - 1 : -1].float()  # position t predicts token t + 1
        if temperature != 1.0:
            logits = logits / temperature
        targets = sequences[:, prompt_len:]  # [n, R]
        logprobs, _ = logprobs_from_logits(logits.flatten(0, 1), targets.flatten())
        return logprobs.view_as(targets)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors by HF name with ``load_state_dict(strict=False)``; a name the model lacks
        raises ``ValueError`` (a partial update, e.g. only trained parameters, is allowed).

        Names may carry GenericCausalLM's ``hf_model.`` prefix (a policy of that type syncs as is).
        """
        state = {name.removeprefix(_WRAPPER_PREFIX): tensor for name, tensor in named_tensors}
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"update_weights: the model has no parameter named {result.unexpected_keys[0]!r}")

    def sleep(self) -> None:
        """Nothing persistent to free (``generate`` builds its cache per call): return the
        allocator's cached blocks to the device."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Nothing to re-acquire."""


def _generation_config(params: SamplingParams) -> GenerationConfig:
    """Translate :class:`SamplingParams` into an explicit HF ``GenerationConfig``."""
    stop = list(params.stop_token_ids)
    options = dict(
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=params.n,
        do_sample=not params.greedy,
        eos_token_id=stop or None,
        # Padding of rows that stopped early; it is trimmed away, its value is irrelevant.
        pad_token_id=stop[0] if stop else 0,
    )
    if not params.greedy:
        # HF turns top-k off with 0 (our -1), and uses 50 when it is left unset.
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0))
    return GenerationConfig(**options)


def _to_completion(tokens: list[int], logprobs: list[float], params: SamplingParams) -> Completion:
    """Cut a generated row after its first stop token (dropping padding)."""
    stop = set(params.stop_token_ids)
    for i, token in enumerate(tokens):
        if token in stop:
            return Completion(tokens[: i + 1], logprobs[: i + 1], "stop")
    return Completion(tokens, logprobs, "length")
