"""Generation with a transformers model's own ``generate``: the generic path for architectures the
native decoder does not cover, and a reference for the native engine.

It is simple rather than fast: one ``generate`` call per prompt (its n samples batched), then one
forward pass over prompt + responses to recompute the logprobs exactly as the trainer does.

Sampling semantics are the native engine's: HF's own warpers are switched off and one logits
processor applies :func:`spmd_rl.rollout.sampling.process_logits` (penalties -> temperature ->
top-k -> top-p -> min-p), so HF only draws from (or takes the argmax of) the distribution we
built. Stop strings use :class:`spmd_rl.rollout.stop.StopChecker`, the native engine's rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.generation import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from spmd_rl.errors import UserError
from spmd_rl.kernels.logprob import logprobs_from_logits
from spmd_rl.models.generic import HF_MODEL_PREFIX
from spmd_rl.rollout.engine import validate_prompts
from spmd_rl.rollout.sampling import process_logits, resolve_prompt_seeds, token_counts
from spmd_rl.rollout.stop import StopChecker
from spmd_rl.rollout.types import Completion, SamplingParams

# Prefix of the HF model's parameter names inside spmd_rl.models.GenericCausalLM.


class HFEngine:
    """:class:`~spmd_rl.rollout.engine.RolloutEngine` over a transformers causal LM.

    Seeding: ``torch.manual_seed(seed_i)`` before prompt i's ``generate`` (inside a forked RNG
    state, so the caller's global RNG is untouched); the n samples of a prompt share that stream,
    so unlike the native engine sample j is not reproducible alone, only the prompt's group is.

    Logprobs: ``logprobs`` (and ``raw_logprobs``) come from one forward over prompt + response,
    as the trainer computes them; ``sampled_logprobs`` are recorded during ``generate`` from the
    processed distribution HF actually drew each token from.

    Args:
        model: a transformers causal LM, or spmd_rl's ``GenericCausalLM`` wrapping one.
        max_num_seqs: accepted for a uniform factory; one prompt's n samples run together.
        max_seq_len: prompt + response budget (None = only ``max_new_tokens`` bounds it).
        device, dtype: where and in which precision to run; default: the model's.
        show_progress: show a tqdm bar of finished prompts.
        tokenizer: decodes responses for stop strings (``SamplingParams.stop``); only needed then.
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
        tokenizer=None,
    ) -> None:
        # Accept the trainer's GenericCausalLM wrapper too: generate with the HF model inside.
        model = getattr(model, "hf_model", model)
        if not callable(getattr(model, "generate", None)):
            raise UserError(f"rollout.engine=hf needs a transformers model, got {type(model).__name__}: set "
                            "model.implementation=generic, or use rollout.engine=native for this model")
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.model = model.to(device=self.device, dtype=dtype or first.dtype).eval()
        self.max_num_seqs, self.max_seq_len = max_num_seqs, max_seq_len
        self.show_progress = show_progress
        self.tokenizer = tokenizer
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
        validate_prompts(prompts, self.max_seq_len, getattr(getattr(self.model, "config", None), "vocab_size", None))
        if params.stop and self.tokenizer is None:
            raise ValueError("sampling stop strings need a tokenizer: build the HF engine with tokenizer=...")
        checker = StopChecker(self.tokenizer, params.stop) if params.stop else None
        prompt_seeds = resolve_prompt_seeds(len(prompts), params, seeds)
        bar = tqdm(zip(prompts, prompt_seeds), total=len(prompts), desc="rollout", unit="prompt",
                   disable=not self.show_progress)
        return [self._generate_one(p, params, s, checker) for p, s in bar]

    def _generate_one(
        self, prompt: list[int], params: SamplingParams, seed: int, checker: StopChecker | None
    ) -> list[Completion]:
        """The n completions of one prompt."""
        if self.max_seq_len is not None and len(prompt) + params.max_new_tokens > self.max_seq_len:
            params = dataclasses.replace(params, max_new_tokens=self.max_seq_len - len(prompt))
        # transformers refuses num_return_sequences > 1 for greedy search: n identical rows instead
        rows = params.n if params.greedy else 1
        input_ids = torch.tensor([prompt] * rows, dtype=torch.long, device=self.device)  # [rows, L]
        processor = _ProcessLogits(params, len(prompt))
        stopping = StoppingCriteriaList([_StopStrings(checker, len(prompt))] if checker else [])
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=_generation_config(params),
                logits_processor=LogitsProcessorList([processor]),
                stopping_criteria=stopping,
            )  # [n, L + R], rows that stopped early are right-padded
        logprobs, raw = self._response_logprobs(sequences, len(prompt), params)
        sampled = processor.sampled_logprobs(sequences).tolist()
        responses = sequences[:, len(prompt) :].tolist()
        return [
            _to_completion(
                responses[j], logprobs[j].tolist(), sampled[j], None if raw is None else raw[j].tolist(), params,
                checker,
            )
            for j in range(params.n)
        ]

    def _response_logprobs(
        self, sequences: torch.Tensor, prompt_len: int, params: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprob ``[n, R]`` of each response token at ``params.logprob_temperature``, and at
        T = 1 when ``params.return_raw_logprobs`` (else None), from one forward pass over
        ``sequences`` (the trainer's computation).

        Right padding needs no mask: a causal model's earlier positions never see it, and the
        padded tail is cut off by :func:`_to_completion`.
        """
        logits = self.model(input_ids=sequences, use_cache=False).logits  # [n, L + R, V]
        logits = logits[:, prompt_len - 1 : -1].float().flatten(0, 1)  # position t predicts token t + 1
        targets = sequences[:, prompt_len:]  # [n, R]
        temperature = params.logprob_temperature
        scaled = logits if temperature == 1.0 else logits / temperature
        logprobs, _ = logprobs_from_logits(scaled, targets.flatten())
        raw = None
        if params.return_raw_logprobs:
            raw = logprobs_from_logits(logits, targets.flatten())[0].view_as(targets)
        return logprobs.view_as(targets), raw

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors by HF name with ``load_state_dict(strict=False)``; a name the model lacks
        raises ``ValueError`` (a partial update, e.g. only trained parameters, is allowed).

        Names may carry GenericCausalLM's ``hf_model.`` prefix (a policy of that type syncs as is).
        """
        state = {name.removeprefix(HF_MODEL_PREFIX): tensor for name, tensor in named_tensors}
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


class _ProcessLogits(LogitsProcessor):
    """HF logits processor running :func:`process_logits` on the scores of each step, and
    recording the log-probability of each sampled token under the distribution it came from.

    HF samples after the processors run, so the token drawn at step t is only seen at the next
    call (or in the final sequences): :meth:`_record` gathers it then from the stored
    ``log_softmax`` of step t. Keyed by position, so steps HF runs and later undoes do no harm.
    """

    def __init__(self, params: SamplingParams, prompt_len: int) -> None:
        self.params, self.prompt_len = params, prompt_len
        self.prompt_counts: torch.Tensor | None = None  # [n, V], built on the first call
        self._last: tuple[int, torch.Tensor] | None = None  # (position, log_softmax [n, V])
        self._sampled: dict[int, torch.Tensor] = {}  # position -> [n] processed logprob

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids [n, L + t] (t tokens generated so far), scores [n, V] raw logits of step t.
        self._record(input_ids)
        scores = scores.float()
        output_counts = None
        if self.params.has_penalties:
            vocab = scores.shape[-1]
            if self.prompt_counts is None:
                self.prompt_counts = token_counts(input_ids[:, : self.prompt_len], vocab)
            output_counts = token_counts(input_ids[:, self.prompt_len :], vocab)
        processed = process_logits(scores, self.params, prompt_counts=self.prompt_counts, output_counts=output_counts)
        self._last = (input_ids.shape[1] - self.prompt_len, processed.log_softmax(dim=-1))
        return processed

    def _record(self, sequences: torch.Tensor) -> None:
        """Store the processed logprob of the token sampled at the last processed step, if
        ``sequences [n, L + t]`` already holds it."""
        if self._last is None:
            return
        position, logprobs = self._last
        column = self.prompt_len + position
        if sequences.shape[1] > column:
            self._sampled[position] = logprobs.gather(-1, sequences[:, column, None])[:, 0]

    def sampled_logprobs(self, sequences: torch.Tensor) -> torch.Tensor:
        """Processed logprob ``[n, R]`` of every response token of the final ``sequences [n, L + R]``."""
        self._record(sequences)
        num_generated = sequences.shape[1] - self.prompt_len
        return torch.stack([self._sampled[t] for t in range(num_generated)], dim=1).float().cpu()


class _StopStrings(StoppingCriteria):
    """HF stopping criterion: a row is done once its response text contains a stop string
    (:meth:`StopChecker.check` on the tail of each row, so a step costs O(stop length))."""

    def __init__(self, checker: StopChecker, prompt_len: int) -> None:
        self.checker, self.prompt_len = checker, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # One new token per row since the last call; the checker only reads this tail.
        start = max(self.prompt_len, input_ids.shape[1] - self.checker.context_tokens - 1)
        tails = input_ids[:, start:].tolist()
        done = [self.checker.check(tail) is not None for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generation_config(params: SamplingParams) -> GenerationConfig:
    """Translate :class:`SamplingParams` into an explicit HF ``GenerationConfig`` whose own
    logit processing is off: :class:`_ProcessLogits` does all of it."""
    stop = list(params.stop_token_ids)
    options = dict(
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=1 if params.greedy else params.n,
        do_sample=not params.greedy,
        eos_token_id=stop or None,
        # Padding of rows that stopped early; it is trimmed away, its value is irrelevant.
        pad_token_id=stop[0] if stop else 0,
    )
    if not params.greedy:
        # Explicit no-ops: HF would otherwise fill in top_k=50 when it is left unset.
        options.update(temperature=1.0, top_p=1.0, top_k=0)
    return GenerationConfig(**options)


def _to_completion(
    tokens: list[int],
    logprobs: list[float],
    sampled: list[float],
    raw: list[float] | None,
    params: SamplingParams,
    checker: StopChecker | None,
) -> Completion:
    """Cut a generated row after its first stop token or stop string (dropping padding).

    When a stop token and a stop string end on the same token, the token wins (vLLM checks
    stop token ids first).
    """
    stop_ids = set(params.stop_token_ids)
    cut, reason, stop_reason = len(tokens), "length", None
    for i, token in enumerate(tokens):
        if token in stop_ids:
            cut, reason, stop_reason = i + 1, "stop", token
            break
    match = checker.find(tokens[:cut]) if checker else None
    if match is not None and (reason == "length" or match.num_tokens < cut):
        cut, reason, stop_reason = match.num_tokens, "stop", match.stop
    return Completion(
        tokens[:cut], logprobs[:cut], reason, sampled_logprobs=sampled[:cut],
        raw_logprobs=None if raw is None else raw[:cut], stop_reason=stop_reason,
    )
