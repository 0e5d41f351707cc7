"""The native Llama-family decoder (Llama 3, Mistral, Qwen2/2.5, Qwen3).

Parameter names are HF's (``model.layers.0.self_attn.q_proj.weight`` ...), so HF state dicts
load with no renaming. One definition serves four call patterns of ``Transformer.forward``:

1. packed training: ``input_ids [1, N]``, ``position_ids [1, N]`` restarting at 0 per sequence,
   ``cu_seqlens [S+1]``; each token attends causally within its own sequence, no padding.
2. batch: ``input_ids [B, T]``, ``position_ids [B, T]``; plain causal attention per row.
3. paged step (prefill chunks and decode tokens together): mode 1 plus a paged ``kv_cache``
   (``.k[layer]``/``.v[layer]`` ``[num_blocks, block_size, Hkv, D]``, ``.write``; see
   ``rollout/native/block_pool.py``) and ``block_tables [S, max_blocks]``. Sequence ``s`` feeds
   the next chunk of its tokens at consecutive positions starting where its cached prefix ends;
   their keys/values are written into its blocks and each token attends to the cached prefix
   and causally to the chunk. The first ``num_decodes`` sequences hold one token each and go
   through the paged decode kernel (PagedAttention, arXiv:2309.06180).
4. paged decode: ``input_ids [B, 1]``, ``position_ids [B, 1]``, ``kv_cache``, ``block_tables [B, M]``:
   the new token is written at position ``position_ids[b]`` and attends to positions ``0..position_ids[b]``.

Numerics follow HF: RoPE cos/sin and RMSNorm are computed in fp32 and cast back to the
activation dtype, so fp32 logits match transformers to ~1e-6.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from spmd_rl.kernels.attention import causal_attention
from spmd_rl.kernels.logprob import copy_to_tensor_parallel
from spmd_rl.kernels.paged_attention import paged_decode_attention
from spmd_rl.kernels.varlen_attention import varlen_attention
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.moe import SparseMoE
from spmd_rl.models.rope import apply_rope, compute_cos_sin, compute_inv_freq


@dataclass
class AttentionInputs:
    """How the tokens of one forward call see each other and the KV cache (built once per call)."""

    cu_seqlens: torch.Tensor | None = None  # [S+1] packed sequence offsets (modes 1 and 3)
    kv_cache: object | None = None  # paged pool, written and read in modes 3 and 4
    slot_mapping: torch.Tensor | None = None  # [N] flat pool slot (block * block_size + offset) of every token
    block_tables: torch.Tensor | None = None  # [S, max_blocks] pool block of each block of each sequence
    context_lens: torch.Tensor | None = None  # [S] int32 cached tokens per sequence after this call's writes
    num_decodes: int = 0  # leading sequences (= leading tokens) with one token each: paged decode kernel
    prefill_spans: list[tuple[int, int, int]] | None = None  # (first token, end token, context_len) of the rest


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in fp32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # Tensor parallelism of a per-head norm (Qwen3's q/k norm): the replicated weight meets
        # only this rank's heads, so its gradient is a partial sum over the group.
        self.grad_sum_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight
        if self.grad_sum_group is not None:
            weight = copy_to_tensor_parallel(weight, self.grad_sum_group)
        return weight * x32.to(x.dtype)


class RotaryEmbedding:
    """cos/sin tables computed from position ids; holds no parameters or buffers.

    Keeping the inverse frequencies out of the module state means a model built on the meta
    device and materialised with ``to_empty`` needs no buffer re-initialisation.
    """

    def __init__(self, args: ModelArgs) -> None:
        # Computed on the CPU even under `with torch.device("meta")`.
        self.inv_freq, self.attention_factor = compute_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` each ``[..., T, D]`` in ``dtype``."""
        device = position_ids.device
        if device not in self._per_device:
            self._per_device[device] = self.inv_freq.to(device)
        cos, sin = compute_cos_sin(position_ids, self._per_device[device], self.attention_factor)
        return cos.to(dtype), sin.to(dtype)


