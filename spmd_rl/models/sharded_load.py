"""Read an HF folder's weights straight into a sharded native decoder, one tensor at a time.

The recipe of torchtitan for models larger than one device: build the decoder on the meta
device, shard it (TP, then FSDP2), allocate only this rank's shards (``to_empty``), then fill
them. Each rank reads the safetensors files tensor by tensor and keeps its own slice of each
(``distribute_tensor`` with ``src_data_rank=None`` cuts locally: no communication), so a rank
holds its shards plus one full tensor at most. Loading the whole model first would put a full
fp32 copy of the policy, the reference and the critic on every device before sharding.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from spmd_rl.errors import UserError
from spmd_rl.models.decoder import Transformer, copy_full_into
from spmd_rl.models.hf_io import iter_hf_tensors
from spmd_rl.rollout.weight_sync import clean_param_name


def is_on_meta(module: nn.Module) -> bool:
    return next(module.parameters()).is_meta


@torch.no_grad()
def materialise_from_hf(model: nn.Module, decoder: Transformer, path: str | os.PathLike,
                        device: torch.device | str) -> None:
    """Allocate ``model``'s parameters (this rank's shards) on ``device`` and fill ``decoder``,
    the native decoder inside it, with the weights of the HF folder ``path``. Parameters of
    ``model`` outside ``decoder`` (a value head) are left uninitialised for the caller.
    UserError (one line) when the folder's names or shapes do not match its config."""
    model.to_empty(device=device)
    params = {clean_param_name(n): p for n, p in decoder.named_parameters()}  # a tied lm-head: once
    tied = decoder.args.tie_word_embeddings
    loaded = set()
    for name, tensor in iter_hf_tensors(path):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # an old HF buffer; a tied copy some checkpoints store anyway
        param = params.get(name)
        if param is None or tuple(param.shape) != tuple(tensor.shape):
            found = "an unexpected" if param is None else f"shape {tuple(tensor.shape)} for the"
            raise UserError(f"weights in {path} do not match its config.json: {found} parameter {name}"
                            f"{'' if param is None else f' (config: {tuple(param.shape)})'}; "
                            "check that config.json belongs to these weights")
        copy_full_into(param, tensor.to(param.dtype))
        loaded.add(name)
    missing = sorted(params.keys() - loaded)
    if missing:
        raise UserError(f"weights in {path} do not match its config.json: missing {missing[:3]}; "
                        "check that config.json belongs to these weights")
