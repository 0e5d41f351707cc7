"""Our ``ModelArgs`` (Llama / Qwen2 / Qwen3, and the mixture-of-experts Mixtral / Qwen3-MoE) as megatron-core ``TransformerConfig`` and ``GPTModel``
keyword arguments. Pure: no megatron import, so the mapping is testable anywhere.

Targets megatron-core >=0.12,<0.17 (field names of ``megatron.core.transformer.TransformerConfig``
and ``megatron.core.models.gpt.GPTModel.__init__`` in those releases). The decoder it describes is
the pre-norm SwiGLU decoder of Llama (arXiv:2302.13971) with grouped-query attention
(arXiv:2305.13245) and RoPE (arXiv:2104.09864): the same math as ``spmd_rl.models.decoder``.
Sparse layers are megatron's ``MoELayer`` with the routing of ``spmd_rl.models.moe``: softmax
top-k (renormalised over the k, or not), no auxiliary loss, no capacity limit (dropless), the
experts split over ``ep`` ranks of each data-parallel group (expert parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spmd_rl.models.args import ModelArgs

# megatron-core applies Llama 3.1 RoPE scaling with these constants hard-coded (only the factor
# is an argument), so a checkpoint with other values cannot be expressed.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SUPPORTED_MCORE_ROPE_TYPES = ("default", "linear", "llama3")


def check_megatron_compatible(args: ModelArgs, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """ValueError (one line) when ``args`` or the parallel degrees cannot be mapped onto GPTModel."""
    if tp < 1 or pp < 1 or ep < 1:
        raise ValueError(f"tensor/pipeline/expert parallel sizes must be >= 1, got tp={tp}, pp={pp}, ep={ep}")
    if ep > 1 and not args.is_moe:
        raise ValueError(f"parallel.ep={ep} splits experts, but {args.model_type} has none: set parallel.ep=1")
    if args.is_moe and tp > 1:
        # megatron-core only runs MoE layers under TP with sequence parallelism, which this
        # backend does not enable (its rows are whole sequences on every TP rank).
        raise ValueError(f"{args.model_type} is a mixture-of-experts model: megatron-core needs sequence "
                         f"parallelism for MoE under tensor parallelism, which this backend does not use; "
                         f"set parallel.tp=1 and split the experts with parallel.ep, or use actor.strategy=fsdp")
    if args.is_moe and args.num_experts % ep != 0:
        raise ValueError(f"num_experts={args.num_experts} is not divisible by expert parallel size {ep}; "
                         f"choose parallel.ep among the divisors of {args.num_experts}")
    if args.o_proj_bias:
        # megatron's add_bias_linear puts a bias on every linear (MLP included), ours only on o_proj.
        raise ValueError("attention_bias on o_proj (Llama/Qwen3 attention_bias=true) has no megatron-core "
                         "equivalent; supported: q/k/v bias only (Qwen2) or no bias")
    if args.sliding_window is not None:
        raise ValueError(f"sliding_window={args.sliding_window} is not mapped to megatron-core; "
                         "supported: full causal attention (Llama, Qwen2, Qwen3)")
    rope_type = (args.rope_scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_MCORE_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not mapped to megatron-core; "
                         f"supported: {', '.join(SUPPORTED_MCORE_ROPE_TYPES)}")
    if rope_type == "llama3":
        fixed = {k: float(args.rope_scaling[k]) for k in _MCORE_LLAMA3_FIXED}
        if fixed != _MCORE_LLAMA3_FIXED:
            raise ValueError(f"llama3 rope scaling {fixed} differs from megatron-core's fixed "
                             f"{_MCORE_LLAMA3_FIXED}; only the factor may vary")
    # Column-parallel q/k/v keeps whole query groups on one rank (megatron splits by group).
    for name, value in (("num_kv_heads", args.num_kv_heads), ("num_heads", args.num_heads),
                        ("intermediate_size", args.intermediate_size)):
        if value % tp != 0:
            raise ValueError(f"{name}={value} is not divisible by tensor parallel size {tp}; "
                             f"choose tp among the divisors of {value}")
    if args.num_layers % pp != 0:
        raise ValueError(f"num_layers={args.num_layers} is not divisible by pipeline parallel size {pp}; "
                         f"choose pp among the divisors of {args.num_layers}")


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 1) -> int:
    """Vocabulary rounded up to a multiple of ``divisible_by * tp`` (vocab-parallel layers need
    equal shards). Rows past ``vocab_size`` are zero and their logits must be sliced off
    (``logits[..., :vocab_size]``) before any softmax."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def transformer_config_kwargs(
    args: ModelArgs,
    tp: int = 1,
    pp: int = 1,
    *,
    ep: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.bfloat16,
    init_method_std: float = 0.02,
) -> dict:
    """Keyword arguments of ``megatron.core.transformer.TransformerConfig`` for ``args``.

    The fields that change the math mirror ``spmd_rl.models.decoder``: RMSNorm with the
    checkpoint's epsilon, SwiGLU (``gated_linear_unit`` + silu), no bias except the optional q/k/v
    bias (Qwen2), per-head q/k RMSNorm (Qwen3), no dropout, softmax in fp32. Fusions that need
    extra kernels (bias-activation, RoPE) are off so the config runs with or without
    TransformerEngine. Sparse layers: see the module doc.
    """
    check_megatron_compatible(args, tp, pp, ep)
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        ffn_hidden_size=args.intermediate_size,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        layernorm_zero_centered_gamma=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.attention_bias,
        qk_layernorm=args.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    if pp > 1:
        kwargs["pipeline_dtype"] = params_dtype  # megatron requires it for p2p buffers
        # No variable_seq_lengths: it only tells megatron's schedules to exchange shapes, and we run
        # our own (schedule.py), where every stage knows them; megatron-core 0.16 also refuses it
        # with its default (MoE allgather) token dispatcher, even for a dense model.
    if args.is_moe:
        kwargs.update(moe_config_kwargs(args, ep))
    return kwargs