class Attention(nn.Module):
    """GQA self-attention with optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, args.head_dim
        self.window = args.sliding_window
        self.kernels = "torch"  # packed attention implementation (set_kernels)
        # Packed attention ``(q, k, v, cu_seqlens, window=, backend=) -> out``; sequence parallelism
        # swaps in a version that exchanges heads with its group (distributed/ulysses.py).
        self.packed_attention = varlen_attention
        hq, hkv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, hq, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, hkv, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, hkv, bias=args.attention_bias)
        self.o_proj = nn.Linear(hq, args.hidden_size, bias=args.o_proj_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """``x [B, T, H]`` -> ``[B, T, H]``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self._attend(q, k, v, inputs)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(B, T, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if inputs.kv_cache is not None:
            return self._attend_paged(q, k, v, inputs)
        if inputs.cu_seqlens is not None:
            return self.packed_attention(q[0], k[0], v[0], inputs.cu_seqlens, window=self.window,
                                         backend=self.kernels).unsqueeze(0)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        return causal_attention(qt, kt, vt, window=self.window).transpose(1, 2)

    def _attend_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Modes 3 and 4: store this call's keys/values in the pool, then attend. ``[B, T, H*, D]`` in and out.

        Decode tokens (the first ``num_decodes``) read their whole context through the block
        table with ``paged_decode_attention`` (Triton when this layer's kernels are, else torch's
        fused SDPA over the gathered blocks). Prefill chunks: when none has a cached prefix (fresh prompts), their
        own keys are their whole context and one packed varlen call does them all; otherwise
        each chunk gathers its context ``[context_len, Hkv, D]`` from its blocks and attends
        causally with the chunk's queries aligned to the end of the context.
        """
        B, T = q.shape[:2]
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # [N, heads, D]
        cache, layer = inputs.kv_cache, self.layer_idx
        cache.write(layer, inputs.slot_mapping, k, v)
        out = torch.empty_like(q)
        nd, spans = inputs.num_decodes, inputs.prefill_spans or []
        if nd:
            out[:nd] = paged_decode_attention(
                q[:nd], cache.k[layer], cache.v[layer], inputs.block_tables[:nd], inputs.context_lens[:nd],
                window=self.window, backend="triton" if self.kernels == "triton" else "sdpa",
                scratch=getattr(cache, "gather_scratch", None),  # the pool's reusable gather buffers
            )
        if spans and all(ctx == end - start for start, end, ctx in spans):
            cu = inputs.cu_seqlens[nd:] - nd  # the chunks' tokens start right after the nd decode tokens
            out[nd:] = self.packed_attention(q[nd:], k[nd:], v[nd:], cu, window=self.window, backend=self.kernels)
        elif spans:
            block_size = cache.k[layer].shape[1]
            for s, (start, end, ctx) in enumerate(spans, start=nd):
                table = inputs.block_tables[s, : -(-ctx // block_size)].long()
                k_ctx = cache.k[layer][table].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
                v_ctx = cache.v[layer][table].flatten(0, 1)[:ctx]
                out[start:end] = _prefix_causal_attention(q[start:end], k_ctx, v_ctx, self.window)
        return out.view(B, T, *out.shape[1:])


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``. The unit FSDP2 shards."""

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.ffn_name = "mlp"  # the feed-forward's name in HF checkpoints
        if layer_idx in args.moe_layers:
            self.ffn_name = "block_sparse_moe" if args.mixtral_names else "mlp"
            setattr(self, self.ffn_name, SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                                   args.num_experts_per_tok, args.norm_topk_prob, args.mixtral_names))
        else:
            self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, inputs)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Container named ``model`` in HF checkpoints: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM; ``forward`` returns final-norm hidden states, logits are separate."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = DecoderStack(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] (or [1, N] packed)
        position_ids: torch.Tensor,  # same shape as input_ids
        *,
        cu_seqlens: torch.Tensor | None = None,  # [S+1] int32
        kv_cache: object | None = None,  # paged pool (modes 3 and 4)
        block_tables: torch.Tensor | None = None,  # [S, max_blocks] (mode 3) or [B, max_blocks] (mode 4) int32
        num_decodes: int = 0,  # mode 3: leading single-token sequences
    ) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, H]``; see the module docstring for the four modes."""
        inputs = build_attention_inputs(input_ids, position_ids, cu_seqlens, kv_cache, block_tables, num_decodes)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, inputs)
        return self.model.norm(h)

    def lm_head_weight(self) -> torch.Tensor:
        """The ``[V, H]`` output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H] @ W.T -> [..., V]`` (no temperature, no softcap)."""
        return hidden @ self.lm_head_weight().t()

    def set_kernels(self, backend: str) -> None:
        """Packed (training/prefill) attention through ``backend``: "torch" or "triton"."""
        for layer in self.model.layers:
            layer.self_attn.kernels = backend

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding Parameter again (``to_empty`` can untie them)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random init in place: N(0, std) matrices, zero biases, unit norms.

        Works after ``to_empty`` from the meta device. With a ``seed`` every parameter gets values
        drawn from its own generator (seeded by the seed and its name) on the CPU, so the result
        is the same on any device and under any sharding.
        """
        self.tie_weights()
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif seed is None:
                param.normal_(0.0, std)
            else:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                copy_full_into(param, values)


