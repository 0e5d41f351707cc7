"""FLOPs of the native decoder from its shape, the peak FLOP/s of known GPUs, and MFU.

Counting convention (that of Kaplan et al. 2020, arXiv:2001.08361, and of the MFU of PaLM,
Chowdhery et al. 2022, arXiv:2204.02311, Appendix B): only matrix multiplications count, at
2 FLOPs per multiply-accumulate; norms, RoPE, SiLU, softmax, bias adds and residuals are left out
(they are a few per element, not per weight). A backward pass costs twice its forward (one matmul
for the input gradient, one for the weight gradient), so training is 3x forward.

Per token and per layer the weight matmuls are
    q, o:        2 * H * (Hq * D)      each                  (Hq query heads of width D)
    k, v:        2 * H * (Hkv * D)     each                  (GQA, Ainslie et al. 2023, arXiv:2305.13245)
    gate, up, down: 2 * H * I          each                  (SwiGLU, Shazeer 2020, arXiv:2002.05202)
plus the lm-head, 2 * H * V per token whose logits are computed (tied or not, it is a matmul).
Attention scores ``q @ k^T`` and the weighted sum ``p @ v`` cost 2 * Hq * D each per (query, key)
pair. With causal masking the token at position ``i`` (1-based) sees ``i`` keys (``min(i, W)``
with a sliding window W), so a sequence of length L has L (L + 1) / 2 pairs, not PaLM's L^2: we
count what a flash-attention kernel executes (it skips fully masked blocks), so the MFU is not
inflated by work nobody does. Packed sequences attend only within themselves, so the attention
cost is summed per sequence, never over the packed length.
"""

from __future__ import annotations

import os
import re

import torch

from spmd_rl.models.args import ModelArgs

PEAK_TFLOPS_ENV = "SPMD_RL_PEAK_TFLOPS"

# (pattern matched against torch.cuda.get_device_name, dense bf16 tensor TFLOP/s with fp32 accumulate).
# The first match wins, so a more specific name comes before the name it contains. Datasheets
# quote "with sparsity" figures (2:4 structured); the dense figure is half of that.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.4),  # Grace Hopper superchip: the H100 SXM5 GPU (H100 whitepaper 989.4 / 1978.9 sparse)
    (r"H200 NVL", 835.5),  # H200 datasheet, NVL: 1,671 TFLOPS with sparsity
    (r"H200", 989.4),  # H200 datasheet, SXM: 1,979 TFLOPS with sparsity (same tensor cores as H100 SXM5)
    (r"H100 NVL", 835.5),  # H100 datasheet, NVL: 1,671 TFLOPS with sparsity
    (r"H100 PCIe", 756.0),  # H100 whitepaper, PCIe: 756 / 1513 sparse
    (r"H100", 989.4),  # H100 whitepaper, SXM5 ("NVIDIA H100 80GB HBM3"): 989.4 / 1978.9 sparse
    (r"H800", 989.4),  # export variant of H100 SXM: same tensor throughput
    (r"H20\b", 148.0),  # H20 datasheet: 148 TFLOPS dense
    (r"B200", 2250.0),  # HGX B200 datasheet: 4.5 PFLOPS FP16/BF16 with sparsity per GPU
    (r"A100", 312.0),  # A100 datasheet (SXM4 and PCIe): 312 / 624 sparse
    (r"A800", 312.0),  # export variant of A100: same tensor throughput
    (r"L40S", 362.05),  # L40S datasheet: 362.05 / 733 sparse
    (r"L40\b", 181.05),  # L40 datasheet: 181.05 / 362.1 sparse
    (r"A10G", 125.0),  # no A10G datasheet is published; AWS's variant of the A10 (A10 datasheet 125 / 250 sparse)
    (r"A10\b", 125.0),  # A10 datasheet: 125 / 250 sparse
    (r"A40\b", 149.7),  # A40 datasheet: 149.7 / 299.4 sparse
    (r"L4\b", 121.0),  # L4 datasheet: 242 TFLOPS with sparsity
    (r"RTX 4090", 165.2),  # Ada (AD102) whitepaper, GeForce RTX 4090: 165.2 / 330.4 sparse
    (r"RTX 3090", 71.0),  # Ampere GA102 whitepaper, GeForce RTX 3090: 71 / 142 sparse
)


def layer_matmul_flops_per_token(args: ModelArgs, layer: int = 0) -> int:
    """Forward FLOPs of decoder layer ``layer``'s weight matmuls for one token (no attention
    scores). A sparse layer counts the router and the k experts the token visits, not all of them."""
    H, D = args.hidden_size, args.head_dim
    q_and_o = 2 * (2 * H * args.num_heads * D)
    k_and_v = 2 * (2 * H * args.num_kv_heads * D)
    mlp = 3 * (2 * H * args.active_ffn_size(layer))
    router = 2 * H * args.num_experts if layer in args.moe_layers else 0
    return q_and_o + k_and_v + mlp + router


