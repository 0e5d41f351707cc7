"""Built-in rule rewards, chosen by the ``data_source`` column of the dataset (verl's
``default_compute_score``)."""

from __future__ import annotations

from typing import Any, Callable

from spmd_rl.errors import UserError
from spmd_rl.rewards import addition, gsm8k, math

_MATH_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")

# data_source -> scorer(solution_str, ground_truth) -> float
SCORERS: dict[str, Callable[[str, Any], float]] = {
    "openai/gsm8k": gsm8k.compute_score,
    **{source: math.compute_score for source in _MATH_SOURCES},
    "synthetic/addition": addition.compute_score,
}


class UnknownDataSourceError(UserError):
    """No built-in reward for a ``data_source``: a configuration error, never scored as 0."""


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
) -> float | dict[str, Any]:
    """Score one response with the built-in scorer of its ``data_source``.

    Same signature as a custom reward function (``reward.custom_function.path``), so the two
    are interchangeable. ``extra_info`` is unused by the built-in scorers.
    """
    scorer = SCORERS.get(data_source)
    if scorer is None:
        raise UnknownDataSourceError(
            f"no built-in reward for data_source {data_source!r} (known: {', '.join(SCORERS)}); "
            "set reward.custom_function.path to a Python file defining "
            "compute_score(data_source, solution_str, ground_truth, extra_info)"
        )
    return scorer(solution_str, ground_truth)