def build_attention_inputs(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    kv_cache: object | None,
    block_tables: torch.Tensor | None,
    num_decodes: int = 0,
) -> AttentionInputs:
    """Check the mode arguments and precompute where each token's k/v goes in the paged cache.

    Paged modes read the chunk bounds and context lengths back to the host (one sync per
    forward call, none per layer) only when the call holds prefill chunks.
    """
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    if cu_seqlens is not None and input_ids.shape[0] != 1:
        raise ValueError(f"packed input must be [1, N], got {tuple(input_ids.shape)}")
    if (kv_cache is None) != (block_tables is None):
        raise ValueError("kv_cache and block_tables must be given together")
    if kv_cache is None:
        return AttentionInputs(cu_seqlens=cu_seqlens)
    spans: list[tuple[int, int, int]] = []
    if cu_seqlens is None:  # mode 4: one new token per row
        if input_ids.shape[1] != 1:
            raise ValueError(f"decode takes one token per row ([B, 1]), got {tuple(input_ids.shape)}")
        pos = position_ids[:, 0]  # [B]
        seq_of_token = torch.arange(pos.shape[0], device=pos.device)
        num_decodes = pos.shape[0]
        context_lens = pos + 1
    else:  # mode 3: every sequence feeds >= 1 token; its last position + 1 is its context length
        num_seqs = cu_seqlens.shape[0] - 1
        if not 0 <= num_decodes <= num_seqs:
            raise ValueError(f"num_decodes must be in [0, {num_seqs}] (the number of packed sequences), "
                             f"got {num_decodes}")
        pos = position_ids[0]  # [N]
        cu = cu_seqlens.to(pos.device)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=pos.device), cu[1:] - cu[:-1],
                                               output_size=pos.shape[0])
        context_lens = pos[cu[1:].long() - 1] + 1  # [S]
        if num_decodes < num_seqs:
            bounds, ctx = cu.tolist(), context_lens.tolist()
            if bounds[num_decodes] != num_decodes:
                raise ValueError(f"the first num_decodes={num_decodes} sequences must hold one token each")
            spans = [(bounds[s], bounds[s + 1], ctx[s]) for s in range(num_decodes, num_seqs)]
    if block_tables.dim() != 2 or block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"block_tables must be [{context_lens.shape[0]}, max_blocks] (one row per sequence), "
                         f"got {tuple(block_tables.shape)}")
    block_size = kv_cache.k[0].shape[1]
    blocks = block_tables[seq_of_token, torch.div(pos, block_size, rounding_mode="floor")].long()
    slot_mapping = blocks * block_size + pos % block_size  # [N]
    return AttentionInputs(cu_seqlens, kv_cache, slot_mapping, block_tables, context_lens.to(torch.int32),
                           num_decodes, spans)


def _prefix_causal_attention(
    q: torch.Tensor,  # [L, Hq, D] a chunk's queries, the last L positions of its context
    k: torch.Tensor,  # [C, Hkv, D] the whole context (cached prefix + the chunk itself)
    v: torch.Tensor,  # [C, Hkv, D]
    window: int | None,
) -> torch.Tensor:
    """Causal attention of a chunk over its context, the chunk's queries aligned to the end
    (query i sits at position C - L + i) -> ``[L, Hq, D]``; optional sliding window."""
    L, C = q.shape[0], k.shape[0]
    distance = torch.arange(C - L, C, device=q.device)[:, None] - torch.arange(C, device=q.device)[None, :]
    mask = distance >= 0  # [L, C] True = attend
    if window is not None:
        mask &= distance < window
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, D]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-shape CPU tensor into ``param``, which may be a sharded DTensor."""
    if hasattr(param, "device_mesh"):
        # Every rank holds the same full tensor, so each can slice its own shard locally.
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)