def routing_is_normalized(args: ModelArgs) -> bool:
    """Whether the top-k routing weights are renormalised to sum to 1 (always for Mixtral)."""
    return args.mixtral_names or args.norm_topk_prob


def moe_config_kwargs(args: ModelArgs, ep: int = 1) -> dict:
    """The ``TransformerConfig`` fields of the sparse layers (module doc).

    Renormalised top-k (softmax over all experts, top k, divide by their sum) equals megatron's
    top-k of the logits followed by a softmax over those k; without renormalisation it is
    megatron's ``moe_router_pre_softmax``. ``moe_router_dtype`` asks for fp32 router logits; in
    fp32 runs everything is fp32, but under bf16 autocast without TransformerEngine the router's
    matmul follows autocast (bf16 logits, probabilities rounded to bf16), where our router keeps
    fp32 probabilities: bf16 runs can differ in near-tied routing choices and by bf16 rounding
    of the weights. The allgather token dispatcher is the one that runs without
    CUDA streams; experts run one after another (no grouped GEMM, which needs TransformerEngine)."""
    return dict(
        num_moe_experts=args.num_experts,
        moe_router_topk=args.num_experts_per_tok,
        moe_ffn_hidden_size=args.moe_intermediate_size,
        moe_layer_freq=[int(i in args.moe_layers) for i in range(args.num_layers)],
        moe_router_pre_softmax=not routing_is_normalized(args),
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
    )


def gpt_model_kwargs(args: ModelArgs, tp: int = 1, *, pp: int = 1, make_vocab_size_divisible_by: int = 1) -> dict:
    """Keyword arguments of ``megatron.core.models.gpt.GPTModel`` besides ``config``,
    ``transformer_layer_spec`` and the ``pre_process``/``post_process`` stage flags.

    Tied embeddings are shared inside GPTModel only with ``pp == 1``. With ``pp > 1`` the last
    stage holds its own ``output_layer`` copy either way; GPTModel's sharing would only add an
    initial copy through ``.cuda()`` (CPU-hostile), and the policy keeps the copies equal by
    summing their gradients over the embedding group (``grads.sync_tied_embedding_grads``).

    RoPE: HF ``linear`` scaling divides positions by the factor, which is megatron's
    ``seq_len_interpolation_factor``; ``llama3`` is megatron's ``rope_scaling`` with its factor.
    """
    check_megatron_compatible(args, tp)
    rope = args.rope_scaling or {"rope_type": "default"}
    kwargs = dict(
        vocab_size=padded_vocab_size(args.vocab_size, tp, make_vocab_size_divisible_by),
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
        share_embeddings_and_output_weights=args.tie_word_embeddings and pp == 1,
        parallel_output=True,
        fp16_lm_cross_entropy=False,
    )
    if rope["rope_type"] == "linear":
        kwargs["seq_len_interpolation_factor"] = float(rope["factor"])
    elif rope["rope_type"] == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    return kwargs
