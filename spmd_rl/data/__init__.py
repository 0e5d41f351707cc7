"""Data: verl-schema parquet RL and SFT datasets, chat templating, sharded sampling, packing."""

from __future__ import annotations

from spmd_rl.data.packing import PackedBatch, pack_sequences, split_by_token_budget
from spmd_rl.data.rl_dataset import PromptSample, RLDataset
from spmd_rl.data.sampler import PromptSampler
from spmd_rl.data.sft_dataset import SFTDataset, SFTExample
from spmd_rl.data.tokenizer import build_char_tokenizer, load_tokenizer

__all__ = [
    "PackedBatch",
    "PromptSample",
    "PromptSampler",
    "RLDataset",
    "SFTDataset",
    "SFTExample",
    "build_char_tokenizer",
    "load_tokenizer",
    "pack_sequences",
    "split_by_token_budget",
]
