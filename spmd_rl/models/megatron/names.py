"""HF <-> megatron-core GPTModel state dicts, and their tensor/pipeline-parallel shards.

Pure tensor reshuffling; no megatron import. Layouts are those of megatron-core >=0.12,<0.17:

* ``linear_qkv`` fuses q, k and v **per query group**: for each of the ``G = num_kv_heads``
  groups, the ``num_heads / G`` query heads of that group, then its key head, then its value
  head, each ``head_dim`` rows: ``[q_0.. k_0 v_0 | q_1.. k_1 v_1 | ...]``. Column-parallel
  sharding cuts that along dim 0, so each rank holds whole groups (``G % tp == 0``).
* ``linear_fc1`` is ``cat(gate, up)``; rank r holds ``cat(gate_r, up_r)`` (each half split).
* With the TransformerEngine layer spec (``fused_norms=True``) the pre-attention RMSNorm lives in
  ``linear_qkv.layer_norm_weight`` and the pre-MLP one in ``linear_fc1.layer_norm_weight``; the
  local spec (``fused_norms=False``) keeps ``input_layernorm`` / ``pre_mlp_layernorm``.
* ``linear_proj`` (o_proj) and ``linear_fc2`` (down_proj) are row-parallel (split along dim 1);
  ``embedding.word_embeddings`` and ``output_layer`` are vocab-parallel (split along dim 0).
* A sparse (mixture-of-experts) layer holds ``mlp.router.weight`` (HF ``gate``) and, per
  expert, ``mlp.experts.local_experts.<e>.linear_fc1`` (``cat(gate, up)``: Qwen3-MoE's
  ``gate_proj/up_proj``, Mixtral's ``w1/w3``) and ``linear_fc2`` (``down_proj`` / ``w2``); its
  pre-MLP RMSNorm stays ``pre_mlp_layernorm`` under the TransformerEngine spec too (the router
  reads the normed input). With expert parallelism each rank holds ``E / ep`` experts,
  numbered from 0 locally: global expert ``e`` is local ``e % (E / ep)`` on ep rank
  ``e // (E / ep)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from spmd_rl.models.args import ModelArgs

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_ROUTER = re.compile(r"^(mlp|block_sparse_moe)\.gate\.weight$")
_HF_EXPERT = re.compile(r"^(mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_MCORE_EXPERT = re.compile(r"^(.*\bmlp\.experts\.local_experts\.)(\d+)(\..+)$")
ROUTER = "mlp.router.weight"
# Mixtral's expert projections by their Qwen3-MoE (and dense MLP) names
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
_HF_GLOBAL = {"model.embed_tokens.weight": EMBEDDING, "model.norm.weight": FINAL_NORM, "lm_head.weight": OUTPUT_LAYER}
_QKV_PARTS = ("q_proj", "k_proj", "v_proj")
_FC1_PARTS = ("gate_proj", "up_proj")

# How each mcore tensor is split over tensor-parallel ranks, by name suffix.
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_GATE_UP = ("linear_fc1.weight",)  # the dense MLP's and each expert's
_ROW = ("self_attention.linear_proj.weight", "linear_fc2.weight")
_VOCAB = (EMBEDDING, OUTPUT_LAYER)
_REPLICATED = ("layer_norm_weight", "layernorm.weight", ROUTER)
TP_LAYOUTS = ("column", "gate_up", "row", "vocab", "replicated")


def _layer_renames(fused_norms: bool, sparse: bool = False) -> dict[str, str]:
    """One-to-one HF -> mcore renames inside ``model.layers.N`` / ``decoder.layers.N``
    (``sparse``: a mixture-of-experts layer, whose pre-MLP norm is never fused)."""
    return {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight" if fused_norms
        else "input_layernorm.weight",
        "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight" if fused_norms and not sparse
        else "pre_mlp_layernorm.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
        "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    }


# ---------------------------------------------------------------------------------------------
# Fused tensors


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Megatron's grouped ``linear_qkv`` from HF q/k/v.

    Args:
        q: ``[Hq * D, ...]`` (weight ``[Hq*D, H]`` or bias ``[Hq*D]``); k, v: ``[G * D, ...]``.
    Returns:
        ``[(Hq + 2G) * D, ...]`` ordered ``[q heads of group g, k_g, v_g]`` for g = 0..G-1.
    """
    G, rest = num_query_groups, q.shape[1:]
    qg = q.reshape(G, -1, *rest)  # [G, (Hq/G)*D, ...]
    kg, vg = k.reshape(G, -1, *rest), v.reshape(G, -1, *rest)  # [G, D, ...]
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``[(Hq + 2G) * D, ...]`` -> q ``[Hq*D, ...]``, k, v ``[G*D, ...]``."""
    G, rest = num_query_groups, qkv.shape[1:]
    q_rows = num_heads // G * head_dim
    grouped = qkv.reshape(G, q_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended so ``t [V, H]`` has ``rows`` rows (vocab-parallel padding)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# ---------------------------------------------------------------------------------------------
# Whole state dicts


def hf_to_mcore(
    hf_state: dict[str, torch.Tensor],
    args: ModelArgs,
    *,
    fused_norms: bool = True,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """A full (unsharded) GPTModel state dict from an HF Llama/Qwen2/Qwen3 state dict.

    ``vocab_size``: rows of the embedding/output layer in the GPTModel (``gpt_model_kwargs``'s
    padded vocab); default ``args.vocab_size``. Tied checkpoints get no ``output_layer.weight``
    (GPTModel reuses the embedding). ``rotary_emb.inv_freq`` buffers are ignored.
    """
    rows = vocab_size or args.vocab_size
    state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy anyway
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, fused name) -> parts
    for name, tensor in state.items():
        if name in _HF_GLOBAL:
            continue  # placed first/last below, for a stable order
        match = _HF_LAYER.match(name)
        suffix = match.group(2) if match else None
        renames = _layer_renames(fused_norms, sparse=bool(match) and int(match.group(1)) in args.moe_layers)
        renamed = renames.get(suffix) or (_expert_rename(suffix) if match else None)
        if renamed is not None:
            out[f"decoder.layers.{match.group(1)}.{renamed}"] = tensor
            continue
        parts = _fused_part(suffix) if match else None
        if parts is None:
            raise ValueError(f"hf_to_mcore: unexpected parameter {name!r}; expected model.embed_tokens, "
                             "model.layers.N.{self_attn,mlp,block_sparse_moe,*_layernorm}.*, model.norm or lm_head")
        fused, part = parts
        pending.setdefault((int(match.group(1)), fused), {})[part] = tensor
    for (layer, fused), parts in pending.items():
        out[f"decoder.layers.{layer}.{fused}"] = _fuse(fused, parts, args, layer)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in state]
    if not args.tie_word_embeddings and "lm_head.weight" not in state:
        missing.append("lm_head.weight")
    if missing:
        raise ValueError(f"hf_to_mcore: missing {missing}; pass a complete HF state dict")
    ordered = {EMBEDDING: _pad_vocab(state["model.embed_tokens.weight"], rows)}
    ordered.update(sorted(out.items(), key=lambda kv: _layer_sort_key(kv[0])))
    ordered[FINAL_NORM] = state["model.norm.weight"]
    if not args.tie_word_embeddings:
        ordered[OUTPUT_LAYER] = _pad_vocab(state["lm_head.weight"], rows)
    return ordered


def _expert_rename(suffix: str) -> str | None:
    """The mcore name of a sparse layer's router or of an expert's down projection (the
    one-to-one renames); None for anything else."""
    if _HF_ROUTER.match(suffix):
        return ROUTER
    expert = _HF_EXPERT.match(suffix)
    if expert and _MIXTRAL_EXPERT.get(expert.group(3), expert.group(3)) == "down_proj":
        return f"mlp.experts.local_experts.{expert.group(2)}.linear_fc2.weight"
    return None


def _fused_part(suffix: str) -> tuple[str, str] | None:
    """``("self_attention.linear_qkv.weight", "q_proj")`` for ``self_attn.q_proj.weight``,
    ``("mlp.experts.local_experts.3.linear_fc1.weight", "gate_proj")`` for an expert's gate etc."""
    expert = _HF_EXPERT.match(suffix)
    if expert:
        return f"mlp.experts.local_experts.{expert.group(2)}.linear_fc1.weight", \
            _MIXTRAL_EXPERT.get(expert.group(3), expert.group(3))
    module, _, kind = suffix.rpartition(".")
    prefix, _, proj = module.rpartition(".")
    if prefix == "self_attn" and proj in _QKV_PARTS:
        return f"self_attention.linear_qkv.{kind}", proj
    if prefix == "mlp" and proj in _FC1_PARTS and kind == "weight":
        return "mlp.linear_fc1.weight", proj
    return None


