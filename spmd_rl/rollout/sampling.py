"""Token sampling as pure functions: logit processing (penalties, temperature, top-k, top-p,
min-p), seeded per-row sampling, the logprobs of the sampled token, and the seed schedule that
makes a request reproducible on its own.

Processing order (vLLM's sampler, and HF's logits-processor order):

1. penalties on the raw logits: repetition (CTRL, arXiv:1909.05858), then frequency, then
   presence (OpenAI semantics, over the output tokens only);
2. ``/ temperature`` (T = 1 for greedy);
3. top-k (arXiv:1805.04833);
4. top-p on the renormalised survivors (nucleus sampling, arXiv:1904.09751);
5. min-p (arXiv:2407.01082): drop tokens below ``min_p x`` the top probability.

This is vLLM's V0 sampler order; vLLM's V1 sampler moves min-p before top-k/top-p. The min-p
threshold is the same either way (renormalisation does not change ``p / p_max``), but top-p then
sees a different set, so the two orders can keep different tokens when both are on.

Greedy (T = 0) is the argmax of the penalised logits: truncation never removes the top token,
so it does not change the argmax, and greedy draws no randomness.

Reproducibility contract: every row (one sequence being generated) draws its randomness from its
own ``torch.Generator``, seeded from ``(prompt seed, sample index)``. A request's tokens then
depend only on its prompt, its seed and the weights, never on which other requests share the
batch or on how the engine chunks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spmd_rl.kernels.logprob import logprobs_from_logits
from spmd_rl.rollout.types import SamplingParams

_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------- logit processing


def token_counts(
    seqs: list[list[int]] | torch.Tensor,  # [B][len_b] token ids, or a [B, T] LongTensor
    vocab_size: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """How often each token occurs in each row: float32 ``[B, V]``.

    An engine can build this once per request and add one per sampled token
    (``counts[rows, tokens] += 1``) instead of recounting the whole output every step.
    """
    if isinstance(seqs, torch.Tensor):
        ids = seqs.long()
        counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
        return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    counts = torch.zeros(len(seqs), vocab_size, dtype=torch.float32, device=device)
    rows = torch.tensor([b for b, seq in enumerate(seqs) for _ in seq], dtype=torch.long, device=device)
    ids = torch.tensor([t for seq in seqs for t in seq], dtype=torch.long, device=device)
    return counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)


def apply_penalties(
    logits: torch.Tensor,  # [B, V] fp32, raw
    prompt_counts: torch.Tensor | None,  # [B, V] occurrences in the prompt (only read for repetition)
    output_counts: torch.Tensor,  # [B, V] occurrences in the generated tokens so far
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """Return penalised logits ``[B, V]`` (vLLM's and the OpenAI API's semantics).

    * repetition (CTRL, arXiv:1909.05858): for tokens seen in prompt or output, a logit > 0 is
      divided by the penalty and any other is multiplied by it, so p > 1 always lowers them;
    * frequency: ``logit -= frequency_penalty * count_in_output``;
    * presence: ``logit -= presence_penalty * (count_in_output > 0)``.

    Frequency and presence look at the output only (the prompt is the user's text, not a
    repetition by the model), repetition at prompt and output, as in vLLM.
    """
    out = logits
    if repetition_penalty != 1.0:
        if prompt_counts is None:
            raise ValueError("repetition_penalty needs the prompt token counts: pass prompt_counts")
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalised = torch.where(out > 0, out / repetition_penalty, out * repetition_penalty)
        out = torch.where(seen, penalised, out)
    if frequency_penalty != 0.0:
        out = out - frequency_penalty * output_counts
    if presence_penalty != 0.0:
        out = out - presence_penalty * (output_counts > 0).to(out.dtype)
    return out


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V] (already temperature-scaled)
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """Return logits ``[B, V]`` with ``-inf`` outside the top-k tokens and the top-p nucleus.

    Top-k (arXiv:1805.04833) is applied first, then top-p (arXiv:1904.09751) on the renormalised
    survivors (the order HF and vLLM use). The nucleus is the smallest prefix of the sorted tokens
    whose mass reaches ``top_p``; the most likely token always survives. Ties are broken towards
    the lower token id (a stable sort), as ``argmax`` does. ``top_k == -1`` and ``top_p == 1``
    are no-ops.
    """
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    use_p = top_p < 1.0
    if not (use_k or use_p):
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        remove[..., top_k:] = True
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    if use_p:
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= top_p
        remove[..., 0] = False
    # Undo the sort: remove_unsorted[b, sorted_idx[b, j]] = remove[b, j].
    remove_unsorted = torch.empty_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(remove_unsorted, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:  # [B, V] -> [B, V]
    """Return logits with ``-inf`` for tokens whose probability is below ``min_p`` times the
    most likely token's (min-p sampling, arXiv:2407.01082). ``min_p == 0`` is a no-op; the top
    token always survives. Earlier ``-inf`` entries stay ``-inf``."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,  # [B, V] fp32, raw (not temperature-scaled)
    params: SamplingParams,
    generated: list[list[int]] | None = None,  # [B][num_generated] output tokens of each row so far
    prompts: list[list[int]] | None = None,  # [B][prompt_len] prompt of each row
    *,
    prompt_counts: torch.Tensor | None = None,  # [B, V] precomputed token_counts(prompts)
    output_counts: torch.Tensor | None = None,  # [B, V] precomputed token_counts(generated)
) -> torch.Tensor:
    """The logits ``[B, V]`` of the distribution tokens are drawn from: penalties ->
    temperature -> top-k -> top-p -> min-p (see the module docstring), ``-inf`` for removed
    tokens. ``softmax`` of the result is the sampling distribution; greedy uses T = 1.

    ``generated`` is needed only when a penalty is on, ``prompts`` only for the repetition
    penalty; precomputed counts (:func:`token_counts`) replace the lists. Pure: ``logits`` is
    not modified.
    """
    penalised = _penalise(logits, params, generated, prompts, prompt_counts, output_counts)
    return _truncate(penalised, params)


