"""Data crossing the rollout boundary: what to sample (:class:`SamplingParams`) and what came
back (:class:`Completion`). Every engine (native, HF, vLLM, SGLang) speaks these types."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from spmd_rl.errors import UserError

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """How to sample the responses of one ``generate`` call.

    The sampled distribution is built in vLLM's order (see
    :func:`spmd_rl.rollout.sampling.process_logits`): penalties (repetition, frequency, presence)
    -> logits / temperature -> top-k -> top-p -> min-p -> sample. Three logprobs can be reported
    for each sampled token (see :class:`Completion`): the trainer-side one (temperature only, what
    the trainer recomputes), the one of the processed distribution the token was actually drawn
    from, and optionally the raw T = 1 one. Every default is "off", so a default instance samples
    from ``softmax(logits / T)``.
    """

    n: int = 1
    """Samples per prompt; the n samples of a prompt are generated on the same rank."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), reported logprobs then use T = 1."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 turns it off."""
    min_p: float = 0.0
    """Keep tokens whose probability is at least min_p x the top token's (arXiv:2407.01082); 0 = off."""
    repetition_penalty: float = 1.0
    """Tokens seen in prompt or output get logit / p if the logit is > 0, else logit x p
    (CTRL, arXiv:1909.05858, as HF and vLLM apply it); 1 = off, > 1 discourages repeats."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output (OpenAI/vLLM); 0 = off."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output (OpenAI/vLLM); 0 = off."""
    max_new_tokens: int = 256
    """Most tokens generated per response (the stop token counts)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation of a response ends after one of these (EOS ids go here); it is kept in the output."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a response ends at the first token whose decoded text completes one. The
    tokens are kept up to and including that token (see :class:`spmd_rl.rollout.stop.StopChecker`)."""
    seed: int | None = None
    """Base seed: prompt i uses seed + i when per-prompt seeds are not passed to generate."""
    return_raw_logprobs: bool = False
    """Also report each token's logprob under the raw T = 1 distribution (no penalties, no truncation)."""

    def __post_init__(self) -> None:
        # These come from the user's config: fail early with one line that names the field.
        for name in ("n", "top_k", "max_new_tokens"):
            value = getattr(self, name)
            try:  # ints of any kind (numpy's too), never floats or bools
                if isinstance(value, bool):
                    raise TypeError
                setattr(self, name, operator.index(value))
            except TypeError:
                raise UserError(f"sampling {name} must be an integer, got {value!r}") from None
        if self.n < 1:
            raise UserError(f"sampling n must be >= 1, got {self.n}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN compares False
            raise UserError(f"sampling temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise UserError(f"sampling top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"sampling min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise UserError(f"sampling repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        # The OpenAI API's range, which vLLM enforces too.
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise UserError(f"sampling {name} must be in [-2, 2] (0 = off), got {value}")
        if self.max_new_tokens < 1:
            raise UserError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if isinstance(self.stop, str):  # a single stop string, as the OpenAI API accepts
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"sampling stop must be a list of non-empty strings, got {list(self.stop)!r}")
        self.stop = list(self.stop)
        if not isinstance(self.return_raw_logprobs, bool):
            raise UserError(f"sampling return_raw_logprobs must be true or false, got {self.return_raw_logprobs!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the distribution whose logprobs are reported (1 for greedy)."""
        return 1.0 if self.greedy else float(self.temperature)

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition / presence / frequency penalties is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Completion:
    """One sampled response to one prompt.

    Three logprobs of each sampled token, all ``[num_generated]``:

    * ``logprobs``: ``log_softmax(logits / T)[token]`` (T = 1 for greedy), before penalties and
      top-k/top-p/min-p. This is the distribution the trainer recomputes, so the rollout/trainer
      logprob difference measures only the numerics of the two forward passes.
    * ``sampled_logprobs``: the log-probability under the distribution the token was actually
      drawn from: penalties, temperature (1 for greedy), top-k, top-p and min-p applied and the
      survivors renormalised. Equal to ``logprobs`` when every option is off. None when the
      engine does not report it.
    * ``raw_logprobs``: ``log_softmax(logits)[token]`` at T = 1 with nothing applied; only when
      ``SamplingParams.return_raw_logprobs`` (None otherwise).
    """

    token_ids: list[int]  # [num_generated] response tokens, the stop token included if one ended it
    logprobs: list[float]  # [num_generated] log softmax(logits / T)[token], T = 1 for greedy
    finish_reason: str  # "stop" (a stop token or stop string) | "length" (a token budget ran out)
    sampled_logprobs: list[float] | None = None  # [num_generated] under the processed distribution
    raw_logprobs: list[float] | None = None  # [num_generated] log softmax(logits)[token], T = 1
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (vLLM's field)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion has {len(self.token_ids)} tokens but {len(self.logprobs)} logprobs"
            )
        for name in ("sampled_logprobs", "raw_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.token_ids):
                raise ValueError(f"Completion has {len(self.token_ids)} tokens but {len(values)} {name}")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