def _fuse(fused: str, parts: dict[str, torch.Tensor], args: ModelArgs, layer: int) -> torch.Tensor:
    expected = _QKV_PARTS if "linear_qkv" in fused else _FC1_PARTS
    missing = [p for p in expected if p not in parts]
    if missing:
        raise ValueError(f"hf_to_mcore: layer {layer} has {sorted(parts)} but not {missing} for {fused}")
    if "linear_qkv" in fused:
        return fuse_qkv(parts["q_proj"], parts["k_proj"], parts["v_proj"], args.num_kv_heads)
    return torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)


def _layer_sort_key(name: str) -> tuple[int, str]:
    match = _MCORE_LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


def mcore_tensor_to_hf(
    name: str, tensor: torch.Tensor, args: ModelArgs, *, fused_norms: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """The HF ``(name, tensor)`` pairs of one full mcore tensor (three for linear_qkv, two for
    linear_fc1, none for ``_extra_state`` or a tied ``output_layer``). Vocab padding is cut off."""
    if name.endswith("_extra_state"):
        return []  # TransformerEngine's fp8 metadata, no weights
    if name == EMBEDDING:
        return [("model.embed_tokens.weight", tensor[: args.vocab_size])]
    if name == FINAL_NORM:
        return [("model.norm.weight", tensor)]
    if name == OUTPUT_LAYER:
        # With tied embeddings the last pipeline stage keeps a copy: the embedding already covers it.
        return [] if args.tie_word_embeddings else [("lm_head.weight", tensor[: args.vocab_size])]
    match = _MCORE_LAYER.match(name)
    if match is None:
        raise ValueError(f"mcore_to_hf: unexpected parameter {name!r}; expected embedding.*, "
                         "decoder.layers.N.*, decoder.final_layernorm or output_layer")
    layer, suffix = match.groups()
    prefix = f"model.layers.{layer}."
    for hf_suffix, mcore_suffix in _layer_renames(fused_norms, sparse=int(layer) in args.moe_layers).items():
        if suffix == mcore_suffix:
            return [(prefix + hf_suffix, tensor)]
    block = "block_sparse_moe" if args.mixtral_names else "mlp"
    if suffix == ROUTER:
        return [(f"{prefix}{block}.gate.weight", tensor)]
    expert = _MCORE_EXPERT.match(suffix)
    if expert:
        names = _hf_expert_names(args)
        expert_prefix = f"{prefix}{block}.experts.{expert.group(2)}."
        if expert.group(3) == ".linear_fc1.weight":
            gate, up = tensor.chunk(2, dim=0)
            return [(f"{expert_prefix}{names['gate_proj']}.weight", gate), (f"{expert_prefix}{names['up_proj']}.weight", up)]
        if expert.group(3) == ".linear_fc2.weight":
            return [(f"{expert_prefix}{names['down_proj']}.weight", tensor)]
    if suffix.startswith("self_attention.linear_qkv.") and suffix.rpartition(".")[2] in ("weight", "bias"):
        kind = suffix.rpartition(".")[2]
        q, k, v = split_qkv(tensor, args.num_heads, args.num_kv_heads, args.head_dim)
        return [(f"{prefix}self_attn.{p}.{kind}", t) for p, t in zip(_QKV_PARTS, (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return [(f"{prefix}mlp.gate_proj.weight", gate), (f"{prefix}mlp.up_proj.weight", up)]
    raise ValueError(f"mcore_to_hf: unexpected parameter {name!r} (fused_norms={fused_norms}); "
                     "expected the GPTModel names of a Llama/Qwen2/Qwen3 decoder")


def _hf_expert_names(args: ModelArgs) -> dict[str, str]:
    """An expert's HF projection names by their Qwen3-MoE names (Mixtral: w1 / w3 / w2)."""
    if args.mixtral_names:
        return {qwen: mixtral for mixtral, qwen in _MIXTRAL_EXPERT.items()}
    return {name: name for name in ("gate_proj", "up_proj", "down_proj")}


def mcore_to_hf(
    mcore_state: dict[str, torch.Tensor], args: ModelArgs, *, fused_norms: bool = True
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore` on a full state dict (HF names, no tied ``lm_head``)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mcore_state.items():
        out.update(mcore_tensor_to_hf(name, tensor, args, fused_norms=fused_norms))
    return out


# ---------------------------------------------------------------------------------------------
# Tensor parallelism


def tp_layout(name: str) -> str:
    """How megatron splits ``name`` over TP ranks: one of :data:`TP_LAYOUTS`."""
    if name.endswith(_COLUMN):
        return "column"
    if name.endswith(_GATE_UP):
        return "gate_up"
    if name.endswith(_ROW):
        return "row"
    if name in _VOCAB:
        return "vocab"
    if name.endswith(_REPLICATED):
        return "replicated"
    raise ValueError(f"no tensor-parallel layout for {name!r}; known suffixes: "
                     f"{', '.join(_COLUMN + _GATE_UP + _ROW + _VOCAB + _REPLICATED)}")


def shard_for_tp(
    name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int, *, num_query_groups: int | None = None
) -> torch.Tensor:
    """Rank ``tp_rank``'s slice of the full mcore tensor ``name`` (a view where possible).

    column (linear_qkv): dim 0 in ``tp_size`` equal pieces; with the grouped layout each piece is
    ``G / tp_size`` whole query groups (pass ``num_query_groups`` to check ``G % tp_size == 0``).
    gate_up (linear_fc1): ``cat(gate_r, up_r)``. row (linear_proj, linear_fc2): dim 1.
    vocab (embedding, output_layer): dim 0. replicated (norms): the whole tensor.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, {tp_size})")
    layout = tp_layout(name)
    if layout == "replicated" or tp_size == 1:
        return tensor
    if layout == "column" and num_query_groups is not None and num_query_groups % tp_size != 0:
        raise ValueError(f"{name}: {num_query_groups} query groups cannot be split over tp={tp_size}; "
                         f"choose tp among the divisors of {num_query_groups}")
    if layout == "gate_up":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([_split(name, gate, 0, tp_size)[tp_rank], _split(name, up, 0, tp_size)[tp_rank]])
    return _split(name, tensor, 1 if layout == "row" else 0, tp_size)[tp_rank]


def _split(name: str, tensor: torch.Tensor, dim: int, parts: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[dim] % parts != 0:
        raise ValueError(f"{name}: dim {dim} of size {tensor.shape[dim]} is not divisible by tp={parts}")
    return tensor.chunk(parts, dim=dim)


def gather_tp_shards(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor from its TP shards in rank order (inverse of :func:`shard_for_tp`)."""
    layout = tp_layout(name)
    if layout == "replicated" or len(shards) == 1:
        return shards[0]
    if layout == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=1 if layout == "row" else 0)


def iter_hf_weights_from_mcore_shards(
    named_shards: Iterable[tuple[str, Sequence[torch.Tensor]]],
    args: ModelArgs,
    *,
    fused_norms: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` one at a time from TP-sharded mcore tensors.

    ``named_shards`` yields each mcore parameter (global layer numbering) with its shards in TP
    rank order, e.g. straight after an all-gather; a replicated tensor may come as one shard.
    Only one gathered parameter (and its HF pieces) is alive at a time, so a rollout engine can
    load weights tensor by tensor while training memory is still allocated.
    """
    for name, shards in named_shards:
        if name.endswith("_extra_state"):
            continue
        full = gather_tp_shards(name, shards)
        yield from mcore_tensor_to_hf(name, full, args, fused_norms=fused_norms)


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism


def hf_names_for_stage(args: ModelArgs, pp_rank: int, pp_size: int, *, ep_rank: int = 0,
                       ep_size: int = 1) -> Callable[[str], bool]:
    """Whether an HF parameter name is needed to build pipeline stage ``pp_rank`` on expert
    parallel rank ``ep_rank``: its layers (of the experts, its own), and the global tensors
    (embedding, final norm, lm-head), which :func:`hf_to_mcore` wants whatever the stage. A rank
    then reads about 1/pp of a checkpoint's layers and 1/ep of their experts."""
    layers = set(layers_for_pp_stage(args.num_layers, pp_rank, pp_size))
    per_rank = max(args.num_experts // ep_size, 1)

    def keep(name: str) -> bool:
        match = _HF_LAYER.match(name)
        if match is None:
            return True
        expert = _HF_EXPERT.match(match.group(2))
        return int(match.group(1)) in layers and (expert is None or int(expert.group(2)) // per_rank == ep_rank)
    return keep


def layers_for_pp_stage(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global indices of the decoder layers on pipeline stage ``pp_rank`` (even split)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, {pp_size})")
    if num_layers % pp_size != 0:
        raise ValueError(f"num_layers={num_layers} is not divisible by pp={pp_size}; "
                         f"choose pp among the divisors of {num_layers}")
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def select_pp_stage(
    mcore_state: dict[str, torch.Tensor], args: ModelArgs, pp_rank: int, pp_size: int
) -> dict[str, torch.Tensor]:
    """The part of a full mcore state dict that stage ``pp_rank`` holds, layers renumbered from 0
    (megatron numbers layers locally per stage). The first stage holds the embedding, the last one
    the final norm and the output layer; with tied embeddings and ``pp_size > 1`` the last stage
    holds its own copy of the embedding as ``output_layer.weight`` (megatron keeps the two in sync
    by an all-reduce of their gradients)."""
    layers = layers_for_pp_stage(args.num_layers, pp_rank, pp_size)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mcore_state.items():
        match = _MCORE_LAYER.match(name)
        if match:
            layer = int(match.group(1))
            if layer in layers:
                out[f"decoder.layers.{layer - layers.start}.{match.group(2)}"] = tensor
        elif (name == EMBEDDING and first) or (name in (FINAL_NORM, OUTPUT_LAYER) and last):
            out[name] = tensor
    if last and args.tie_word_embeddings and pp_size > 1:
        out[OUTPUT_LAYER] = mcore_state[EMBEDDING]
    return out


def shard_name(tp_rank: int, pp_rank: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """A cell of the model-parallel grid as checkpoints name it: ``tp0_pp1``, or ``tp0_pp1_ep1``
    under expert parallelism (ep ranks hold different experts)."""
    name = f"tp{tp_rank}_pp{pp_rank}"
    return f"{name}_ep{ep_rank}" if ep_size > 1 else name


def is_expert_param(name: str) -> bool:
    """Whether ``name`` is one expert's weight (split over expert-parallel ranks)."""
    return _MCORE_EXPERT.match(name) is not None


def select_ep_experts(mcore_state: dict[str, torch.Tensor], ep_rank: int, ep_size: int,
                      num_experts: int) -> dict[str, torch.Tensor]:
    """The part of an mcore state dict that expert-parallel rank ``ep_rank`` holds: every
    non-expert tensor, and its ``num_experts / ep_size`` experts renumbered from 0."""
    if not 0 <= ep_rank < ep_size or num_experts % ep_size:
        raise ValueError(f"ep_rank={ep_rank} of ep={ep_size} cannot hold an equal share of {num_experts} experts")
    per_rank = num_experts // ep_size
    out = {}
    for name, tensor in mcore_state.items():
        expert = _MCORE_EXPERT.match(name)
        if expert is None:
            out[name] = tensor
        elif int(expert.group(2)) // per_rank == ep_rank:
            out[f"{expert.group(1)}{int(expert.group(2)) % per_rank}{expert.group(3)}"] = tensor
    return out


def expert_name_to_global(name: str, ep_rank: int, experts_per_rank: int) -> str:
    """An ep rank's local expert name with its global expert number (others unchanged)."""
    expert = _MCORE_EXPERT.match(name)
    if expert is None:
        return name
    return f"{expert.group(1)}{int(expert.group(2)) + ep_rank * experts_per_rank}{expert.group(3)}"


def stage_name_to_global(name: str, pp_rank: int, layers_per_stage: int) -> str:
    """``decoder.layers.<local>.*`` on stage ``pp_rank`` -> ``decoder.layers.<global>.*``."""
    match = _MCORE_LAYER.match(name)
    if match is None:
        return name
    return f"decoder.layers.{int(match.group(1)) + pp_rank * layers_per_stage}.{match.group(2)}"

