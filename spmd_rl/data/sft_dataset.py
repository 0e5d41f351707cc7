"""Supervised fine-tuning dataset: chat-templated prompt + response + eos, loss on the response.

The prompt is rendered exactly as the RL dataset renders it (``add_generation_prompt=True``), so
a model fine-tuned here sees the same prefix at RL time. The response is tokenized on its own
and closed with eos, which is what teaches the model to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spmd_rl.data.parquet_io import as_file_list, read_checked_rows
from spmd_rl.data.rl_dataset import filter_by_length, report_filtered
from spmd_rl.data.tokenizer import check_chat_template, encode_chat_prompts, to_messages
from spmd_rl.errors import UserError


@dataclass
class SFTExample:
    """One training sequence."""

    input_ids: list[int]  # [T] prompt ids + response ids + eos
    loss_mask: list[int]  # [T] 1 on response tokens and eos, 0 on the prompt


class SFTDataset:
    """Prompt/response pairs from parquet files; examples longer than ``max_length`` are dropped."""

    def __init__(
        self,
        files: str | list[str],
        tokenizer,
        *,
        prompt_key: str = "prompt",
        response_key: str = "response",
        max_length: int = 1024,
    ):
        check_chat_template(tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer at {tokenizer.name_or_path} has no eos token: SFT needs one to end responses")
        self.files = as_file_list(files)
        self.prompt_key, self.response_key = prompt_key, response_key
        self.max_length = max_length
        self._ids: list[np.ndarray] = []  # [T] int32 per example
        self._prompt_lens: list[int] = []
        lengths: list[int] = []  # of every example read, before filtering
        for path in self.files:
            lengths += self._load_file(path, tokenizer)
        self.num_filtered = len(lengths) - len(self._ids)
        report_filtered(len(self._ids), lengths, what="SFT examples", flag="data.max_length", limit=max_length)

    def _load_file(self, path: str, tokenizer) -> list[int]:
        """Tokenize and length-filter one file; return the token counts of all its examples."""
        rows = read_checked_rows(path, (self.prompt_key, self.response_key))
        prompts = encode_chat_prompts(tokenizer, [to_messages(r[self.prompt_key]) for r in rows])
        for i, row in enumerate(rows):
            if not isinstance(row[self.response_key], str):
                kind = type(row[self.response_key]).__name__
                raise UserError(f"row {i} of {path}: column {self.response_key} must be a string, got {kind}")
        responses = tokenizer([r[self.response_key] for r in rows], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        seqs = [p + r + [eos] for p, r in zip(prompts, responses)]
        lengths = [len(s) for s in seqs]
        for i in filter_by_length(lengths, self.max_length, drop=True, overlong_error=str):
            self._ids.append(np.asarray(seqs[i], dtype=np.int32))
            self._prompt_lens.append(len(prompts[i]))
        return lengths

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> SFTExample:
        if not 0 <= i < len(self._ids):
            raise IndexError(f"example index {i} out of range for {len(self._ids)} examples")
        ids = self._ids[i].tolist()
        n_prompt = self._prompt_lens[i]
        return SFTExample(input_ids=ids, loss_mask=[0] * n_prompt + [1] * (len(ids) - n_prompt))

    def lengths(self) -> list[int]:
        """Token count of every example, in index order (for token-budget micro-batches)."""
        return [len(x) for x in self._ids]