def decoder_matmul_flops_per_token(args: ModelArgs) -> int:
    """:func:`layer_matmul_flops_per_token` summed over the layers."""
    return sum(layer_matmul_flops_per_token(args, layer) for layer in range(args.num_layers))


def lm_head_flops_per_token(args: ModelArgs) -> int:
    """Forward FLOPs of the ``[H] -> [V]`` output projection for one token."""
    return 2 * args.hidden_size * args.vocab_size


def attention_flops(args: ModelArgs, seq_len: int, causal: bool = True) -> int:
    """Forward FLOPs of ``q k^T`` and ``p v`` over all layers for one sequence of ``seq_len`` tokens.

    ``causal=True`` counts the (query, key) pairs a causal (and sliding-window) mask keeps,
    sum over i = 1..L of min(i, W); ``causal=False`` counts the full L x L square, which is what a
    dense kernel computes before masking (e.g. SDPA's math path) and what PaLM's formula assumes.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    pairs = seq_len * seq_len if not causal else _causal_pairs(seq_len, args.sliding_window)
    return args.num_layers * 2 * (2 * args.num_heads * args.head_dim) * pairs


def _causal_pairs(seq_len: int, window: int | None) -> int:
    """sum_{i=1..L} min(i, W): keys seen by each query under a causal (sliding-window) mask."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    # Queries 1..W see 1..W keys; the remaining L - W queries see W keys each.
    return window * (window + 1) // 2 + (seq_len - window) * window


def decoder_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward FLOPs per token, averaged over one causal sequence of ``seq_len`` tokens.

    Weight matmuls of every layer + lm-head + this sequence's attention divided by its length
    (a token deep in the sequence attends to more keys than an early one).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    dense = decoder_matmul_flops_per_token(args) + lm_head_flops_per_token(args)
    return dense + attention_flops(args, seq_len) / seq_len


def forward_flops(args: ModelArgs, token_lengths: list[int], lm_head_tokens: int | None = None) -> int:
    """Forward FLOPs of a packed batch: sequence ``s`` has ``token_lengths[s]`` tokens.

    ``lm_head_tokens``: how many tokens get logits; None = every token. The trainer projects
    only the hidden states that predict response tokens (``sum(response_lengths)``), and the
    rollout engine only the last prompt token and each decoded one (the same count).
    """
    if any(L < 0 for L in token_lengths):
        raise ValueError(f"token_lengths must be >= 0, got {token_lengths}")
    num_tokens = sum(token_lengths)
    lm_tokens = num_tokens if lm_head_tokens is None else lm_head_tokens
    if not 0 <= lm_tokens <= num_tokens:
        raise ValueError(f"lm_head_tokens must be in [0, {num_tokens}] (the number of tokens), got {lm_head_tokens}")
    weights = num_tokens * decoder_matmul_flops_per_token(args)
    attention = sum(attention_flops(args, L) for L in token_lengths)
    return weights + attention + lm_tokens * lm_head_flops_per_token(args)


def training_flops(args: ModelArgs, token_lengths: list[int], lm_head_tokens: int | None = None) -> int:
    """Forward + backward FLOPs of one pass over a packed batch: 3x :func:`forward_flops`.

    Activation recomputation (if any) is not counted: MFU counts useful model FLOPs only.
    """
    return 3 * forward_flops(args, token_lengths, lm_head_tokens)


def inference_flops(args: ModelArgs, token_lengths: list[int], lm_head_tokens: int | None = None) -> int:
    """Forward-only FLOPs (logprob passes, generation).

    Generation with a KV cache computes every token's projections once and each new token's
    attention over its causal prefix, so prefill + decode of ``prompt + response`` costs the same
    as one packed forward over it.
    """
    return forward_flops(args, token_lengths, lm_head_tokens)


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``), None if unknown."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


def peak_flops(device: torch.device | str | None) -> float | None:
    """Peak dense bf16 FLOP/s of one ``device``; None on CPU or an unknown GPU.

    ``SPMD_RL_PEAK_TFLOPS`` (in TFLOP/s) overrides the table on any device, for GPUs not in it
    or to measure against another precision's peak.
    """
    override = os.environ.get(PEAK_TFLOPS_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"{PEAK_TFLOPS_ENV}={override!r} must be a positive number of TFLOP/s, e.g. 989.4")
        return value * 1e12
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(flops: float, seconds: float, device: torch.device | str | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: ``flops / (seconds * world_size * peak)``.

    ``flops`` is the work of all ``world_size`` devices together in ``seconds`` of wall time;
    None when the peak is unknown (CPU, an unlisted GPU) or no time was measured.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    peak = peak_flops(device)
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * world_size * peak)
