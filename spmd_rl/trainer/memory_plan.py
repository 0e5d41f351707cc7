"""A per-rank memory plan of an RL run, computed from the config and the model shape at startup.

Two phases share one device: **generation** (the rollout engine's weights and KV cache, plus
whatever training state was not offloaded) and **training** (the actor update: sharded
parameters, gradients, AdamW state, the gathered weights of the blocks being computed and one
micro-batch of activations; the engine keeps its weights but frees its KV cache). The plan is the
larger of the two. Items, per rank, with ``P`` parameters, ``shard = dp_shard x sp x tp``
(FSDP shards over ``dp_shard x sp``, tensor parallelism over ``tp``; ``dp_replicate`` copies):

* parameters      ``4 P / shard``: FSDP2 keeps the sharded parameters in fp32 and casts each
                  block to the compute dtype when it gathers it, so they *are* the fp32 master
                  copy (counting a separate master would count them twice);
* gradients       ``4 P / shard`` (fp32, reduce-scattered);
* optimizer state ``8 P / shard``: AdamW's exp_avg and exp_avg_sq in fp32
                  (Loshchilov & Hutter 2019, arXiv:1711.05101); 16 bytes per parameter in all, the
                  figure of ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054);
* gathered weights ``b (P_root + 2 P_block) / tp``: the root module (embedding, lm-head, final
                  norm) stays gathered through a forward, plus the block being computed and the one
                  prefetched, in the compute dtype ``b`` (2 for bf16 on GPU, 4 in fp32);
* activations     per micro-batch, below;
* logits          the lm-head's per-token saved tensors: the torch reference keeps the fp32
                  logits and probabilities, ``(8 V / tp + 4)`` bytes per response token; the fused
                  Triton kernel recomputes them and holds one gradient chunk of at most 2^28
                  elements;
* rollout weights ``b_e P / tp``: the generation engine's own copy (tensor-parallel with the trainer) in its dtype;
                  0 when the engine reads the trainer's parameters in place (``rollout.share_weights``);
* KV cache        ``max_num_seqs x (max_prompt + max_response) x layers x 2 x kv_heads x head_dim x b_e / tp``,
                  at most ``rollout.kv_cache_gb`` on CPU (the engine's paged pool size);
* reference / critic parameters (and the critic's gradients and optimizer state) the same way.

Activations (Korthikanti et al. 2022, arXiv:2205.05198, section 4, redone for this decoder:
RMSNorm in fp32, SwiGLU, GQA, RoPE, an SDPA/flash-style attention that saves no ``T x T``
matrix). Per token and layer, with ``H`` hidden, ``A_q = heads x D``, ``A_kv = kv_heads x D``,
``I`` intermediate (the last three divided by tp), the tensors autograd saves are::

    2 (4H + 4 + bH)          two RMSNorms: fp32 copy of the input, 1/rms, normalised output
    + 2 bH                   inputs of the q/k/v and gate/up projections
    + b (2 A_q + 2 A_kv)     q and k after RoPE, v, the attention output
    + 4 heads                the attention's log-sum-exp
    + b A_q                  (packed rows only) the concatenated per-sequence outputs
    + 4 b I                  gate, up, silu(gate), silu(gate) * up
    + (4 + b)(A_q + A_kv) + 4 (heads + kv_heads)      (qk-norm, Qwen3)

which matches, byte for byte, what ``saved_tensors_hooks`` records for ``DecoderLayer`` on CPU
(``tests/unit/test_memory_plan.py``). Layers see ``tokens / sp`` tokens each. With activation
checkpointing a layer keeps only its input (``bH`` per token) and one layer's full set lives
again while it is recomputed in the backward. Outside the layers: the final norm
(``4H + 4 + bH`` per token) and the ``[M, H]`` hidden states of the response tokens fed to the
lm-head. A micro-batch holds ``micro_batch_size_per_device x (max_prompt + max_response)``
tokens (padded batches are padded to the longest sequence, at most that), or
``max_tokens_per_micro_batch`` with dynamic batching (response tokens then in the same
proportion as a full-length sequence).

Left out: the CUDA context, NCCL buffers, allocator fragmentation and the transient buffers of a
collective (typically 1-3 GiB together), and the actor's and critic's gradients never coexisting
(both are counted: an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs

GIB = 1024**3
# Largest logits-gradient chunk the fused logprob backward allocates (kernels/logprob.py).
FUSED_LOGPROB_CHUNK_ELEMS = 1 << 28


@dataclass(frozen=True)
class MemoryItem:
    """Bytes per rank of one thing, the phases it is resident in, and how to shrink it."""

    name: str
    bytes: int
    generation: bool  # resident while the engine generates
    training: bool  # resident during the actor update
    knob: str  # what to change when this item is what does not fit
    training_knob: str = ""  # the knob when training is the phase that does not fit (default: knob)
    note: str = ""  # shown beside the item in the printed plan


@dataclass(frozen=True)
class MemoryPlan:
    items: tuple[MemoryItem, ...]
    device_bytes: int | None  # memory to fit in; None = unchecked
    device_source: str  # where device_bytes came from, for messages

    def item(self, name: str) -> MemoryItem:
        return next(i for i in self.items if i.name == name)

    def phase_bytes(self, phase: str) -> int:
        """Total of the items resident in ``phase`` ("generation" or "training")."""
        return sum(i.bytes for i in self.items if getattr(i, phase))

    @property
    def peak_phase(self) -> str:
        return "training" if self.phase_bytes("training") >= self.phase_bytes("generation") else "generation"

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)


# ------------------------------------------------------------------------------------ counts


def block_param_count(args: ModelArgs, layer: int = 0) -> int:
    """Parameters of decoder block ``layer`` (a sparse one holds every expert and the router)."""
    H, D = args.hidden_size, args.head_dim
    q, kv = args.num_heads * D, args.num_kv_heads * D
    attention = H * q + 2 * H * kv + q * H
    if args.attention_bias:
        attention += q + 2 * kv
    if args.o_proj_bias:
        attention += H
    if args.qk_norm:
        attention += 2 * D
    ffn = 3 * H * args.intermediate_size
    if layer in args.moe_layers:
        ffn = expert_param_count(args, layer) + H * args.num_experts  # + the router
    return attention + ffn + 2 * H


def expert_param_count(args: ModelArgs, layer: int) -> int:
    """Parameters of decoder layer ``layer``'s experts (0 for a dense layer)."""
    return args.num_experts * 3 * args.hidden_size * args.moe_intermediate_size if layer in args.moe_layers else 0