def _penalise(logits, params, generated, prompts, prompt_counts, output_counts) -> torch.Tensor:
    """:func:`apply_penalties` with counts built from the token lists when not given."""
    if not params.has_penalties:
        return logits
    rows, vocab = logits.shape
    if output_counts is None:
        if generated is None:
            raise ValueError(
                "sampling penalties need each row's generated tokens: pass generated= or output_counts="
            )
        if len(generated) != rows:
            raise ValueError(f"got generated tokens for {len(generated)} rows, the logits have {rows}")
        output_counts = token_counts(generated, vocab, logits.device)
    if params.repetition_penalty != 1.0 and prompt_counts is None:
        if prompts is None:
            raise ValueError("repetition_penalty needs each row's prompt: pass prompts= or prompt_counts=")
        if len(prompts) != rows:
            raise ValueError(f"got prompts for {len(prompts)} rows, the logits have {rows}")
        prompt_counts = token_counts(prompts, vocab, logits.device)
    return apply_penalties(
        logits,
        prompt_counts,
        output_counts,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )


def _truncate(penalised: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k/top-p, then min-p."""
    return _cut(_scale(penalised, params), params)


def _scale(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits / T`` (T = 1 for greedy); the very tensor when T = 1."""
    temp = params.logprob_temperature
    return logits if temp == 1.0 else logits / temp


def _cut(scaled: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Top-k/top-p, then min-p; the very tensor when all three are off."""
    return apply_min_p(apply_top_k_top_p(scaled, params.top_k, params.top_p), params.min_p)


# ---------------------------------------------------------------------------- sampling


def _inverse_cdf_draw(probs: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One exact draw per row of ``probs [B, V]``: the first token whose cumulative probability
    exceeds ``u * total``, ``u ~ U[0, 1)``. Row ``b``'s ``u`` comes from ``generators[b]`` (torch's
    global RNG when None): one scalar per row per step, so a step costs ``B`` tiny draws rather
    than ``B x V`` noise values (the exponential race), and a row's token still depends on its
    own seed only. The cumulative sum is in float64 so a token's share of ``[0, total)`` is
    its probability to ~1e-16; a 0-probability token owns an empty interval and is never drawn."""
    rows = probs.shape[0]
    if generators is None:
        u = torch.rand(rows, dtype=torch.float64, device=probs.device)
    else:
        if len(generators) != rows:
            raise ValueError(f"got {len(generators)} generators for {rows} rows")
        u = _uniforms(generators, probs.device)
    # In place on a float64 copy: an out-of-place cumsum allocates (and page-faults in) a
    # second [B, V] float64 buffer, several times the cost of the scan itself on CPU.
    cdf = probs.to(torch.float64, copy=True).cumsum_(dim=-1)  # [B, V]
    target = u.to(cdf.device) * cdf[:, -1]  # [B], inside [0, total)
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1).clamp_max(probs.shape[1] - 1)


def _uniforms(generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """``[B]`` float64, element ``b`` drawn from ``generators[b]``: the very number
    ``torch.rand(1, generator=g, dtype=torch.float64)`` gives, written in place into one buffer
    (no per-row tensor and concatenation). On the generators' device (``device`` when there are none)."""
    u = torch.empty(len(generators), dtype=torch.float64, device=generators[0].device if generators else device)
    for element, g in zip(u.unbind(0), generators):
        element.uniform_(generator=g)
    return u


def sample_tokens(
    logits: torch.Tensor,  # [B, V] fp32, raw (not temperature-scaled)
    params: SamplingParams,
    generators: list[torch.Generator] | None = None,
    *,
    generated: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    prompt_counts: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one token per row. Returns token ids ``[B]`` (int64, on the logits' device).

    Greedy (``temperature == 0``) is the argmax of the penalised logits and uses no randomness.
    Otherwise one draw from ``softmax(process_logits(...))`` by inverse-CDF sampling; row ``b``'s
    uniform comes from ``generators[b]`` so each row's draw depends on its own seed only (one
    uniform per row per step, whatever the options). With ``generators=None`` the
    noise comes from torch's global RNG. The keyword arguments are as in :func:`process_logits`.
    """
    penalised = _penalise(logits, params, generated, prompts, prompt_counts, output_counts)
    if params.greedy:
        return penalised.argmax(dim=-1)
    return _inverse_cdf_draw(_truncate(penalised, params).softmax(dim=-1), generators)


def sampled_logprobs(
    logits: torch.Tensor,  # [B, V] fp32, raw
    tokens: torch.Tensor,  # [B]
    temperature: float,
) -> torch.Tensor:
    """Logprob ``[B]`` of ``tokens`` under ``log_softmax(logits / T)`` (T = 1 when greedy): the
    trainer-side distribution, before penalties and top-k/top-p/min-p.

    Computed with the trainer's own function, so engine and trainer logprobs of the same token
    agree up to the forward pass's numerics.
    """
    temp = 1.0 if temperature == 0.0 else float(temperature)
    scaled = logits if temp == 1.0 else logits / temp
    logprobs, _ = logprobs_from_logits(scaled, tokens)
    return logprobs


@dataclass
class SampledTokens:
    """One sampling step's result, every field ``[B]``."""

    tokens: torch.Tensor  # int64 token ids
    logprobs: torch.Tensor  # log_softmax(logits / T)[token]: the trainer-side distribution
    sampled_logprobs: torch.Tensor  # log_softmax(process_logits(logits))[token]: the one drawn from
    raw_logprobs: torch.Tensor | None  # log_softmax(logits)[token] at T = 1; None unless asked for


def sample_with_logprobs(
    logits: torch.Tensor,  # [B, V] fp32, raw (not temperature-scaled)
    params: SamplingParams,
    generators: list[torch.Generator] | None = None,
    *,
    generated: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    prompt_counts: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> SampledTokens:
    """Sample one token per row and report its three logprobs (see
    :class:`~spmd_rl.rollout.types.Completion`).

    Draws exactly the tokens :func:`sample_tokens` draws from the same generator states, and
    processes the logits once for both the draw and ``sampled_logprobs``. For greedy,
    ``sampled_logprobs`` is taken under the processed distribution at T = 1 (the argmax itself
    is a point mass whose log-probability 0 says nothing), as vLLM reports it.
    """
    penalised = _penalise(logits, params, generated, prompts, prompt_counts, output_counts)
    scaled = _scale(penalised, params)  # [B, V]
    processed = _cut(scaled, params)  # [B, V]
    if params.greedy:
        tokens = penalised.argmax(dim=-1)
    else:
        tokens = _inverse_cdf_draw(processed.softmax(dim=-1), generators)
    # One log-softmax per distinct distribution (each helper returns its input when it changes
    # nothing): without penalties the scaled logits are the trainer's (sampled_logprobs), without
    # truncation too the sampled one, and at T = 1 the raw one.
    trainer_logits = scaled if penalised is logits else _scale(logits, params)
    trainer_lp = logprobs_from_logits(trainer_logits, tokens)[0]
    processed_lp = trainer_lp if processed is trainer_logits else logprobs_from_logits(processed, tokens)[0]
    raw = None
    if params.return_raw_logprobs:
        raw = trainer_lp if trainer_logits is logits else logprobs_from_logits(logits, tokens)[0]
    return SampledTokens(tokens, trainer_lp, processed_lp, raw)


# ---------------------------------------------------------------------------- seeds


def resolve_prompt_seeds(
    num_prompts: int, params: SamplingParams, seeds: list[int] | None = None
) -> list[int]:
    """Seed of each prompt: ``seeds[i]`` if given, else ``params.seed + i``, else drawn from
    torch's global RNG (so ``torch.manual_seed`` still makes a run reproducible)."""
    if seeds is not None:
        if len(seeds) != num_prompts:
            raise ValueError(f"got {len(seeds)} seeds for {num_prompts} prompts")
        return [int(s) for s in seeds]
    if params.seed is not None:
        return [params.seed + i for i in range(num_prompts)]
    return torch.randint(0, 2**62, (num_prompts,)).tolist()


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer: a bijection on 64-bit ints that scrambles nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(prompt_seed: int, sample_index: int) -> int:
    """Seed of sample ``sample_index`` of a prompt: a fixed hash of ``(prompt_seed, index)``.

    Hashing (rather than ``prompt_seed + index``) keeps sample j of prompt i and sample j-1 of
    prompt i+1 from sharing a stream when prompt seeds are consecutive. Result fits in int63.
    """
    return _splitmix64(_splitmix64(prompt_seed & _MASK64) ^ sample_index) >> 1


def make_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per row, on ``device`` (the device the noise lives on)."""
    gens = []
    for seed in seeds:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        gens.append(gen)
    return gens
