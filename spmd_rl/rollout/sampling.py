"""Token sampling as pure functions: top-k/top-p masking, seeded per-row sampling, the logprob
of the sampled token, and the seed schedule that makes a request reproducible on its own.

Reproducibility contract: every row (one sequence being generated) draws its randomness from its
own ``torch.Generator``, seeded from ``(prompt seed, sample index)``. A request's tokens then
depend only on its prompt, its seed and the weights, never on which other requests share the
batch or on how the engine chunks them.
"""

from __future__ import annotations

import torch

from spmd_rl.kernels.logprob import logprobs_from_logits
from spmd_rl.rollout.types import SamplingParams

_MASK64 = (1 << 64) - 1


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V] (already temperature-scaled)
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """Return logits ``[B, V]`` with ``-inf`` outside the top-k tokens and the top-p nucleus.

    Top-k is applied first, then top-p on the renormalised survivors (the order HF uses). The
    nucleus is the smallest prefix of the sorted tokens whose mass reaches ``top_p``; the most
    likely token always survives. ``top_k == -1`` and ``top_p == 1`` are no-ops.
    """
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    use_p = top_p < 1.0
    if not (use_k or use_p):
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [B, V]
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


def sample_tokens(
    logits: torch.Tensor,  # [B, V] fp32, raw (not temperature-scaled)
    params: SamplingParams,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample one token per row. Returns token ids ``[B]`` (int64, on the logits' device).

    Greedy (``temperature == 0``) is the argmax of the raw logits and uses no randomness.
    Otherwise the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, draws exactly from ``p`` (the
    temperature-scaled, top-k/top-p-masked softmax); row ``b``'s noise comes from
    ``generators[b]`` so each row's draw depends on its own seed only. With ``generators=None``
    the noise comes from torch's global RNG.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits if params.temperature == 1.0 else logits / params.temperature
    probs = apply_top_k_top_p(scaled, params.top_k, params.top_p).softmax(dim=-1)  # [B, V]
    noise = torch.empty_like(probs)
    if generators is None:
        noise.exponential_()
    else:
        if len(generators) != probs.shape[0]:
            raise ValueError(f"got {len(generators)} generators for {probs.shape[0]} rows")
        for row, gen in enumerate(generators):
            noise[row].exponential_(generator=gen)
    # E == 0 would turn a masked 0-probability token into 0/0 = nan, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def sampled_logprobs(
    logits: torch.Tensor,  # [B, V] fp32, raw
    tokens: torch.Tensor,  # [B]
    temperature: float,
) -> torch.Tensor:
    """Logprob ``[B]`` of ``tokens`` under ``log_softmax(logits / T)`` (T = 1 when greedy).

    Computed before top-k/top-p masking with the trainer's own function, so engine and trainer
    logprobs of the same token agree up to the forward pass's numerics.
    """
    temp = 1.0 if temperature == 0.0 else float(temperature)
    scaled = logits if temp == 1.0 else logits / temp
    logprobs, _ = logprobs_from_logits(scaled, tokens)
    return logprobs


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
