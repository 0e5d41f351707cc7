"""Prompt dataset for RL, reading verl-schema parquet files unchanged.

Each row holds ``data_source``, ``prompt`` (chat messages), ``ability``, ``reward_model``
(``{style, ground_truth}``) and optionally ``extra_info``. Prompts are chat-templated and
tokenized once, up front, so overlong ones can be dropped before the sampler fixes the epoch
length, and so every rank holds the same index space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from spmd_rl.data.parquet_io import as_file_list, read_checked_rows
from spmd_rl.data.tokenizer import check_chat_template, encode_chat_prompts, to_messages
from spmd_rl.errors import UserError

# Columns beyond the prompt that every RL row needs: the scorer is chosen by data_source and
# compares against reward_model.ground_truth. ability and extra_info are optional.
REQUIRED_COLUMNS = ("data_source", "reward_model")


@dataclass
class PromptSample:
    """One prompt as the rollout and reward code see it."""

    index: int  # row index in the (filtered) dataset
    prompt_ids: list[int]  # [prompt_len], chat-templated with add_generation_prompt=True
    raw_prompt: list[dict]  # the chat messages before templating
    data_source: str  # selects the reward function
    ground_truth: Any  # reward_model.ground_truth, passed to the scorer unchanged
    extra_info: dict = field(default_factory=dict)


def filter_by_length(lengths: Sequence[int], limit: int, *, drop: bool, overlong_error: Callable[[int], str]) -> list[int]:
    """Indices of ``lengths`` that are within ``limit``, in order.

    With ``drop=False`` the first overlong item raises a UserError whose message is
    ``overlong_error(index)`` instead, since silently truncating a prompt changes the task.
    """
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    if not drop and len(keep) < len(lengths):
        raise UserError(overlong_error(next(i for i, n in enumerate(lengths) if n > limit)))
    return keep


def report_filtered(kept: int, lengths: Sequence[int], *, what: str, flag: str, limit: int) -> None:
    """Print the one-line filtering report, or raise a UserError if nothing is left.

    ``lengths`` are those of all items before filtering, ``kept`` how many survived.
    """
    total = len(lengths)
    if kept == 0:
        raise UserError(
            f"all {total} {what} are longer than {flag}={limit} (the shortest has {min(lengths)} tokens): raise {flag}"
        )
    if kept < total:
        print(f"filtered {total - kept} of {total} {what} longer than {flag}={limit}", flush=True)


class RLDataset:
    """Chat-templated prompts of one or more verl-schema parquet files, overlong ones dropped.

    Items are :class:`PromptSample`; indices are positions after filtering, in file order.
    """

    def __init__(
        self,
        files: str | list[str],
        tokenizer,
        *,
        prompt_key: str = "prompt",
        max_prompt_length: int = 1024,
        filter_overlong_prompts: bool = True,
        chat_template_kwargs: dict | None = None,
    ):
        check_chat_template(tokenizer)
        self.files = as_file_list(files)
        self.prompt_key = prompt_key
        self.max_prompt_length = max_prompt_length
        self._rows: list[dict[str, Any]] = []
        self._messages: list[list[dict]] = []
        self._ids: list[np.ndarray] = []  # int32 arrays: a fraction of the memory of int lists
        lengths: list[int] = []  # of every row read, before filtering
        for path in self.files:
            lengths += self._load_file(path, tokenizer, filter_overlong_prompts, chat_template_kwargs)
        self.num_filtered = len(lengths) - len(self._rows)
        report_filtered(
            len(self._rows), lengths, what="prompts", flag="data.max_prompt_length", limit=max_prompt_length
        )

    def _load_file(self, path: str, tokenizer, drop: bool, chat_template_kwargs: dict | None) -> list[int]:
        """Read, template and length-filter one file; return the token counts of all its rows."""
        rows = read_checked_rows(path, (self.prompt_key, *REQUIRED_COLUMNS))
        messages = [to_messages(row[self.prompt_key]) for row in rows]
        ids = encode_chat_prompts(tokenizer, messages, chat_template_kwargs)
        lengths = [len(x) for x in ids]
        limit = self.max_prompt_length
        keep = filter_by_length(
            lengths,
            limit,
            drop=drop,
            overlong_error=lambda i: (
                f"prompt {i} of {path} has {lengths[i]} tokens > data.max_prompt_length={limit}: "
                "raise data.max_prompt_length or set data.filter_overlong_prompts=true"
            ),
        )
        for i in keep:
            self._rows.append(rows[i])
            self._messages.append(messages[i])
            self._ids.append(np.asarray(ids[i], dtype=np.int32))
        return lengths

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> PromptSample:
        if not 0 <= i < len(self._rows):
            raise IndexError(f"prompt index {i} out of range for {len(self._rows)} prompts")
        row = self._rows[i]
        reward_model = row.get("reward_model") or {}
        return PromptSample(
            index=i,
            prompt_ids=self._ids[i].tolist(),
            raw_prompt=[dict(m) for m in self._messages[i]],
            data_source=row.get("data_source") or "",
            ground_truth=reward_model.get("ground_truth"),
            extra_info=dict(row.get("extra_info") or {}),
        )

    def prompt_lengths(self) -> list[int]:
        """Token count of every prompt, in index order (for length-aware batching and logging)."""
        return [len(x) for x in self._ids]
