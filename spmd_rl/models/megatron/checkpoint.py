"""A megatron actor's trainer checkpoint back to one HF state dict (offline, one process).

The trainer saves each TP x PP shard of the GPTModel under ``actor/tp<T>_pp<P>/model``, or
``actor/tp<T>_pp<P>_ep<E>/model`` under expert parallelism (``trainer_policy.MegatronPolicy``);
this reads every shard, renumbers each stage's layers and each ep rank's experts globally,
joins the TP shards and converts the names with the same functions the rollout engine's weight
stream uses (:mod:`.names`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.megatron.distributed_optimizer import STATE_KEY
from spmd_rl.models.megatron.names import (
    OUTPUT_LAYER,
    expert_name_to_global,
    is_expert_param,
    iter_hf_weights_from_mcore_shards,
    shard_name,
    stage_name_to_global,
)

SHARD_STATE = re.compile(r"^actor/tp(\d+)_pp(\d+)(?:_ep(\d+))?/model$")
_STAGE_PREFIX = "stage."  # MegatronPolicy keeps its GPTModel stage as ``self.stage``


def megatron_grid(state_names: list[str]) -> tuple[int, int, int] | None:
    """``(tp, pp, ep)`` of a checkpoint's megatron actor shards, or None when it holds none."""
    matches = [m for m in map(SHARD_STATE.match, state_names) if m]
    if not matches:
        return None
    cells = [(int(t), int(p), int(e or 0)) for t, p, e in (m.groups() for m in matches)]
    tp, pp, ep = (max(c[i] for c in cells) + 1 for i in range(3))
    named_ep = {m.group(3) is not None for m in matches}
    if named_ep == {True, False} or sorted(cells) != sorted(
            (t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)):
        shards = sorted(m.group(0).removeprefix("actor/").removesuffix("/model") for m in matches)
        raise ValueError(f"the megatron shards {shards} do not fill a {_grid_text(tp, pp, ep)} grid")
    return tp, pp, ep


def _grid_text(tp: int, pp: int, ep: int) -> str:
    return f"{tp} x {pp} x {ep} (tp x pp x ep)" if ep > 1 else f"{tp} x {pp} (tp x pp)"


def hf_state_from_shards(load: Callable[[str], dict[str, torch.Tensor]], args: ModelArgs, tp: int,
                         pp: int, ep: int = 1) -> dict[str, torch.Tensor]:
    """The HF-named full tensors of a checkpointed megatron actor; ``load(prefix)`` returns the
    tensors of one state dict of the checkpoint (names without the prefix)."""
    shards = {(t, p, e): {k.removeprefix(_STAGE_PREFIX): v
                          for k, v in load(f"actor/{shard_name(t, p, e, ep)}/model").items()}
              for t in range(tp) for p in range(pp) for e in range(ep)}
    fused_norms = any(k.endswith("linear_qkv.layer_norm_weight") for k in shards[0, 0, 0])
    return dict(iter_hf_weights_from_mcore_shards(_global_shards(shards, args, tp, pp, ep), args,
                                                  fused_norms=fused_norms))


def _global_shards(shards: dict, args: ModelArgs, tp: int, pp: int, ep: int) -> Iterator[tuple[str, list[torch.Tensor]]]:
    per_stage = args.num_layers // pp
    for p in range(pp):
        for name in shards[0, p, 0]:
            if name.endswith("_extra_state"):
                continue
            if name == OUTPUT_LAYER and args.tie_word_embeddings and p > 0:
                continue  # the last stage's copy of the tied embedding (the first stage has it)
            global_name = stage_name_to_global(name, p, per_stage)
            # every ep rank holds the dense tensors (ep rank 0's are taken) and its own experts
            for e in range(ep if is_expert_param(name) else 1):
                yield (expert_name_to_global(global_name, e, args.num_experts // ep),
                       [shards[t, p, e][name] for t in range(tp)])


def check_resume_layout(saved_names: list[str], checkpoint: str, *, strategy: str, tp: int, pp: int,
                        ep: int = 1) -> None:
    """UserError (one line) when the actor in a checkpoint (its state names) is laid out other
    than this run's: a megatron actor's optimizer state exists per TP x PP shard, so it resumes
    only on the same grid, and an FSDP actor's names differ from a megatron one's. The way out
    either way is the HF export, which any layout can start from."""
    try:
        saved = megatron_grid(saved_names)
    except ValueError as e:
        raise UserError(f"checkpoint {checkpoint}: {e}; resume from a complete checkpoint (trainer.resume=PATH) "
                        "or trainer.resume=never") from None
    run = (tp, pp, ep) if strategy == "megatron" else None
    if saved == run:
        return

    ep_differs = saved is not None and run is not None and saved[2] != run[2]

    def switches(grid) -> str:
        ep_switch = f" parallel.ep={grid[2]}" if grid[2] > 1 or ep_differs else ""
        return f"actor.strategy=megatron parallel.tp={grid[0]} parallel.pp={grid[1]}{ep_switch}"
    held = "an FSDP actor" if saved is None else \
        f"a megatron actor split tp={saved[0]} x pp={saved[1]}" + (f" x ep={saved[2]}" if saved[2] > 1 else "")
    this = "actor.strategy=fsdp" if run is None else switches(run)
    same = "actor.strategy=fsdp" if saved is None else switches(saved)
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
