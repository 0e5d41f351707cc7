"""Per-token logprob (and entropy) of target ids from hidden states and the lm-head weight.

The torch reference below is the CPU path and the oracle for the fused Triton kernel. It is
chunked over tokens so the ``[N, V]`` logits never exist in full at once; the trainer and the
generation engine both call it, so their logprobs come from the same math.
"""

from __future__ import annotations

import torch


def logprobs_from_hidden(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H] lm-head weight
    targets: torch.Tensor,  # [N] token ids
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(logprobs [N], entropy [N] or None)`` of ``targets`` under
    ``softmax(hidden @ weight.T / temperature)``, computed in fp32."""
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        logits = (h @ weight.t()).float()  # [n, V]
        if temperature != 1.0:
            logits = logits / temperature
        lp, ent = logprobs_from_logits(logits, targets[start : start + chunk_size], with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    logprobs_all = torch.cat(logprobs) if logprobs else hidden.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return logprobs_all, None
    entropy_all = torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=torch.float32)
    return logprobs_all, entropy_all


def logprobs_from_logits(
    logits: torch.Tensor,  # [N, V] fp32, already divided by the temperature
    targets: torch.Tensor,  # [N]
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of ``targets`` (and the entropy) from logits: ``log_softmax`` then gather."""
    log_z = torch.logsumexp(logits, dim=-1)  # [N]
    target_logits = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    logprobs = target_logits - log_z
    if not with_entropy:
        return logprobs, None
    probs = torch.softmax(logits, dim=-1)
    entropy = log_z - (probs * logits).sum(-1)  # H = logZ - E_p[logit]
    return logprobs, entropy
