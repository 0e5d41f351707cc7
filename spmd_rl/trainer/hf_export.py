"""Write a (possibly FSDP-sharded) policy as an HF folder that transformers loads directly."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from spmd_rl.models.hf_io import save_pretrained


def export_model(decoder, tokenizer, out_dir: Path, rank: int) -> None:
    """Gather the full weights to CPU (every rank takes part), then rank 0 writes config.json,
    safetensors and the tokenizer."""
    state = get_model_state_dict(decoder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_pretrained(state, decoder.args, out_dir)
        tokenizer.save_pretrained(str(out_dir))
        print(f"wrote HF checkpoint to {out_dir}", flush=True)
    dist.barrier()
