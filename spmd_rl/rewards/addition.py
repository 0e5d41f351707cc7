"""Reward for the synthetic addition task: the response must be exactly the sum.

Used by the from-scratch examples, where a tiny model learns ``a + b =`` by SFT and then RL.
"""

from __future__ import annotations

# End-of-sequence strings a decoded response may still carry when it is detokenised
# without skipping special tokens.
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>")


def strip_response(solution_str: str, end_markers: tuple[str, ...] = END_MARKERS) -> str:
    """Remove surrounding whitespace and trailing end markers (any number, in any order)."""
    text = solution_str.strip()
    stripped = True
    while stripped:
        stripped = False
        for marker in end_markers:
            if marker and text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                stripped = True
    return text


def compute_score(solution_str: str, ground_truth: str | int, end_markers: tuple[str, ...] = END_MARKERS) -> float:
    """1.0 iff the stripped response is exactly the ground-truth integer (e.g. ``"579"``), else 0.0.

    No leniency: ``"0579"``, ``"579."`` or ``"the answer is 579"`` score 0.0, so the reward
    also teaches the output format.
    """
    return 1.0 if strip_response(solution_str, end_markers) == str(ground_truth).strip() else 0.0
