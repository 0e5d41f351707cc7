"""GSM8K rule reward (Cobbe et al. 2021, arXiv:2110.14168), as verl's ``gsm8k`` scorer.

The model is asked to end with ``#### <number>``, the format of GSM8K's reference solutions.
"""

from __future__ import annotations

import re

# Only the tail is searched: a "#### n" early in a long, rambling response does not count,
# and regex cost stays bounded on degenerate generations.
SOLUTION_CLIP_CHARS = 300

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


def extract_solution(solution_str: str, method: str = "strict") -> str | None:
    """Final answer of a response, or None when there is none.

    ``strict``: the last ``#### <number>`` in the last 300 characters.
    ``flexible``: the last number in the last 300 characters.
    Thousands separators (``,``) and ``$`` are removed from the result.
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"unknown gsm8k extraction method {method!r}; valid: strict, flexible")
    tail = solution_str[-SOLUTION_CLIP_CHARS:]
    if method == "strict":
        matches = _STRICT.findall(tail)
        candidates = matches[-1:]
    else:
        # a lone "." or "," also matches the character class; skip those
        candidates = [m for m in _NUMBER.findall(tail) if m not in ("", ".", ",")][-1:]
    if not candidates:
        return None
    return candidates[0].replace(",", "").replace("$", "")


def compute_score(
    solution_str: str,
    ground_truth: str,
    method: str = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """``score`` if the extracted answer equals ``ground_truth``, ``format_score`` if an answer
    was found but is wrong, 0.0 if none was found.

    ``ground_truth`` is compared as a string after removing thousands separators, so both
    ``"1234"`` and ``"1,234"`` accept the answer ``#### 1,234``.
    """
    answer = extract_solution(solution_str, method=method)
    if answer is None:
        return 0.0
    return score if answer == str(ground_truth).strip().replace(",", "") else format_score