def largest_block_param_count(args: ModelArgs) -> int:
    return max(block_param_count(args, layer) for layer in range(args.num_layers))


def root_param_count(args: ModelArgs) -> int:
    """Parameters outside the blocks: embedding, lm-head (unless tied), final norm."""
    embedding = args.vocab_size * args.hidden_size
    return embedding + (0 if args.tie_word_embeddings else embedding) + args.hidden_size


def param_count(args: ModelArgs) -> int:
    """Parameters of the decoder (tied embeddings counted once)."""
    return sum(block_param_count(args, layer) for layer in range(args.num_layers)) + root_param_count(args)


def activation_bytes_per_token_layer(args: ModelArgs, dtype_bytes: int, *, packed: bool = True, tp: int = 1) -> int:
    """Bytes autograd saves per token in one decoder layer (module docstring's formula; a sparse
    layer counts the k experts a token visits, plus its k gathered inputs and the router's scores)."""
    H, D = args.hidden_size, args.head_dim
    heads, kv_heads = args.num_heads // tp, args.num_kv_heads // tp
    widest = max(args.active_ffn_size(layer) for layer in range(args.num_layers))
    a_q, a_kv, inter, b = heads * D, kv_heads * D, widest // tp, dtype_bytes
    total = 2 * (4 * H + 4 + b * H) + 2 * b * H + b * (2 * a_q + 2 * a_kv) + 4 * heads + 4 * b * inter
    if packed:
        total += b * a_q
    if args.qk_norm:
        total += (4 + b) * (a_q + a_kv) + 4 * (heads + kv_heads)
    if args.is_moe:  # per (token, expert) slot: the gathered input, the expert's output and its
        # weighted copy, two int64 indices and 12 B of routing bookkeeping, the routing weight
        # (fp32 for Mixtral); per token: the router's fp32 probabilities and the normaliser
        weight = 4 if args.mixtral_names or b == 4 else b
        total += args.num_experts_per_tok * (3 * b * H + 28 + weight) + 4 * args.num_experts + 4
    return total


