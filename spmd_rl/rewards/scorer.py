"""Apply a reward function to a batch of responses, robust to errors in the function.

A reward function that raises on one odd response must not kill a long run: that sample
scores 0.0 and the error is counted (``num_errors``); the first one is printed so the user
can see what goes wrong. Configuration errors (:class:`~spmd_rl.errors.UserError`, e.g. an
unknown ``data_source``) are not per-sample problems and propagate.
"""

from __future__ import annotations

import math
import numbers
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from spmd_rl.errors import UserError
from spmd_rl.rewards.custom import load_custom_reward_function
from spmd_rl.rewards.default import compute_score


@dataclass
class ScoreResult:
    """Rewards of one batch, aligned with its responses."""

    scores: list[float]  # [N] the reward of each response
    # [N] per extra numeric key a function returned in a dict (e.g. "acc"); 0.0 where a
    # sample did not return the key or its function raised
    extras: dict[str, list[float]] = field(default_factory=dict)


def _split_result(value: Any) -> tuple[float, dict[str, float]]:
    """``float`` -> (score, {}); ``dict`` -> (dict["score"], other numeric entries)."""
    if isinstance(value, dict):
        if "score" not in value:
            raise KeyError(f"reward function returned a dict without a 'score' key: keys {sorted(value)}")
        extras = {
            key: float(v)
            for key, v in value.items()
            if key != "score" and isinstance(v, numbers.Real)
        }
        return float(value["score"]), extras
    return float(value), {}


class RewardTimeout(Exception):
    """A reward function call ran longer than ``reward.timeout_s``."""


@contextmanager
def call_timeout(seconds: float):
    """Raise :class:`RewardTimeout` inside the block after ``seconds`` (0 = no limit).

    Uses SIGALRM, so it interrupts pure-Python work (a regex or sympy call gone wild) but only in
    the main thread on POSIX; elsewhere the block runs without a limit."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"reward function exceeded reward.timeout_s={seconds}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class RewardScorer:
    """Score responses with ``fn(data_source, solution_str, ground_truth, extra_info)``.

    One instance is meant to live for the whole run: ``num_errors`` is cumulative and the
    first error is printed only once.
    """

    def __init__(self, fn: Callable[..., Any] = compute_score, timeout_s: float = 0.0) -> None:
        self.fn = fn
        self.timeout_s = timeout_s  # per call; 0 = none
        self.num_errors = 0  # cumulative over every score() call, timeouts included
        self.num_timeouts = 0
        self._printed_error = False

    def score(
        self,
        data_sources: Sequence[str],
        solutions: Sequence[str],
        ground_truths: Sequence[Any],
        extra_infos: Sequence[dict[str, Any] | None] | None = None,
    ) -> ScoreResult:
        """Score each response; all sequences have one entry per response."""
        n = len(solutions)
        extra_infos = [None] * n if extra_infos is None else extra_infos
        if not (len(data_sources) == len(ground_truths) == len(extra_infos) == n):
            raise ValueError(
                f"score(): lengths differ: {len(data_sources)} data_sources, {n} solutions, "
                f"{len(ground_truths)} ground_truths, {len(extra_infos)} extra_infos"
            )
        scores: list[float] = []
        per_sample_extras: list[dict[str, float]] = []
        for source, solution, truth, info in zip(data_sources, solutions, ground_truths, extra_infos):
            score, extras = self._score_one(source, solution, truth, info)
            scores.append(score)
            per_sample_extras.append(extras)
        keys = sorted({key for extras in per_sample_extras for key in extras})
        return ScoreResult(scores, {key: [e.get(key, 0.0) for e in per_sample_extras] for key in keys})

    def _score_one(self, source: str, solution: str, truth: Any, info: Any) -> tuple[float, dict[str, float]]:
        try:
            with call_timeout(self.timeout_s):
                result = self.fn(data_source=source, solution_str=solution, ground_truth=truth, extra_info=info)
            score, extras = _split_result(result)
            if not math.isfinite(score):
                raise ValueError(f"reward function returned a non-finite score {score}")
            return score, extras
        except UserError:
            raise  # configuration error: fail the run with its one-line message
        except Exception as e:
            if isinstance(e, RewardTimeout):
                self.num_timeouts += 1
            self._record_error(source, e)
            return 0.0, {}

    def _record_error(self, source: str, error: Exception) -> None:
        self.num_errors += 1
        if self._printed_error:
            return
        self._printed_error = True
        message = " ".join(f"{type(error).__name__}: {error}".split())  # force one line
        print(
            f"warning: reward function failed on a sample of data_source {source!r} ({message}); "
            "it scores 0.0, and further failures are only counted",
            file=sys.stderr,
            flush=True,
        )


def build_scorer(reward_cfg) -> RewardScorer:
    """The run's scorer from its ``reward`` section: the custom function when configured, else
    the built-in dispatch by data_source, with the per-call timeout."""
    fn = compute_score
    custom = reward_cfg.custom_function
    if custom.path:
        fn = load_custom_reward_function(custom.path, custom.name)
    return RewardScorer(fn, timeout_s=reward_cfg.timeout_s)
