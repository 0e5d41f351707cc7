"""The policy as megatron-core GPTModel stages: response logprobs and the PPO update.

Mirrors ``spmd_rl.trainer.actor`` (``compute_logprobs`` / ``update_policy``): the same loss
functions, global token normalisation, entropy bonus, KL loss and micro-batches, so one update
gives the same parameters as the native policy (tests/distributed/test_megatron_actor.py).
What differs is how a micro-batch runs:

* rows are right-padded ``[S, T]`` (megatron's local attention has no padding-free mode) and
  megatron works sequence-first: a stage maps ``[T, S, H]`` to ``[T, S, H]``;
* the stages are driven by our 1F1B pipeline schedule (:mod:`.schedule`), and only the last stage
  scores tokens; it hands its logprobs / metrics to the rest of its pipeline group;
* the lm-head is never applied as a layer: the final hidden states of the target positions go
  with this TP rank's ``[V/tp, H]`` output-layer shard to the vocab-parallel logprob
  (``kernels/logprob.py``), which never materialises ``[N, V]`` logits;
* gradients are summed over data parallel and clipped by the TP x PP global norm
  (:mod:`.grads`) instead of FSDP's reductions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from spmd_rl.algorithms.losses import get_policy_loss
from spmd_rl.config import ActorConfig
from spmd_rl.kernels.logprob import logprobs_and_entropy
from spmd_rl.models.megatron import grads
from spmd_rl.models.megatron.backend import MegatronActor
from spmd_rl.models.megatron.cpu import causal_mask
from spmd_rl.models.megatron.schedule import StageLinks, run_pipeline, stage_links
from spmd_rl.trainer.actor import micro_batch_loss, update_metrics
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.minibatch import global_counts, micro_batches, mini_batches, scatter_rows
from spmd_rl.trainer.policy import ScoringInputs, build_scoring_inputs, pad_by_lengths


@dataclass(frozen=True)
class ParallelGroups:
    """megatron's process groups this rank takes part in (built by ``initialize_model_parallel``)."""

    dp: object
    dp_size: int
    model_parallel: object  # TP x PP: the gradient norm
    embedding: object | None  # first + last stage, when tied embeddings are split over stages
    tp: object = None  # per-head norms' partial gradients
    tp_size: int = 1
    # expert parallelism: ranks holding other experts (micro-batch lockstep), the dp ranks
    # holding the same ones (gradient sum), and EP x PP (gradient norm); see .grads
    ep: object = None
    ep_size: int = 1
    expert_dp: object = None
    expert_dp_size: int = 1
    expert_model_parallel: object = None

    @classmethod
    def from_megatron(cls, actor: MegatronActor) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        embedding = None
        if actor.tied_copy and ps.is_rank_in_embedding_group():
            embedding = ps.get_embedding_group()
        experts = {}
        if actor.args.is_moe:
            experts = dict(ep=actor.ep_group, ep_size=actor.ep_size, expert_dp=ps.get_expert_data_parallel_group(),
                           expert_dp_size=ps.get_expert_data_parallel_world_size(),
                           expert_model_parallel=ps.get_expert_tensor_model_pipeline_parallel_group())
        return cls(dp=ps.get_data_parallel_group(), dp_size=ps.get_data_parallel_world_size(),
                   model_parallel=ps.get_model_parallel_group(), embedding=embedding,
                   tp=ps.get_tensor_model_parallel_group(), tp_size=ps.get_tensor_model_parallel_world_size(),
                   **experts)


# ---------------------------------------------------------------------------------------------
# One stage, one micro-batch


def stage_forward(model: torch.nn.Module, inputs: ScoringInputs, received: torch.Tensor | None) -> torch.Tensor:
    """This stage's output ``[T, S, H]`` for right-padded rows ``inputs.input_ids [S, T]``: the
    embedding on the first stage, else the previous stage's output ``received``; then this
    stage's layers (and the final norm on the last stage)."""
    seq_len = inputs.input_ids.shape[1]
    if received is None:
        hidden = model.embedding(input_ids=inputs.input_ids, position_ids=inputs.position_ids)  # [T, S, H]
    else:
        model.set_input_tensor(received)  # the block reads it instead of hidden_states
        hidden = None
    rotary = model.rotary_pos_emb(seq_len)  # positions 0..T-1: those of every right-padded row
    mask = causal_mask(seq_len, inputs.input_ids.device)  # explicit: megatron's default is built on "cuda"
    return model.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)


def forward_steps(actor: MegatronActor, inputs: list[ScoringInputs]):
    """The schedule's ``forward_step`` over these micro-batches: :func:`stage_forward` in the
    actor's compute context (mixed precision when ``actor.compute_dtype`` is set)."""
    def step(i: int, received: torch.Tensor | None) -> torch.Tensor:
        with actor.compute():
            return stage_forward(actor.model, inputs[i], received)
    return step


