"""Write a (possibly FSDP-sharded) policy as an HF folder that transformers loads directly."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from spmd_rl.durable_files import fsync_tree, replace_folder
from spmd_rl.models.generic import HF_MODEL_PREFIX, GenericCausalLM, copy_remote_code
from spmd_rl.models.hf_io import generation_token_ids, read_generation_config, save_generation_config, save_pretrained


def export_model(decoder, tokenizer, out_dir: Path, rank: int, source_dir: str | None = None) -> None:
    """Gather the full weights to CPU (every rank takes part), then rank 0 writes the HF folder
    (:func:`write_hf_folder`). A generic transformers model is written under its own HF names
    and config."""
    state = get_model_state_dict(decoder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if isinstance(decoder, GenericCausalLM):
        named = ((name.removeprefix(HF_MODEL_PREFIX), tensor) for name, tensor in state.items())
        write_hf_folder(named, decoder.export_args(), tokenizer, out_dir, rank, source_dir)
    else:
        write_hf_folder(state.items(), decoder.args, tokenizer, out_dir, rank, source_dir)


def write_hf_folder(named_tensors: Iterable[tuple[str, torch.Tensor]], args, tokenizer, out_dir: Path, rank: int,
                    source_dir: str | None = None) -> None:
    """Rank 0 writes config.json, safetensors of the HF-named tensors, the tokenizer and
    generation_config.json (``source_dir``'s, with the run's stop ids) into a temporary sibling
    that replaces ``out_dir`` once complete. Every rank consumes ``named_tensors`` (it may be a
    collective iterator); only rank 0 keeps them, on CPU."""
    state = {name: tensor.detach().cpu() for name, tensor in named_tensors if rank == 0}
    if rank == 0:
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_pretrained(state, args, tmp)
            copy_remote_code(source_dir, args, tmp)
            tokenizer.save_pretrained(str(tmp))
            base = read_generation_config(source_dir) if source_dir else {}
            save_generation_config(tmp, base=base, **generation_token_ids(args, tokenizer, base))
            fsync_tree(tmp)
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only left when something above failed
        print(f"wrote HF checkpoint to {out}", flush=True)
    dist.barrier()