def micro_batch_activation_bytes(args: ModelArgs, dtype_bytes: int, tokens: int, response_tokens: int, *,
                                 checkpointing: bool, packed: bool = True, tp: int = 1, sp: int = 1) -> int:
    """Saved activations of one micro-batch of ``tokens`` (``response_tokens`` of which feed the
    lm-head or value head), layers and final norm; the lm-head's own tensors are not included."""
    layer_tokens = math.ceil(tokens / sp)
    per_layer = activation_bytes_per_token_layer(args, dtype_bytes, packed=packed, tp=tp)
    H, b = args.hidden_size, dtype_bytes
    if checkpointing:  # block inputs, plus one block's full set while it is recomputed
        layers = layer_tokens * (args.num_layers * b * H + per_layer)
    else:
        layers = layer_tokens * args.num_layers * per_layer
    final_norm = layer_tokens * (4 * H + 4 + b * H)
    return layers + final_norm + response_tokens * b * H


def micro_batch_tokens(data, micro_batch_size: int, max_tokens: int) -> tuple[int, int]:
    """``(tokens, response tokens)`` of the largest micro-batch: ``micro_batch_size`` full-length
    sequences, or a ``max_tokens`` budget (> 0), response tokens then in the proportion of a
    full-length sequence; a sequence longer than the budget goes alone."""
    seq_len = data.max_prompt_length + data.max_response_length
    if max_tokens > 0:
        tokens = max(max_tokens, seq_len)
        return tokens, tokens * data.max_response_length // seq_len
    return micro_batch_size * seq_len, micro_batch_size * data.max_response_length


def logits_bytes(args: ModelArgs, response_tokens: int, dtype_bytes: int, *, kernels: str, tp: int = 1) -> int:
    """What the lm-head -> logprob step holds for ``response_tokens`` tokens (module docstring)."""
    vocab = math.ceil(args.vocab_size / tp)
    if kernels == "triton":
        return min(response_tokens * vocab, FUSED_LOGPROB_CHUNK_ELEMS) * dtype_bytes
    return response_tokens * (8 * vocab + 4)


def engine_kv_bytes(cfg, args: ModelArgs, max_seq_len: int, dtype_bytes: int, tp: int, device_type: str,
                    device_bytes: int | None = None) -> int:
    """The KV cache the engine will allocate per rank: enough for ``max_num_seqs`` full-length
    sequences (kv heads split over tp), but never more than ``rollout.kv_cache_gb`` on CPU or
    ``rollout.gpu_memory_utilization`` of the device on GPU (the engines size their cache so)."""
    bound = kv_cache_bytes(args, cfg.rollout.max_num_seqs, max_seq_len, dtype_bytes) // tp
    if device_type == "cpu":
        return min(bound, int(cfg.rollout.kv_cache_gb * GIB))
    if device_bytes is not None:  # the engines size their cache from a fraction of the device
        return min(bound, int(cfg.rollout.gpu_memory_utilization * device_bytes))
    return bound


def kv_cache_bytes(args: ModelArgs, max_num_seqs: int, max_seq_len: int, dtype_bytes: int) -> int:
    """The native engine's cache: ``[max_num_seqs, kv_heads, max_seq_len, head_dim]`` keys and values per layer."""
    return max_num_seqs * max_seq_len * args.num_layers * 2 * args.num_kv_heads * args.head_dim * dtype_bytes


# ------------------------------------------------------------------------------------- plan


