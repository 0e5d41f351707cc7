"""The startup memory plan of an ``actor.strategy=megatron`` run, per rank and pipeline stage.

Same items, phases, table and refusal as the FSDP plan (:mod:`spmd_rl.trainer.memory_plan`),
with the megatron backend's layout:

* parameters, gradients, AdamW state: fp32, 4 + 4 + 8 bytes per parameter of this rank's
  stage and TP shard: ``num_layers / pp`` blocks, the embedding on the first stage, final norm
  and output layer on the last (a tied embedding split over stages has a copy on each end),
  vocabulary padded to a multiple of tp, everything but the norms divided by tp, a sparse
  layer's experts divided by ep (expert parallelism; MoE runs with tp=1). The AdamW
  state is divided by dp too with the distributed optimizer (``*.megatron.use_distributed_optimizer``,
  :mod:`.distributed_optimizer`; the experts' by dp / ep, the ranks that hold the same ones);
  nothing is gathered;
* activations with the decoder formula of the FSDP plan on right-padded rows (megatron has no
  padding-free mode; token budgets count padded rows) for ``num_layers / pp`` layers, in fp32
  also under bf16 autocast: the residual stream and norms stay fp32 and megatron's linear
  Functions save their fp32 inputs and weights, casting again in the backward (an upper bound).
  The 1F1B schedule (:mod:`.schedule`) keeps ``pp - r`` micro-batches alive on stage ``r``, so
  the first stage carries ``pp`` of them and the last one, plus the lm-head's logits of one
  micro-batch (and, under bf16, the bf16 copy of its output layer the logprob keeps);
* the rollout engine lives on the first stage only (``pipeline_engine.py``) and generates
  tensor-parallel over its tp ranks: 1/tp of the model in its dtype and of the KV heads;
* the reference policy and the critic as the policy (the critic without its lm-head, with a
  value head).

The plan reported is the stage whose peak is largest; a configuration that cannot fit is
refused in one line naming the knob, as for FSDP.
"""

from __future__ import annotations

import math

import torch

from spmd_rl.models.args import ModelArgs
from spmd_rl.models.megatron.config import padded_vocab_size
from spmd_rl.models.megatron.names import layers_for_pp_stage
from spmd_rl.trainer.memory_plan import (
    MemoryItem,
    MemoryPlan,
    block_param_count,
    check_plan,
    device_budget,
    engine_kv_bytes,
    expert_param_count,
    format_plan,
    logits_bytes,
    micro_batch_activation_bytes,
    micro_batch_tokens,
    param_count,
)

FP32 = 4


