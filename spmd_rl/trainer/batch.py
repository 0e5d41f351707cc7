"""The rollout batch of one rank: token lists for the model, padded ``[B, T]`` tensors for the math."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from spmd_rl.rollout.types import Completion


@dataclass
class RolloutBatch:
    """B = responses on this rank (prompts x n); T = longest response on this rank."""

    prompt_ids: list[list[int]]  # [B] prompt tokens of each response's prompt
    response_ids: list[list[int]]  # [B] generated tokens (stop token included)
    group_index: torch.Tensor  # [B] same value = same prompt
    response_mask: torch.Tensor  # [B, T] 1 on generated tokens
    rollout_logprobs: torch.Tensor  # [B, T] logprobs reported by the engine
    finish_reasons: list[str]  # [B]
    scores: torch.Tensor | None = None  # [B] outcome reward (with any overlong penalty)
    raw_scores: torch.Tensor | None = None  # [B] the reward function's score alone
    reward_baselines: torch.Tensor | None = None  # [B] ReMax: score of the prompt's greedy response
    old_logprobs: torch.Tensor | None = None  # [B, T] policy logprobs before the update
    ref_logprobs: torch.Tensor | None = None  # [B, T] reference policy logprobs
    values: torch.Tensor | None = None  # [B, T] critic values before the update
    token_rewards: torch.Tensor | None = None  # [B, T] score on the last token, minus any KL penalty
    advantages: torch.Tensor | None = None  # [B, T]
    returns: torch.Tensor | None = None  # [B, T]

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_groups(self) -> int:
        return len(torch.unique(self.group_index))

    def token_scores(self) -> torch.Tensor:
        """``[B, T]`` with each score on its response's last token (verl's convention)."""
        rewards = torch.zeros_like(self.response_mask, dtype=torch.float32)
        last = self.response_mask.sum(-1).long() - 1  # [B]
        rewards[torch.arange(len(self)), last] = self.scores.float()
        return rewards

    def select(self, index: list[int] | range) -> "RolloutBatch":
        """Rows ``index`` of every field, trimmed to their longest response."""
        index = list(index)
        width = max((len(self.response_ids[i]) for i in index), default=0)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index]
            elif value.dim() == 2:
                picked[f.name] = value[index, :width]
            else:
                picked[f.name] = value[index]
        return replace(self, **picked)


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Rows of all ``batches`` in order; group ids are offset so groups stay distinct."""
    width = max(b.response_mask.shape[1] for b in batches)
    merged, offset = {}, 0
    groups = []
    for b in batches:
        _, dense = torch.unique(b.group_index, return_inverse=True)
        groups.append(dense + offset)
        offset += int(dense.max()) + 1 if len(b) else 0
    for f in fields(RolloutBatch):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "group_index":
            merged[f.name] = torch.cat(groups)
        elif any(v is None for v in values):
            merged[f.name] = None
        elif isinstance(values[0], list):
            merged[f.name] = [x for v in values for x in v]
        elif values[0].dim() == 2:
            merged[f.name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values])
        else:
            merged[f.name] = torch.cat(values)
    return RolloutBatch(**merged)


def build_rollout_batch(prompt_ids: list[list[int]], completions: list[list[Completion]]) -> RolloutBatch:
    """Flatten ``completions[prompt][sample]`` into one row per response."""
    prompts, responses, groups, logprobs, reasons = [], [], [], [], []
    for g, (prompt, samples) in enumerate(zip(prompt_ids, completions)):
        for c in samples:
            prompts.append(prompt)
            responses.append(list(c.token_ids))
            groups.append(g)
            logprobs.append(torch.tensor(c.logprobs, dtype=torch.float32))
            reasons.append(c.finish_reason)
    width = max(len(r) for r in responses)
    mask = torch.zeros(len(responses), width)
    padded_lp = torch.zeros(len(responses), width)
    for i, (r, lp) in enumerate(zip(responses, logprobs)):
        mask[i, : len(r)] = 1
        padded_lp[i, : len(lp)] = lp
    return RolloutBatch(prompt_ids=prompts, response_ids=responses, group_index=torch.tensor(groups),
                        response_mask=mask, rollout_logprobs=padded_lp, finish_reasons=reasons)