def plan_memory(cfg, model_args: ModelArgs, dims, device_bytes: int | None, *, device_type: str = "cuda",
                critic_args: ModelArgs | None = None, device_source: str = "device memory",
                engine_shares_weights: bool = False) -> MemoryPlan:
    """The per-rank plan of the run ``cfg`` (a :class:`~spmd_rl.config.Config`) for a policy of
    shape ``model_args`` under ``dims`` (:class:`~spmd_rl.distributed.parallel_dims.ParallelDims`).

    ``device_type`` sets the dtypes as the trainer does (bf16 compute and generation on CUDA
    for ``model.dtype=auto``; ``model.dtype`` otherwise); ``critic_args`` is the value model's trunk
    (default: the policy's shape); ``engine_shares_weights``: the engine reads the trainer's
    parameters in place (``components.engine_can_share_weights``) and holds no copy."""
    data, actor, critic_cfg = cfg.data, cfg.actor, cfg.critic
    bf16 = cfg.model.uses_bf16(device_type)
    b = b_engine = 2 if bf16 else 4
    fused = cfg.model.kernels == "triton" or (cfg.model.kernels == "auto" and device_type == "cuda")
    kernels = "triton" if fused else "torch"  # what model.kernels resolves to (kernels/backend.py)
    tp, sp = dims.tp, dims.sp
    shard = dims.dp_shard * dims.sp * dims.tp
    seq_len = data.max_prompt_length + data.max_response_length
    packed = actor.use_remove_padding

    def sharded(params: int, bytes_per_param: int) -> int:
        return math.ceil(params / shard) * bytes_per_param

    P = param_count(model_args)
    items = [
        MemoryItem("parameters", sharded(P, 4), not actor.offload.params, True,
                   "set actor.offload.params=true or raise parallel.dp_shard",
                   "raise parallel.dp_shard (or parallel.tp): the update needs the parameters on the device"),
        MemoryItem("gradients", sharded(P, 4), False, True, "raise parallel.dp_shard (or parallel.tp)"),
        MemoryItem("optimizer state", sharded(P, 8), not actor.offload.optimizer, True,
                   "set actor.offload.optimizer=true or raise parallel.dp_shard",
                   "raise parallel.dp_shard (or parallel.tp): the update needs the optimizer state on the device"),
        MemoryItem("gathered weights",
                   math.ceil((root_param_count(model_args) + 2 * largest_block_param_count(model_args)) * b / tp),
                   False, True, "raise parallel.tp (the embedding and lm-head are gathered whole)"),
    ]
    tokens, response_tokens = micro_batch_tokens(data, actor.micro_batch_size_per_device,
                                                 actor.max_tokens_per_micro_batch)
    acts = micro_batch_activation_bytes(model_args, b, tokens, response_tokens,
                                        checkpointing=actor.activation_checkpointing, packed=packed, tp=tp, sp=sp)
    section, ac = "actor", actor.activation_checkpointing
    if critic_cfg.enable:
        c_micro = critic_cfg.micro_batch_size_per_device or actor.micro_batch_size_per_device
        c_tokens, c_response = micro_batch_tokens(data, c_micro, critic_cfg.max_tokens_per_micro_batch)
        c_acts = micro_batch_activation_bytes(critic_args or model_args, b, c_tokens, c_response,
                                              checkpointing=critic_cfg.activation_checkpointing,
                                              packed=packed, tp=tp, sp=sp)
        if c_acts > acts:
            acts, section, ac = c_acts, "critic", critic_cfg.activation_checkpointing
    def batch_knob(name: str) -> str:
        size = "max_tokens_per_micro_batch" if getattr(cfg, name).max_tokens_per_micro_batch else "micro_batch_size_per_device"
        return f"lower {name}.{size}"

    items += [
        MemoryItem("activations", acts, False, True,
                   batch_knob(section) + ("" if ac else f" or set {section}.activation_checkpointing=true")),
        MemoryItem("logits", logits_bytes(model_args, response_tokens, b, kernels=kernels, tp=tp), False, True,
                   ("" if kernels == "triton" else "set model.kernels=triton (fused logprob, CUDA) or ")
                   + batch_knob("actor")),
        MemoryItem("rollout weights", 0 if engine_shares_weights else math.ceil(P * b_engine / tp), True, True,
                   "the engine holds a copy of the policy (1/tp of it per rank): keep model.dtype=auto "
                   "(bf16 on GPU), raise parallel.tp or use a smaller model",
                   note="shares the trainer's parameters" if engine_shares_weights else ""),
        MemoryItem("KV cache", engine_kv_bytes(cfg, model_args, seq_len, b_engine, tp, device_type, device_bytes), True, False,
                   "lower rollout.kv_cache_gb / rollout.gpu_memory_utilization or rollout.max_num_seqs"),
    ]
    if cfg.needs_reference:
        on_device = not (cfg.ref.offload and device_type == "cuda")
        items.append(MemoryItem("reference parameters", sharded(P, 4) if on_device else 0, True, True,
                                "set ref.offload=true or raise parallel.dp_shard"))
    if critic_cfg.enable:
        Pc = param_count(critic_args or model_args) + (critic_args or model_args).hidden_size + 1  # + value head
        items += [
            MemoryItem("critic parameters", sharded(Pc, 4), not critic_cfg.offload.params, True,
                       "set critic.offload.params=true or raise parallel.dp_shard", "raise parallel.dp_shard"),
            MemoryItem("critic gradients", sharded(Pc, 4), False, True, "raise parallel.dp_shard"),
            MemoryItem("critic optimizer state", sharded(Pc, 8), not critic_cfg.offload.optimizer, True,
                       "set critic.offload.optimizer=true or raise parallel.dp_shard", "raise parallel.dp_shard"),
        ]
    return MemoryPlan(tuple(items), device_bytes, device_source)