def real_vocab_rows(vocab_size: int, shard_rows: int, tp_rank: int) -> tuple[int, int]:
    """``(vocab_start, rows)``: the part of TP rank ``tp_rank``'s ``shard_rows``-row vocab shard
    that holds real tokens. The rows past ``vocab_size`` are padding (zero weights, logit 0),
    which would add ``exp(0 - max)`` to the softmax denominator: they are cut off, not masked."""
    start = tp_rank * shard_rows
    rows = min(shard_rows, vocab_size - start)
    if rows < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves TP rank {tp_rank} only padding rows "
                         f"({shard_rows} per rank); use a smaller tensor parallel size")
    return start, rows


def output_weight_shard(actor: MegatronActor) -> tuple[torch.Tensor, int]:
    """``(real rows of this rank's [V/tp, H] output-layer shard, vocab_start)`` on the last stage.
    With tied embeddings and one stage the output layer has no weight of its own."""
    model = actor.model
    weight = model.output_layer.weight
    if weight is None:
        weight = model.embedding.word_embeddings.weight
    start, rows = real_vocab_rows(actor.args.vocab_size, weight.shape[0], actor.tp_rank)
    return weight[:rows], start


def stage_logprobs(actor: MegatronActor, hidden: torch.Tensor, inputs: ScoringInputs, *, temperature: float,
                   with_entropy: bool, kernels: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logprobs [M], entropy [M] or None)`` of the response tokens from the last stage's
    output ``[T, S, H]``; the same on every rank of the TP group."""
    flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [S*T, H], row s at s*T
    weight, vocab_start = output_weight_shard(actor)
    tp_group = actor.tp_group if actor.tp_size > 1 else None
    hidden = flat[inputs.target_positions]
    if actor.compute_dtype is not None:  # the lm-head matmul in the compute dtype; the softmax math stays fp32
        hidden, weight = hidden.to(actor.compute_dtype), weight.to(actor.compute_dtype)
    return logprobs_and_entropy(hidden, weight, inputs.targets, backend=kernels,
                                temperature=temperature, with_entropy=with_entropy, vocab_start=vocab_start,
                                tp_group=tp_group)


# ---------------------------------------------------------------------------------------------
# Micro-batches through the pipeline


def links_of(actor: MegatronActor) -> StageLinks:
    """This stage's pipeline neighbours and activation dtype/device."""
    param = next(actor.model.parameters())
    return stage_links(actor.pp_group, actor.pp_rank, actor.pp_size, param.dtype, param.device)


def padded_scoring_inputs(split, device, groups: ParallelGroups) -> list[ScoringInputs]:
    """Right-padded ``[S, T]`` inputs of each ``(rows, micro-batch)`` of ``split``.

    Under expert parallelism megatron's MoE layers all-gather the tokens of the ep group's ranks
    in equal-sized pieces, so each micro-batch is padded to the largest ``[S, T]`` over the
    group (one all-reduce): extra rows and columns hold token 0, are never scored, and change
    no real token's result (attention is causal per row, routing is per token, no capacity)."""
    inputs = [build_scoring_inputs(micro.prompt_ids, micro.response_ids, device, packed=False) for _, micro in split]
    if groups.ep_size == 1 or not inputs:
        return inputs
    shapes = torch.tensor([list(x.input_ids.shape) for x in inputs], dtype=torch.int64)
    dist.all_reduce(shapes, op=dist.ReduceOp.MAX, group=groups.ep)
    return [pad_scoring_inputs(x, rows, width) for x, (rows, width) in zip(inputs, shapes.tolist())]


def pad_scoring_inputs(inputs: ScoringInputs, rows: int, width: int) -> ScoringInputs:
    """``inputs`` (right-padded ``[S, T]``) padded to ``[rows, width]`` with token 0; the target
    positions (``s * T + t``) move to ``s * width + t``."""
    num_rows, old_width = inputs.input_ids.shape
    ids = torch.nn.functional.pad(inputs.input_ids, (0, width - old_width, 0, rows - num_rows))
    positions = torch.arange(width, dtype=torch.long, device=ids.device).expand(rows, width).contiguous()
    targets = inputs.target_positions
    moved = targets // old_width * width + targets % old_width
    return replace(inputs, input_ids=ids, position_ids=positions, target_positions=moved)


def activation_shapes(inputs: list[ScoringInputs], hidden_size: int) -> list[tuple[int, int, int]]:
    """The ``[T, S, H]`` activation each micro-batch sends between stages."""
    return [(x.input_ids.shape[1], x.input_ids.shape[0], hidden_size) for x in inputs]  # [T, S, H]


def broadcast_from_last_stage(actor: MegatronActor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the last stage holds it, on every stage of this rank's pipeline (in place)."""
    if actor.pp_size > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(actor.pp_group, actor.pp_size - 1), group=actor.pp_group)
    return tensor


def broadcast_object_from_last_stage(actor: MegatronActor, obj):
    """The last stage's ``obj`` on every stage of this rank's pipeline."""
    if actor.pp_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(actor.pp_group, actor.pp_size - 1), group=actor.pp_group)
    return box[0]


