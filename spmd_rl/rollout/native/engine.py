"""The embedded generation engine over the native decoder (CPU and GPU).

v0 is static batching on a contiguous KV cache: requests (prompt x sample) are processed in
chunks of ``max_num_seqs``; each chunk is prefilled as one packed (padding-free) batch, then
decoded one token per step for the rows still running. Logprobs of sampled tokens come from
the same math the trainer uses, so the two agree up to forward-pass numerics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from spmd_rl.errors import UserError
from spmd_rl.models.decoder import Transformer
from spmd_rl.models.kv_cache import KVCache
from spmd_rl.rollout.engine import validate_prompts
from spmd_rl.rollout.sampling import (
    make_generators,
    resolve_prompt_seeds,
    sample_seed,
    sample_tokens,
    sampled_logprobs,
)
from spmd_rl.rollout.types import Completion, SamplingParams


@dataclass
class _Request:
    """One sequence being generated: sample ``sample_index`` of prompt ``prompt_index``."""

    prompt_index: int
    sample_index: int
    prompt: list[int]  # [prompt_len]
    seed: int
    token_ids: list[int] = field(default_factory=list)  # [num_generated]
    logprobs: list[float] = field(default_factory=list)  # [num_generated]
    finish_reason: str | None = None  # None while running

    @property
    def length(self) -> int:
        """Tokens so far, prompt + response."""
        return len(self.prompt) + len(self.token_ids)


class NativeEngine:
    """:class:`~spmd_rl.rollout.engine.RolloutEngine` over a native ``Transformer``.

    Args:
        model: the engine's own decoder instance (moved to ``device``/``dtype`` when given).
        max_num_seqs: sequences generated together, i.e. rows of the KV cache.
        max_seq_len: prompt + response budget per sequence (slots per cache row); a response
            that reaches it ends with ``finish_reason="length"``.
        device, dtype: where and in which precision to run; default: the model's.
        show_progress: show a tqdm bar of finished sequences.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_num_seqs: int = 64,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        show_progress: bool = False,
    ) -> None:
        if not isinstance(model, Transformer):
            raise UserError(
                f"rollout engine 'native' needs the native decoder, got {type(model).__name__}; "
                "use rollout engine 'hf' for this model"
            )
        if max_num_seqs < 1 or max_seq_len < 2:
            raise UserError(
                f"rollout needs max_num_seqs >= 1 and max_seq_len >= 2, got {max_num_seqs} and {max_seq_len}"
            )
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.max_num_seqs, self.max_seq_len = max_num_seqs, max_seq_len
        self.show_progress = show_progress
        self.kv_cache: KVCache | None = None  # allocated on wake_up / first generate

    # ---------------------------------------------------------------- protocol

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
        requests = [
            _Request(i, j, list(prompt), sample_seed(prompt_seeds[i], j))
            for i, prompt in enumerate(prompts)
            for j in range(params.n)
        ]
        self.wake_up()
        with tqdm(total=len(requests), desc="rollout", unit="seq", disable=not self.show_progress) as bar:
            for start in range(0, len(requests), self.max_num_seqs):
                self._run_chunk(requests[start : start + self.max_num_seqs], params, bar)
        results: list[list[Completion]] = [[] for _ in prompts]
        for req in requests:  # ordered by (prompt, sample)
            results[req.prompt_index].append(Completion(req.token_ids, req.logprobs, req.finish_reason))
        return results

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the model's parameters in place, by name.

        Raises ``ValueError`` for an unknown name or a shape mismatch. With tied embeddings
        ``lm_head.weight`` is the embedding itself: it is accepted (or skipped) either way.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        tied = bool(getattr(self.model.args, "tie_word_embeddings", False))
        for name, tensor in named_tensors:
            param = params.get(name)
            if param is None:
                if name == "lm_head.weight" and tied:
                    continue
                raise ValueError(f"update_weights: the model has no parameter named {name!r}")
            if param.shape != tensor.shape:
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(tensor)  # casts dtype and moves device as needed

    def sleep(self) -> None:
        """Free the KV cache (and the allocator's cached blocks on GPU); weights stay."""
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Allocate the KV cache if it is not there (``max_num_seqs`` x ``max_seq_len``)."""
        if self.kv_cache is None:
            with torch.inference_mode():
                self.kv_cache = KVCache.for_model(
                    self.model.args, self.max_num_seqs, self.max_seq_len, self.dtype, self.device
                )

    # ---------------------------------------------------------------- generation

    def _run_chunk(self, requests: list[_Request], params: SamplingParams, bar: tqdm) -> None:
        """Generate every request of a chunk to completion; request k uses cache row k."""
        generators = make_generators([r.seed for r in requests], self.device)
        rows = list(range(len(requests)))
        hidden = self._prefill([r.prompt for r in requests])  # [S, H]
        while rows:
            tokens, logprobs = self._sample(hidden, params, [generators[r] for r in rows])
            for row, token, logprob in zip(rows, tokens, logprobs):
                self._append(requests[row], token, logprob, params)
            bar.update(sum(requests[r].finish_reason is not None for r in rows))
            rows = [r for r in rows if requests[r].finish_reason is None]
            if rows:
                # Feed each running row its newest token, at position length - 1.
                last = [requests[r].token_ids[-1] for r in rows]
                hidden = self._decode(last, [requests[r].length - 1 for r in rows], rows)

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Packed forward over all prompts, filling cache rows 0..S-1. Returns the final-norm
        hidden state of each prompt's last token ``[S, H]``."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # [S]
        cu_seqlens = torch.zeros(len(prompts) + 1, dtype=torch.int32, device=self.device)
        cu_seqlens[1:] = lengths.cumsum(0)
        input_ids = torch.tensor([t for p in prompts for t in p], device=self.device)[None]  # [1, N]
        # Positions restart at 0 for every packed sequence.
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)  # [N]
        position_ids = (torch.arange(input_ids.shape[1], device=self.device) - starts)[None]  # [1, N]
        hidden = self.model(
            input_ids,
            position_ids,
            cu_seqlens=cu_seqlens,
            kv_cache=self.kv_cache,
            cache_rows=torch.arange(len(prompts), device=self.device),
        )  # [1, N, H]
        return hidden[0, cu_seqlens[1:].long() - 1]

    def _decode(self, last_tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """One decode step: feed each row's last token at its position. Returns ``[B, H]``."""
        input_ids = torch.tensor(last_tokens, device=self.device)[:, None]  # [B, 1]
        position_ids = torch.tensor(positions, device=self.device)[:, None]  # [B, 1]
        cache_rows = torch.tensor(rows, device=self.device)  # [B]
        hidden = self.model(input_ids, position_ids, kv_cache=self.kv_cache, cache_rows=cache_rows)
        return hidden[:, 0]

    def _sample(
        self, hidden: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
    ) -> tuple[list[int], list[float]]:
        """Next token and its logprob for each row of ``hidden [B, H]``."""
        logits = self.model.compute_logits(hidden).float()  # [B, V]
        tokens = sample_tokens(logits, params, generators)  # [B]
        logprobs = sampled_logprobs(logits, tokens, params.temperature)  # [B]
        return tokens.tolist(), logprobs.tolist()

    def _append(self, req: _Request, token: int, logprob: float, params: SamplingParams) -> None:
        """Record a sampled token and decide whether the request is finished."""
        req.token_ids.append(token)
        req.logprobs.append(logprob)
        if token in params.stop_token_ids:
            req.finish_reason = "stop"
        elif len(req.token_ids) >= params.max_new_tokens or req.length >= self.max_seq_len:
            # A next token would need a cache slot past max_seq_len.
            req.finish_reason = "length"