def format_plan(plan: MemoryPlan) -> str:
    """A table of the plan in GiB: each item and the phases it is resident in, then the totals."""
    width = max(len(i.name) for i in plan.items) + 2
    lines = ["memory plan per rank (GiB)", f"  {'':{width}}{'size':>8}  {'generation':>10}{'training':>10}"]
    for i in plan.items:
        gen = f"{i.bytes / GIB:10.3f}" if i.generation else f"{'-':>10}"
        train = f"{i.bytes / GIB:10.3f}" if i.training else f"{'-':>10}"
        lines.append(f"  {i.name:{width}}{i.bytes / GIB:8.3f}  {gen}{train}" + (f"  ({i.note})" if i.note else ""))
    gen, train = plan.phase_bytes("generation") / GIB, plan.phase_bytes("training") / GIB
    lines.append(f"  {'total':{width}}{'':8}  {gen:10.3f}{train:10.3f}")
    budget = "unchecked" if plan.device_bytes is None else f"{plan.device_bytes / GIB:.3f} GiB ({plan.device_source})"
    lines.append(f"  peak: {plan.peak_phase} {plan.peak_bytes / GIB:.3f} GiB; budget: {budget}")
    return "\n".join(lines)


def check_plan(plan: MemoryPlan) -> None:
    """UserError naming the biggest item of the peak phase and its knob when the plan does not fit."""
    if plan.device_bytes is None or plan.peak_bytes <= plan.device_bytes:
        return
    phase = plan.peak_phase
    biggest = max((i for i in plan.items if getattr(i, phase)), key=lambda i: i.bytes)
    knob = biggest.training_knob if phase == "training" and biggest.training_knob else biggest.knob
    per_micro_batch = biggest.name in ("activations", "logits")
    per = " per micro-batch" if per_micro_batch else ""
    # Micro-batches are sized for full-length sequences: say so, and how to set another budget.
    note = " (sized for full-length sequences; trainer.memory_limit_gb sets the budget)" if per_micro_batch else ""
    raise UserError(f"memory plan: {phase} needs {plan.peak_bytes / GIB:.2f} GiB per rank > "
                    f"{plan.device_bytes / GIB:.2f} GiB ({plan.device_source}); biggest item: {biggest.name} "
                    f"{biggest.bytes / GIB:.2f} GiB{per}: {knob}{note}")


def device_budget(cfg, device: torch.device) -> tuple[int | None, str]:
    """``(bytes, source)`` the plan must fit in: ``trainer.memory_limit_gb`` when set, else the
    GPU's total memory (``torch.cuda.mem_get_info``), else None (CPU: unchecked)."""
    if cfg.trainer.memory_limit_gb > 0:
        return int(cfg.trainer.memory_limit_gb * GIB), f"trainer.memory_limit_gb={cfg.trainer.memory_limit_gb:g}"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], f"{torch.cuda.get_device_name(device)} total memory"
    return None, "unchecked on CPU: set trainer.memory_limit_gb"


def report_memory_plan(cfg, decoder, dims, device: torch.device, log, *,
                       engine_shares_weights: bool = False) -> MemoryPlan | None:
    """Build, log (``log``: rank 0 prints) and check the plan of a run before the other models are
    built; None for a non-native decoder, whose shape the plan does not know."""
    args = getattr(decoder, "args", None)
    if not isinstance(args, ModelArgs):
        log("memory plan: skipped (it needs the native decoder's shape)")
        return None
    critic_args = None
    if cfg.critic.enable and cfg.critic.model_path:
        from spmd_rl.models.hf_io import read_hf_config

        try:
            critic_args = ModelArgs.from_hf_config(read_hf_config(cfg.critic.model_path))
        except (UserError, ValueError, KeyError, OSError):
            # A critic only the generic transformers path loads: estimate it with the policy's shape.
            log("memory plan: the critic's shape is unknown to the native decoder; sized like the policy")
    budget, source = device_budget(cfg, device)
    plan = plan_memory(cfg, args, dims, budget, device_type=device.type, critic_args=critic_args, device_source=source,
                       engine_shares_weights=engine_shares_weights)
    log(format_plan(plan))
    check_plan(plan)
    return plan
