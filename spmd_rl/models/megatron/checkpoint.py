"""A megatron actor's trainer checkpoint back to one HF state dict (offline, one process).

The trainer saves each TP x PP shard of the GPTModel under ``actor/tp<T>_pp<P>/model``
(``trainer_policy.MegatronPolicy``); this reads every shard, renumbers each stage's layers
globally, joins the TP shards and converts the names with the same functions the rollout
engine's weight stream uses (:mod:`.names`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.megatron.distributed_optimizer import STATE_KEY
from spmd_rl.models.megatron.names import OUTPUT_LAYER, iter_hf_weights_from_mcore_shards, stage_name_to_global

SHARD_STATE = re.compile(r"^actor/tp(\d+)_pp(\d+)/model$")
_STAGE_PREFIX = "stage."  # MegatronPolicy keeps its GPTModel stage as ``self.stage``


def megatron_grid(state_names: list[str]) -> tuple[int, int] | None:
    """``(tp, pp)`` of a checkpoint's megatron actor shards, or None when it holds none."""
    cells = [tuple(map(int, m.groups())) for m in map(SHARD_STATE.match, state_names) if m]
    if not cells:
        return None
    tp, pp = max(t for t, _ in cells) + 1, max(p for _, p in cells) + 1
    if sorted(cells) != sorted((t, p) for t in range(tp) for p in range(pp)):
        raise ValueError(f"the megatron shards {sorted(cells)} do not fill a {tp} x {pp} (tp x pp) grid")
    return tp, pp


def hf_state_from_shards(load: Callable[[str], dict[str, torch.Tensor]], args: ModelArgs, tp: int,
                         pp: int) -> dict[str, torch.Tensor]:
    """The HF-named full tensors of a checkpointed megatron actor; ``load(prefix)`` returns the
    tensors of one state dict of the checkpoint (names without the prefix)."""
    shards = {(t, p): {k.removeprefix(_STAGE_PREFIX): v for k, v in load(f"actor/tp{t}_pp{p}/model").items()}
              for t in range(tp) for p in range(pp)}
    fused_norms = any(k.endswith("linear_qkv.layer_norm_weight") for k in shards[0, 0])
    return dict(iter_hf_weights_from_mcore_shards(_global_shards(shards, args, tp, pp), args, fused_norms=fused_norms))


def _global_shards(shards: dict, args: ModelArgs, tp: int, pp: int) -> Iterator[tuple[str, list[torch.Tensor]]]:
    per_stage = args.num_layers // pp
    for p in range(pp):
        for name in shards[0, p]:
            if name.endswith("_extra_state"):
                continue
            if name == OUTPUT_LAYER and args.tie_word_embeddings and p > 0:
                continue  # the last stage's copy of the tied embedding (the first stage has it)
            yield stage_name_to_global(name, p, per_stage), [shards[t, p][name] for t in range(tp)]


def check_resume_layout(saved_names: list[str], checkpoint: str, *, strategy: str, tp: int, pp: int) -> None:
    """UserError (one line) when the actor in a checkpoint (its state names) is laid out other
    than this run's: a megatron actor's optimizer state exists per TP x PP shard, so it resumes
    only on the same grid, and an FSDP actor's names differ from a megatron one's. The way out
    either way is the HF export, which any layout can start from."""
    try:
        saved = megatron_grid(saved_names)
    except ValueError as e:
        raise UserError(f"checkpoint {checkpoint}: {e}; resume from a complete checkpoint (trainer.resume=PATH) "
                        "or trainer.resume=never") from None
    run = (tp, pp) if strategy == "megatron" else None
    if saved == run:
        return
    describe = {None: "an FSDP actor"}
    held = describe.get(saved) or f"a megatron actor split tp={saved[0]} x pp={saved[1]}"
    this = "actor.strategy=fsdp" if run is None else f"actor.strategy=megatron parallel.tp={tp} parallel.pp={pp}"
    same = "actor.strategy=fsdp" if saved is None else \
        f"actor.strategy=megatron parallel.tp={saved[0]} parallel.pp={saved[1]}"
    raise UserError(f"checkpoint {checkpoint} holds {held} but this run has {this}: resume with {same}, or export it "
                    f"(python -m spmd_rl.export {checkpoint} OUT) and start from it (model.path=OUT trainer.resume=never; "
                    "the export holds the actor's weights only)")


def check_optimizer_layout(saved_names: list[str], checkpoint: str, *, sharded: dict[str, bool]) -> None:
    """UserError (one line) when a megatron model's optimizer state in a checkpoint is laid out
    other than this run's: sharded over dp (``<model>/.../optim_dp_sharded``, the distributed
    optimizer) or whole (``<model>/.../optim``). ``sharded`` maps "actor" / "critic" to this run's
    ``*.megatron.use_distributed_optimizer``."""
    for role, run_sharded in sharded.items():
        held = {name.rsplit("/", 1)[1] == STATE_KEY for name in saved_names
                if name.startswith(f"{role}/tp") and name.rsplit("/", 1)[1] in ("optim", STATE_KEY)}
        if held and held != {run_sharded}:
            saved = held.pop()
            raise UserError(
                f"checkpoint {checkpoint} holds the {role}'s AdamW state "
                f"{'sharded over data parallel' if saved else 'whole on every dp rank'} "
                f"({role}.megatron.use_distributed_optimizer={str(saved).lower()}) but this run has "
                f"{role}.megatron.use_distributed_optimizer={str(run_sharded).lower()}: resume with "
                f"{role}.megatron.use_distributed_optimizer={str(saved).lower()}")
