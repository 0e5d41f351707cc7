"""Data crossing the rollout boundary: what to sample (:class:`SamplingParams`) and what came
back (:class:`Completion`). Every engine (native, HF, later vLLM/SGLang) speaks these types."""

from __future__ import annotations

from dataclasses import dataclass, field

from spmd_rl.errors import UserError

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """How to sample the responses of one ``generate`` call.

    Sampling order is: logits / temperature -> top-k -> top-p -> sample. The logprob reported
    for a token is taken from the temperature-scaled distribution *before* top-k/top-p, which is
    the distribution the trainer recomputes.
    """

    n: int = 1
    """Samples per prompt; the n samples of a prompt are generated on the same rank."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), reported logprobs then use T = 1."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 turns it off."""
    max_new_tokens: int = 256
    """Most tokens generated per response (the stop token counts)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation of a response ends after one of these (EOS ids go here); it is kept in the output."""
    seed: int | None = None
    """Base seed: prompt i uses seed + i when per-prompt seeds are not passed to generate."""

    def __post_init__(self) -> None:
        # These come from the user's config: fail early with one line that names the field.
        if self.n < 1:
            raise UserError(f"sampling n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise UserError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise UserError(f"sampling top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UserError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the distribution whose logprobs are reported (1 for greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class Completion:
    """One sampled response to one prompt."""

    token_ids: list[int]  # [num_generated] response tokens, the stop token included if one ended it
    logprobs: list[float]  # [num_generated] log softmax(logits / T)[token], T = 1 for greedy
    finish_reason: str  # "stop" (a stop token was emitted) | "length" (a token budget ran out)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion has {len(self.token_ids)} tokens but {len(self.logprobs)} logprobs"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
