"""Build the policy as a megatron-core ``GPTModel`` (``actor.strategy=megatron``).

megatron.core is imported inside the functions that need it, so this module imports anywhere;
without megatron-core :func:`check_megatron_available` raises a one-line ``UserError``. Without
CUDA the model runs on CPU (gloo) through the shims of :mod:`spmd_rl.models.megatron.cpu`.
Targets megatron-core ``MEGATRON_CORE_VERSIONS`` (parallel_state / GPTModel / layer-spec API of
0.12 to 0.16). Weight movement (HF checkpoint -> TP/PP shards, shards -> HF tensors for the
rollout engine) is done with the pure functions of :mod:`spmd_rl.models.megatron.names`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from packaging.specifiers import SpecifierSet

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.megatron.config import check_megatron_compatible, gpt_model_kwargs, transformer_config_kwargs
from spmd_rl.models.megatron.cpu import enable_cpu_execution
from spmd_rl.models.megatron.names import (
    OUTPUT_LAYER,
    expert_name_to_global,
    hf_names_for_stage,
    is_expert_param,
    hf_to_mcore,
    iter_hf_weights_from_mcore_shards,
    select_ep_experts,
    select_pp_stage,
    shard_for_tp,
    shard_name,
    stage_name_to_global,
    tp_layout,
)

MEGATRON_CORE_VERSIONS = ">=0.12,<0.17"
INSTALL_MESSAGE = "actor.strategy=megatron needs megatron-core (pip install -e '.[megatron]')"
# megatron-core warns on every rank that it falls back from the CUDA-only libraries (apex,
# TransformerEngine) to torch, about a CUDA env var for its async all-reduce, and about its
# own default cuda_graph_scope: expected here, never actionable by a user of this backend.
for _message in (r".*(Apex|apex|Transformer Engine|TransformerEngine).*(not installed|Falling back)",
                 r".*CUDA_DEVICE_MAX_CONNECTIONS", r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message)
# Wrappers megatron puts around the model (DDP, Float16Module) each add this to parameter names.
_WRAPPER_PREFIX = "module."


def check_megatron_available() -> None:
    """UserError (one line) unless megatron-core in the supported range imports (CPU runs too)."""
    try:
        version = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(INSTALL_MESSAGE) from None
    if not SpecifierSet(MEGATRON_CORE_VERSIONS).contains(version, prereleases=True):
        raise UserError(f"actor.strategy=megatron supports megatron-core{MEGATRON_CORE_VERSIONS}, found {version}; "
                        "pip install -e '.[megatron]'")
    try:
        importlib.import_module("megatron.core")
    except ImportError as e:
        raise UserError(f"{INSTALL_MESSAGE}; importing megatron.core failed: {str(e).splitlines()[0]}") from None


@dataclass
class MegatronActor:
    """One rank's pipeline stage of the policy as a GPTModel, with its place in the TP/PP grid."""

    model: torch.nn.Module  # GPTModel (pre_process on the first stage, post_process on the last)
    args: ModelArgs
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    fused_norms: bool  # TransformerEngine layer spec (norms inside linear_qkv / linear_fc1)
    vocab_rows: int  # padded vocabulary of the embedding / output layer
    tp_group: object | None = None
    pp_group: object | None = None  # megatron's pipeline group of this rank (needed when pp_size > 1)
    has_output_layer: bool = True  # False for a value model's trunk: the lm-head is dropped
    compute_dtype: torch.dtype | None = None  # bf16: mixed precision over the fp32 parameters
    ep_rank: int = 0  # expert parallelism (mixture-of-experts models): this rank holds
    ep_size: int = 1  # experts [ep_rank * E / ep, (ep_rank + 1) * E / ep)
    ep_group: object | None = None

    def compute(self):
        """The context the stage's math runs in: ``torch.autocast`` to ``compute_dtype`` (matmuls
        in bf16, reductions and norms in fp32; the parameters stay the fp32 master weights, as
        under FSDP's mixed precision), or nothing."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.compute_dtype)


    @property
    def shard_name(self) -> str:
        """This rank's cell of the model-parallel grid, e.g. ``tp0_pp1``, or ``tp0_pp1_ep1`` under
        expert parallelism (its checkpoint keys: ep ranks hold different experts)."""
        return shard_name(self.tp_rank, self.pp_rank, self.ep_rank, self.ep_size)

    @property
    def experts_per_rank(self) -> int:
        return self.args.num_experts // self.ep_size

    @property
    def tied_copy(self) -> bool:
        """Tied embeddings split over stages: the last stage's ``output_layer`` is a copy of the
        first stage's embedding (kept equal by summing their gradients)."""
        return self.args.tie_word_embeddings and self.pp_size > 1 and self.has_output_layer

    def load_hf_state(self, hf_state: dict[str, torch.Tensor]) -> None:
        """Copy an HF state dict's slice for this rank into the model."""
        load_hf_into_stage(self.model, hf_state, self.args, tp_rank=self.tp_rank, tp_size=self.tp_size,
                           pp_rank=self.pp_rank, pp_size=self.pp_size, fused_norms=self.fused_norms,
                           vocab_rows=self.vocab_rows, skip=() if self.has_output_layer else (OUTPUT_LAYER,),
                           ep_rank=self.ep_rank, ep_size=self.ep_size)

    def iter_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model's parameters as full HF tensors, one at a time, on every rank (each
        rank's rollout engine holds the full model). Every rank must iterate: per parameter a
        broadcast from its stage over the pipeline group (pp > 1), an all-gather of an expert's
        weight over the expert-parallel group (ep > 1), then a TP all-gather."""
        per_stage = self.args.num_layers // self.pp_size
        if self.pp_size == 1:
            named = self.model.named_parameters()
        else:
            named = iter_stage_params_over_pp(self.model, self.pp_rank, self.pp_size, self.pp_group, per_stage,
                                              skip=(OUTPUT_LAYER,) if self.tied_copy else ())
        if self.ep_size > 1:
            named = iter_experts_over_ep(named, self.ep_group, self.ep_size, self.experts_per_rank)
        # names are global already: pp_rank=0 keeps them
        yield from iter_hf_weights_from_tp_group(named, self.args, tp_group=self.tp_group, tp_size=self.tp_size,
                                                 pp_rank=0, layers_per_stage=per_stage, fused_norms=self.fused_norms)


def load_hf_into_stage(
    module: torch.nn.Module,
    hf_state: dict[str, torch.Tensor],
    args: ModelArgs,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    fused_norms: bool,
    vocab_rows: int,
    skip: tuple[str, ...] = (),
    ep_rank: int = 0,
    ep_size: int = 1,
) -> None:
    """Convert, select this stage (and this ep rank's experts), shard for this TP rank and
    ``load_state_dict`` into ``module`` (leaving out the names in ``skip``); ValueError naming
    the first parameter the module lacks or the conversion left out."""
    full = hf_to_mcore(hf_state, args, fused_norms=fused_norms, vocab_size=vocab_rows)
    stage = select_pp_stage(full, args, pp_rank, pp_size)
    if args.is_moe:
        stage = select_ep_experts(stage, ep_rank, ep_size, args.num_experts)
    shards = {name: shard_for_tp(name, t, tp_rank, tp_size, num_query_groups=args.num_kv_heads)
              for name, t in stage.items() if name not in skip}
    result = module.load_state_dict(shards, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"GPTModel stage {pp_rank} does not match the converted checkpoint: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


def iter_hf_weights_from_tp_group(
    named_params: Iterable[tuple[str, torch.Tensor]],
    args: ModelArgs,
    *,
    tp_group: object | None,
    tp_size: int,
    pp_rank: int = 0,
    layers_per_stage: int | None = None,
    fused_norms: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Gather each TP-sharded parameter over ``tp_group`` (replicated ones need no collective)
    and yield its HF tensors. Local layer numbers are made global for stage ``pp_rank``."""
    per_stage = layers_per_stage if layers_per_stage is not None else args.num_layers
    def gathered() -> Iterator[tuple[str, list[torch.Tensor]]]:
        for name, param in named_params:
            name = _unwrapped(name)
            if name.endswith("_extra_state"):
                continue
            local = param.detach()
            if tp_size == 1 or tp_layout(name) == "replicated":
                shards = [local]
            else:
                shards = [torch.empty_like(local) for _ in range(tp_size)]
                dist.all_gather(shards, local.contiguous(), group=tp_group)
            yield stage_name_to_global(name, pp_rank, per_stage), shards
    yield from iter_hf_weights_from_mcore_shards(gathered(), args, fused_norms=fused_norms)


def iter_stage_params_over_pp(
    model: torch.nn.Module, pp_rank: int, pp_size: int, pp_group, layers_per_stage: int, skip: tuple[str, ...] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(global mcore name, this TP rank's shard)`` of every stage's parameters, stage by stage,
    on every rank of ``pp_group``: the owning stage broadcasts its names and shapes, then each
    shard. Ranks of one pipeline group share the TP rank, so what arrives is this rank's shard
    and the TP all-gather that follows is the usual one. Names in ``skip`` are left out."""
    device = next(model.parameters()).device
    for stage in range(pp_size):
        src = dist.get_global_rank(pp_group, stage)
        mine = stage == pp_rank
        local = {stage_name_to_global(_unwrapped(n), stage, layers_per_stage): p
                 for n, p in model.named_parameters()} if mine else {}
        meta = [[(n, tuple(p.shape), p.dtype) for n, p in local.items() if n not in skip] if mine else None]
        dist.broadcast_object_list(meta, src=src, group=pp_group)
        for name, shape, dtype in meta[0]:
            shard = local[name].detach().contiguous() if mine else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(shard, src=src, group=pp_group)
            yield name, shard


def iter_experts_over_ep(named_params: Iterable[tuple[str, torch.Tensor]], ep_group, ep_size: int,
                         experts_per_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ep rank's copy of each expert weight, all-gathered over ``ep_group`` and named
    with its global expert number; other parameters pass through (every ep rank holds them)."""
    for name, param in named_params:
        if not is_expert_param(name):
            yield name, param
            continue
        local = param.detach().contiguous()
        pieces = [torch.empty_like(local) for _ in range(ep_size)]
        dist.all_gather(pieces, local, group=ep_group)
        for ep_rank, piece in enumerate(pieces):
            yield expert_name_to_global(name, ep_rank, experts_per_rank), piece


def _unwrapped(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIX):
        name = name[len(_WRAPPER_PREFIX):]
    return name


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Recompute each TransformerLayer of ``model`` in the backward instead of keeping its
    activations (``actor/critic.activation_checkpointing``): only a layer's inputs are saved.

    torch's non-reentrant checkpoint rather than megatron's ``recompute_granularity``: it replays
    the forward under the autocast state it first ran in (megatron's reentrant recompute does
    not restore autocast, so a mixed-precision forward would be recomputed in fp32), and it needs
    no CUDA RNG state. Dropout is 0 here, so no RNG state matters. Parameter names are unchanged."""
    for layer in model.decoder.layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # logprobs and values: nothing to save
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def init_megatron_parallel(tp: int, pp: int, seed: int, ep: int = 1) -> None:
    """megatron's parallel state and TP-aware CUDA RNG (torch.distributed must be initialised).

    Without CUDA the CPU shims are applied instead of seeding CUDA RNGs; parameters are then
    initialised from torch's default (CPU) generator, which the caller seeds. ``ep`` splits
    each data-parallel group's experts (megatron's expert grid is ep x (dp / ep) with tp=1)."""
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
    bind_router_gemm_without_transformer_engine()
    if not enable_cpu_execution():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def bind_router_gemm_without_transformer_engine() -> None:
    """megatron-core 0.16's MoE router reads the module global ``te_general_gemm``, which its
    ``moe_utils`` binds only when TransformerEngine imports: without TE the router's forward
    raises NameError. Binding it to None selects the router's torch matmul; idempotent."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(args: ModelArgs, use_te: bool | None = None, config=None):
    """``(spec, fused_norms)``: TransformerEngine's spec when it is installed (norms fused
    into linear_qkv / linear_fc1), else megatron's local spec with RMSNorm. A mixture-of-experts
    model gets megatron's decoder block spec (dense and sparse layers per ``config.moe_layer_freq``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:  # TransformerEngine's layers need CUDA
        use_te = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
    if args.is_moe:
        try:
            return gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                                              normalization="RMSNorm"), use_te
        except TypeError:  # releases whose block spec has no normalization argument
            return gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=use_te), use_te
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_norm), True
    try:
        return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=args.qk_norm, normalization="RMSNorm"), False
    except TypeError:  # releases whose local spec has no normalization argument
        return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=args.qk_norm), False


def build_gpt_model(
    args: ModelArgs, tp: int, pp: int, *, ep: int = 1, params_dtype: torch.dtype = torch.bfloat16,
    use_te: bool | None = None,
) -> tuple[torch.nn.Module, bool, int]:
    """``(GPTModel stage of this rank, fused_norms, vocab_rows)``; needs :func:`init_megatron_parallel`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(**transformer_config_kwargs(args, tp, pp, ep=ep, params_dtype=params_dtype),
                               use_cpu_initialization=not torch.cuda.is_available())
    spec, fused_norms = layer_spec(args, use_te, config)
    model_kwargs = gpt_model_kwargs(args, tp, pp=pp)
    model = GPTModel(config=config, transformer_layer_spec=spec, **model_kwargs,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    return model, fused_norms, model_kwargs["vocab_size"]


def load_stage_hf_state(path: str, args: ModelArgs, tp: int, pp: int, *, ep: int = 1, seed: int = 0,
                        role: str = "actor.strategy=megatron") -> dict[str, torch.Tensor]:
    """The HF tensors of the checkpoint at ``path`` that this rank's pipeline stage needs
    (:func:`~spmd_rl.models.megatron.names.hf_names_for_stage`): a rank reads its stage's layers
    (and its ep rank's experts) only, not the whole model. Sets up megatron's parallel state to
    learn the stage."""
    from megatron.core import parallel_state

    from spmd_rl.models.hf_io import load_state_dict

    _set_up(args, tp, pp, ep, seed, role)
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    return load_state_dict(path, keep=hf_names_for_stage(args, parallel_state.get_pipeline_model_parallel_rank(), pp,
                                                         ep_rank=ep_rank, ep_size=ep))


def _set_up(args: ModelArgs, tp: int, pp: int, ep: int, seed: int, role: str) -> None:
    """megatron-core importable, ``args`` mappable onto GPTModel over tp x pp x ep (UserError
    naming ``role`` otherwise), and megatron's parallel state initialised (idempotent)."""
    check_megatron_available()
    try:
        check_megatron_compatible(args, tp, pp, ep)
    except ValueError as e:
        raise UserError(f"{role}: {e}") from None
    init_megatron_parallel(tp, pp, seed, ep)


def build_actor(args: ModelArgs, tp: int, pp: int, *, ep: int = 1, seed: int = 0,
                params_dtype: torch.dtype = torch.bfloat16,
                hf_state: dict[str, torch.Tensor] | None = None, output_layer: bool = True,
                recompute: bool = False, compute_dtype: torch.dtype | None = None,
                role: str = "actor.strategy=megatron") -> MegatronActor:
    """This rank's GPTModel stage for ``args`` over a TP x PP grid (data parallel takes the
    remaining ranks; ``ep`` of them split a mixture-of-experts model's experts), loaded from
    ``hf_state`` when given; without its lm-head (``output_layer``) for a value model's trunk; ``recompute``: activation checkpointing per layer;
    ``compute_dtype``: mixed precision (see :meth:`MegatronActor.compute`); ``role`` names the
    model in errors. torch.distributed must be initialised."""
    from megatron.core import parallel_state

    _set_up(args, tp, pp, ep, seed, role)
    model, fused_norms, vocab_rows = build_gpt_model(args, tp, pp, ep=ep, params_dtype=params_dtype)
    if recompute:
        checkpoint_layers(model)
    actor = MegatronActor(
        model=model, args=args, tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp_size=pp, fused_norms=fused_norms,
        vocab_rows=vocab_rows, tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(), has_output_layer=output_layer,
        compute_dtype=compute_dtype, ep_rank=parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0,
        ep_size=ep, ep_group=parallel_state.get_expert_model_parallel_group() if ep > 1 else None)
    if not output_layer and getattr(model, "output_layer", None) is not None:
        model.output_layer = None  # the trunk ends at the final norm; no [V/tp, H] weight to hold or step
    if hf_state is not None:
        actor.load_hf_state(hf_state)
    return actor