def stage_param_count(args: ModelArgs, tp: int, pp: int, stage: int, *, lm_head: bool = True, ep: int = 1) -> int:
    """Parameters one TP (and EP) rank of pipeline stage ``stage`` holds (``lm_head=False``: a
    value model's trunk, which has no output layer)."""
    H = args.hidden_size
    norms = 2 * H + (2 * args.head_dim if args.qk_norm else 0)  # replicated over tp
    blocks = 0
    for layer in layers_for_pp_stage(args.num_layers, stage, pp):
        experts = expert_param_count(args, layer)
        block = block_param_count(args, layer) - (experts - experts // ep)
        blocks += (block - norms) // tp + norms
    vocab_shard = padded_vocab_size(args.vocab_size, tp) // tp * H
    first, last = stage == 0, stage == pp - 1
    total = blocks + (vocab_shard if first else 0)
    if last:
        total += H  # final norm
        has_output_layer = not args.tie_word_embeddings or pp > 1  # one stage: tied to the embedding
        total += vocab_shard if lm_head and has_output_layer else 0
    return total


def stage_expert_count(args: ModelArgs, pp: int, stage: int, ep: int = 1) -> int:
    """Expert parameters one EP rank of pipeline stage ``stage`` holds."""
    return sum(expert_param_count(args, layer) for layer in layers_for_pp_stage(args.num_layers, stage, pp)) // ep


def plan_megatron_stage(cfg, args: ModelArgs, dims, stage: int, device_bytes: int | None, *,
                        device_type: str = "cuda", critic_args: ModelArgs | None = None,
                        device_source: str = "device memory") -> MemoryPlan:
    """The memory plan of one rank of pipeline stage ``stage`` (module doc)."""
    data, actor, critic_cfg = cfg.data, cfg.actor, cfg.critic
    tp, pp = dims.tp, dims.pp
    b_engine = 2 if cfg.model.uses_bf16(device_type) else 4
    fused = cfg.model.kernels == "triton" or (cfg.model.kernels == "auto" and device_type == "cuda")
    seq_len = data.max_prompt_length + data.max_response_length
    stage_args = args.replace(num_layers=args.num_layers // pp)

    def live(section) -> int:  # 1F1B: micro-batches alive on this stage during `section`'s update
        return min(pp - stage, _micro_batches_per_mini(cfg, section, dims))

    def activations(section, shape: ModelArgs) -> int:
        micro = section.micro_batch_size_per_device or actor.micro_batch_size_per_device
        tokens, response = micro_batch_tokens(data, micro, section.max_tokens_per_micro_batch)
        return live(section) * micro_batch_activation_bytes(
            shape.replace(num_layers=shape.num_layers // pp), FP32, tokens, response,
            checkpointing=section.activation_checkpointing, packed=False, tp=tp)

    ep = getattr(dims, "ep", 1)
    layout = ("raise parallel.pp or parallel.ep (a rank holds 1/pp of the fp32 model and 1/ep of its experts)"
              if args.is_moe else "raise parallel.pp or parallel.tp (a rank holds 1/(tp x pp) of the fp32 model)")
    P = stage_param_count(args, tp, pp, stage, ep=ep)
    acts, section = activations(actor, args), "actor"
    items = [
        MemoryItem("parameters", P * FP32, not actor.offload.params, True,
                   f"set actor.offload.params=true or {layout}", layout),
        MemoryItem("gradients", P * FP32, False, True, layout),
        MemoryItem("optimizer state", adamw_state_bytes(P, dims.dp_size, actor.megatron.use_distributed_optimizer,
                                                        experts=stage_expert_count(args, pp, stage, ep), ep=ep),
                   not actor.offload.optimizer, True, *_optimizer_knobs("actor", cfg.actor, dims.dp_size, layout)),
    ]
    if critic_cfg.enable:
        c_acts = activations(critic_cfg, critic_args or args)
        if c_acts > acts:
            acts, section = c_acts, "critic"
    section_cfg = getattr(cfg, section)
    alive = _plural(live(section_cfg), "micro-batch", "micro-batches")
    knob = ("" if section_cfg.activation_checkpointing else f"set {section}.activation_checkpointing=true or ") + \
        f"lower {section}.micro_batch_size_per_device (1F1B keeps {alive} alive on this stage)"
    _, response_tokens = micro_batch_tokens(data, actor.micro_batch_size_per_device,
                                            actor.max_tokens_per_micro_batch)
    logits = logits_bytes(args, response_tokens, FP32, kernels="triton" if fused else "torch", tp=tp)
    if b_engine == 2:  # stage_logprobs' bf16 copy of the [V/tp, H] output layer, kept for the backward
        logits += padded_vocab_size(args.vocab_size, tp) // tp * args.hidden_size * 2
    items += [
        MemoryItem("activations", acts, False, True, knob,
                   note=f"{alive} of {_plural(stage_args.num_layers, 'layer', 'layers')}"),
        MemoryItem("logits", logits if stage == pp - 1 else 0, False, True,
                   ("" if fused else "set model.kernels=triton (fused logprob, CUDA) or ")
                   + "lower actor.micro_batch_size_per_device"),
        MemoryItem("rollout weights", math.ceil(param_count(args) * b_engine / tp) if stage == 0 else 0, True, True,
                   "the engine holds 1/tp of the policy per rank: keep model.dtype=auto (bf16 on GPU), "
                   "raise parallel.tp or use a smaller model"),
        MemoryItem("KV cache", engine_kv_bytes(cfg, args, seq_len, b_engine, tp, device_type, device_bytes)
                   if stage == 0 else 0, True, False,
                   "lower rollout.kv_cache_gb / rollout.gpu_memory_utilization or rollout.max_num_seqs"),
    ]
    if cfg.needs_reference:  # ref.offload: on the device only for its logprob pass, less than the update's peak
        items.append(MemoryItem("reference parameters", P * FP32, not cfg.ref.offload, not cfg.ref.offload,
                                f"set ref.offload=true or {layout}"))
    if critic_cfg.enable:
        shape = critic_args or args
        Pc = stage_param_count(shape, tp, pp, stage, lm_head=False, ep=ep) + \
            (shape.hidden_size + 1 if stage == pp - 1 else 0)
        items += [
            MemoryItem("critic parameters", Pc * FP32, not critic_cfg.offload.params, True,
                       f"set critic.offload.params=true or {layout}", layout),
            MemoryItem("critic gradients", Pc * FP32, False, True, layout),
            MemoryItem("critic optimizer state",
                       adamw_state_bytes(Pc, dims.dp_size, critic_cfg.megatron.use_distributed_optimizer,
                                         experts=stage_expert_count(shape, pp, stage, ep), ep=ep),
                       not critic_cfg.offload.optimizer, True,
                       *_optimizer_knobs("critic", critic_cfg, dims.dp_size, layout)),
        ]
    return MemoryPlan(tuple(items), device_bytes, device_source)


def adamw_state_bytes(params: int, dp: int, sharded: bool, *, experts: int = 0, ep: int = 1) -> int:
    """AdamW's two fp32 moments for ``params`` parameters, this rank's ``ceil(params / dp)``
    range of them under the distributed optimizer; under expert parallelism the ``experts`` of
    them (included in ``params``) have their own range over the ``dp / ep`` ranks holding them."""
    if not sharded:
        return 2 * FP32 * params
    if ep == 1:
        return 2 * FP32 * math.ceil(params / dp)
    return 2 * FP32 * (math.ceil((params - experts) / dp) + math.ceil(experts / (dp // ep)))


def _optimizer_knobs(section: str, section_cfg, dp: int, layout: str) -> tuple[str, str]:
    """What shrinks the AdamW state: ``(while generating, during the update)``."""
    training = layout
    if dp > 1 and not section_cfg.megatron.use_distributed_optimizer:
        training = f"set {section}.megatron.use_distributed_optimizer=true (AdamW state over the {dp} dp ranks) or {layout}"
    return f"set {section}.offload.optimizer=true or {training}", training


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _micro_batches_per_mini(cfg, section, dims) -> int:
    """Micro-batches of one of ``section``'s (actor or critic) mini-batches on a dp rank (an upper
    bound with dynamic batching: ``pp``)."""
    if section.max_tokens_per_micro_batch > 0:
        return dims.pp
    mini = section.ppo_mini_batch_size or cfg.actor.ppo_mini_batch_size
    micro = section.micro_batch_size_per_device or cfg.actor.micro_batch_size_per_device
    return max(1, math.ceil(mini * cfg.rollout.n // dims.dp_size / micro))


def plan_megatron_memory(cfg, args: ModelArgs, dims, device_bytes: int | None, **kwargs) -> tuple[int, MemoryPlan]:
    """``(stage, plan)`` of the pipeline stage with the largest peak."""
    plans = [(stage, plan_megatron_stage(cfg, args, dims, stage, device_bytes, **kwargs)) for stage in range(dims.pp)]
    return max(plans, key=lambda sp: sp[1].peak_bytes)


def report_megatron_memory_plan(cfg, args: ModelArgs, dims, device: torch.device, log,
                                critic_args: ModelArgs | None = None) -> MemoryPlan:
    """Build, log (rank 0) and check the plan; UserError when it cannot fit."""
    budget, source = device_budget(cfg, device)
    stage, plan = plan_megatron_memory(cfg, args, dims, budget, device_type=device.type, critic_args=critic_args,
                                       device_source=source)
    log(f"megatron pipeline stage {stage} of {dims.pp} (the largest), tp={dims.tp}:\n" + format_plan(plan))
    check_plan(plan)
    return plan
