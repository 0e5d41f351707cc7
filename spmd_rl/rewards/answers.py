"""The final answer of a response, by ``data_source``: what majority voting (``maj@N``) groups on.

Each extractor is the one its rule reward compares with the ground truth, so responses with the
same answer have the same score and ``maj@N`` is the score of the voted answer:

- ``openai/gsm8k``: :func:`spmd_rl.rewards.gsm8k.extract_solution` with the ``strict`` method
  (``#### <number>``), the method the reward uses;
- the MATH sources: the content of the last ``\\boxed{}`` normalised by
  :func:`spmd_rl.rewards.math.strip_string`;
- ``synthetic/addition``: the response stripped of whitespace and end markers;
- any other source (custom reward functions): the stripped response text.
"""

from __future__ import annotations

from typing import Callable

from spmd_rl.rewards import addition, gsm8k, math
from spmd_rl.rewards.default import SCORERS


def _gsm8k(solution_str: str) -> str | None:
    return gsm8k.extract_solution(solution_str, method="strict")


def _math(solution_str: str) -> str | None:
    boxed = math.last_boxed_only_string(solution_str)
    if boxed is None:
        return None
    try:
        return math.strip_string(math.remove_boxed(boxed))
    except ValueError:  # a malformed box (e.g. "\\boxed\\frac12") holds no answer
        return None


def _stripped(solution_str: str) -> str | None:
    return addition.strip_response(solution_str) or None  # an empty response has no answer


# Mirrors the reward dispatch (SCORERS): every source scored by the MATH check gets the MATH
# extractor, so a MATH variant added there is covered here too.
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "openai/gsm8k": _gsm8k,
    **{source: _math for source, scorer in SCORERS.items() if scorer is math.compute_score},
    "synthetic/addition": _stripped,
}


def extract_answer(data_source: str, solution_str: str) -> str | None:
    """The answer of ``solution_str`` under ``data_source``'s rule, or None when it has none."""
    return EXTRACTORS.get(data_source, _stripped)(solution_str)