@torch.no_grad()
def compute_logprobs(actor: MegatronActor, batch: RolloutBatch, temperature: float, micro_batch_size: int, *,
                     max_tokens: int = 0, kernels: str = "torch") -> torch.Tensor:
    """``[B, T]`` logprobs of the batch's responses (the PPO "old" logprobs), on every rank;
    micro-batches as ``spmd_rl.trainer.actor.compute_logprobs``."""
    groups = ParallelGroups.from_megatron(actor)
    device = next(actor.model.parameters()).device
    split = micro_batches(batch, micro_batch_size, max_tokens, groups.dp, padded=True)  # rows are right-padded
    inputs = padded_scoring_inputs(split, device, groups)

    def loss_step(i: int, hidden: torch.Tensor):
        logprobs, _ = stage_logprobs(actor, hidden, inputs[i], temperature=temperature, with_entropy=False,
                                     kernels=kernels)
        return None, pad_by_lengths(logprobs, inputs[i].response_lengths, split[i][1].response_mask.shape[1])

    chunks = run_pipeline(len(split), activation_shapes(inputs, actor.args.hidden_size),
                          forward_steps(actor, inputs), loss_step, links_of(actor), forward_only=True)
    width = batch.response_mask.shape[1]
    if chunks:
        out = scatter_rows(chunks, [rows for rows, _ in split], len(batch), width).float()
    else:
        out = torch.zeros(len(batch), width)
    return broadcast_from_last_stage(actor, out.to(device)).cpu()


def update(actor: MegatronActor, optimizer, scheduler, batch: RolloutBatch, cfg: ActorConfig, *,
           temperature: float, mini_batch_size: int, scale_factor: int, kernels: str = "torch",
           generator: torch.Generator | None = None) -> dict[str, float]:
    """PPO epochs over mini-batches of ``mini_batch_size`` responses (this rank's share), as
    ``spmd_rl.trainer.actor.update_policy``; metrics are per dp rank (the caller averages over
    dp) and the same on every rank of a pipeline."""
    groups = ParallelGroups.from_megatron(actor)
    loss_fn = get_policy_loss(cfg.policy_loss)
    tied = None  # this stage's copy of a tied embedding split over stages
    if groups.embedding is not None:
        tied = grads.tied_embedding_weight(actor.model, actor.pp_rank == 0, actor.pp_rank == actor.pp_size - 1)
    sums: dict[str, float] = defaultdict(float)
    norms, lrs = [], []
    grads.begin_update(optimizer)
    for mini in mini_batches(batch, mini_batch_size, cfg.ppo_epochs):
        for key, value in _mini_batch_step(actor, groups, loss_fn, mini, cfg, temperature, scale_factor, kernels,
                                           generator).items():
            sums[key] += value
        lrs.append(scheduler.get_last_lr()[0])  # the rate this optimizer step uses
        norms.append(grads.optimizer_step(actor.model, optimizer, scheduler, cfg.optim.grad_clip, groups=groups,
                                          tp_rank=actor.tp_rank, skip_tied_copy=actor.tied_copy, tied=tied))
    grads.end_update(optimizer)
    sums = broadcast_object_from_last_stage(actor, dict(sums))
    return update_metrics(sums, norms, lrs, "actor")


def _mini_batch_step(actor: MegatronActor, groups: ParallelGroups, loss_fn, mini: RolloutBatch, cfg: ActorConfig,
                     temperature: float, scale_factor: int, kernels: str, generator) -> dict[str, float]:
    """Accumulate one mini-batch's gradients through the pipeline; return its metrics (last
    stage only, as ``spmd_rl.trainer.actor._mini_batch_step`` computes them)."""
    tokens, seqs = global_counts(mini, groups.dp)
    agg = dict(global_tokens=tokens, global_seqs=seqs, scale_factor=scale_factor)
    device = next(actor.model.parameters()).device
    split = micro_batches(mini, cfg.micro_batch_size_per_device, cfg.max_tokens_per_micro_batch, groups.dp,
                          padded=True)
    inputs = padded_scoring_inputs(split, device, groups)
    metrics: dict[str, float] = defaultdict(float)

    def loss_step(i: int, hidden: torch.Tensor):
        micro, width = split[i][1], split[i][1].response_mask.shape[1]
        logprobs, entropy = stage_logprobs(actor, hidden, inputs[i], temperature=temperature, with_entropy=True,
                                           kernels=kernels)
        logprobs = pad_by_lengths(logprobs, inputs[i].response_lengths, width)
        entropy = pad_by_lengths(entropy, inputs[i].response_lengths, width)
        loss, micro_metrics = micro_batch_loss(logprobs, entropy, micro, cfg, loss_fn, agg, generator,
                                               dp_size=groups.dp_size, num_micro=len(split), device=device)
        for key, value in micro_metrics.items():
            metrics[key] += value
        return loss, None

    run_pipeline(len(split), activation_shapes(inputs, actor.args.hidden_size),
                 forward_steps(actor, inputs), loss_step, links_of(actor), forward_only=False)
    if cfg.use_kl_loss and actor.pp_rank == actor.pp_size - 1:
        metrics["actor/kl_coef"] = cfg.kl_loss_coef
    return dict(metrics)

