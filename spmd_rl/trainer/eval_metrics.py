"""Sampling metrics of an evaluation with N responses per prompt: ``mean@N``, ``maj@N``, ``best@N``.

Per prompt, with scores ``s_1..s_N`` and extracted answers ``a_1..a_N``:

- ``mean@N`` = ``mean_j s_j`` (the expected score of one sample);
- ``best@N`` = ``max_j s_j`` (pass@N when scores are 0/1);
- ``maj@N``  = the mean score of the responses whose answer is the majority answer
  (self-consistency voting, Wang et al. 2022, arXiv:2203.11171). Responses with no answer
  (``None``) do not vote unless no response has one; ties go to the answer seen first.

Each per-source figure is the mean of the per-prompt values over the prompts of that
``data_source``; the overall one is over all prompts. The reduction is kept as partial sums
(:class:`SourceTotals`) so every rank sums the whole prompts it evaluated and the sums are
merged afterwards: the result does not depend on how prompts were spread over ranks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass


@dataclass
class PromptGroup:
    """The N responses of one prompt."""

    data_source: str
    scores: Sequence[float]  # [N]
    answers: Sequence[Hashable | None]  # [N] extracted answer of each response, None = none found
    lengths: Sequence[int]  # [N] response tokens


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-None answer, the earliest one first seen on a tie; None only when
    every answer is None (or there are none)."""
    counts: dict[Hashable, int] = {}  # insertion order = order of first occurrence
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return None
    # max() keeps the first of equal maxima, i.e. the earliest first occurrence.
    return max(counts, key=counts.__getitem__)


def prompt_metrics(scores: Sequence[float], answers: Sequence[Hashable | None]) -> tuple[float, float, float]:
    """``(mean, maj, best)`` of one prompt's N responses (see the module docstring)."""
    if not scores or len(scores) != len(answers):
        raise ValueError(f"need one answer per score and at least one response, got {len(scores)} scores "
                         f"and {len(answers)} answers")
    winner = majority_answer(answers)
    voted = [s for s, a in zip(scores, answers) if a == winner]
    return sum(scores) / len(scores), sum(voted) / len(voted), max(scores)


@dataclass
class SourceTotals:
    """Partial sums over whole prompts: what one rank contributes, and what merging adds up."""

    prompts: int = 0
    responses: int = 0
    mean_sum: float = 0.0  # sum over prompts of mean@N
    maj_sum: float = 0.0
    best_sum: float = 0.0
    length_sum: float = 0.0  # sum over responses of the response length

    def add(self, group: PromptGroup) -> None:
        mean, maj, best = prompt_metrics(group.scores, group.answers)
        self.prompts += 1
        self.responses += len(group.scores)
        self.mean_sum += mean
        self.maj_sum += maj
        self.best_sum += best
        self.length_sum += sum(group.lengths)

    def merge(self, other: "SourceTotals") -> None:
        self.prompts += other.prompts
        self.responses += other.responses
        self.mean_sum += other.mean_sum
        self.maj_sum += other.maj_sum
        self.best_sum += other.best_sum
        self.length_sum += other.length_sum

    def means(self) -> tuple[float, float, float]:
        """``(mean@N, maj@N, best@N)`` averaged over the prompts (0 when there is none)."""
        k = max(self.prompts, 1)
        return self.mean_sum / k, self.maj_sum / k, self.best_sum / k


def accumulate(groups: Iterable[PromptGroup]) -> dict[str, SourceTotals]:
    """Partial sums per ``data_source`` of the given prompts."""
    totals: dict[str, SourceTotals] = {}
    for group in groups:
        totals.setdefault(group.data_source, SourceTotals()).add(group)
    return totals


def merge_totals(parts: Iterable[dict[str, SourceTotals]]) -> dict[str, SourceTotals]:
    """Sum the partial results of several ranks (in the order given), sources sorted by name."""
    merged: dict[str, SourceTotals] = {}
    for part in parts:
        for source in sorted(part):
            merged.setdefault(source, SourceTotals()).merge(part[source])
    return dict(sorted(merged.items()))


def overall(totals: dict[str, SourceTotals]) -> SourceTotals:
    """All sources together: every prompt weighs the same, whatever its source."""
    result = SourceTotals()
    for source in sorted(totals):
        result.merge(totals[source])
    return result


def validation_metrics(totals: dict[str, SourceTotals], n: int) -> dict[str, float]:
    """Logged names: ``val-core/<src>/acc/{mean,maj,best}@N`` and ``val-core/<src>/response_length/mean``
    per source, ``val-core/acc`` (overall mean@N), ``val/acc/{maj,best}@N`` (overall) and
    ``val/response_length/mean``."""
    metrics: dict[str, float] = {}
    for source, t in totals.items():
        mean, maj, best = t.means()
        metrics[f"val-core/{source}/acc/mean@{n}"] = mean
        metrics[f"val-core/{source}/acc/maj@{n}"] = maj
        metrics[f"val-core/{source}/acc/best@{n}"] = best
        metrics[f"val-core/{source}/response_length/mean"] = t.length_sum / max(t.responses, 1)
    everything = overall(totals)
    mean, maj, best = everything.means()
    metrics["val-core/acc"] = mean
    metrics[f"val/acc/maj@{n}"] = maj
    metrics[f"val/acc/best@{n}"] = best
    metrics["val/response_length/mean"] = everything.length_sum / max(everything.responses, 1)
    return metrics
