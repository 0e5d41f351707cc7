"""Stop strings: end a response when its decoded text contains one of the user's strings.

Semantics (vLLM's, adapted to keep tokens and logprobs aligned): a response ends at the first
token whose decoded text completes a stop string, and the response keeps every token up to and
including that one, i.e. the shortest token prefix whose decoded text contains the stop string.
vLLM cuts the stop string out of its output *text* but keeps the same token ids; our responses are
token ids (rewards decode them), so the decoded response still ends with the stop string, plus
whatever characters the completing token carries after it. :meth:`StopMatch.text_before` gives
vLLM's text. A token never gets split, so ``token_ids``, ``logprobs`` and the trainer's view of the
response stay one to one.

Only the response is searched (a stop string that starts in the prompt does not count), decoded
with ``skip_special_tokens`` like vLLM's detokenizer: stop *tokens* such as EOS belong in
``SamplingParams.stop_token_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A UTF-8 character is at most 4 bytes, and every non-special byte-level token decodes to at
# least one byte, so 4 tokens per character bound the tokens that can spell a stop string.
_TOKENS_PER_CHAR = 4
# Slack at the window's start, where decoding from mid-sequence can garble a partial character
# or drop a SentencePiece leading space.
_WINDOW_SLACK = 4


@dataclass(frozen=True)
class StopMatch:
    """Where a response stops because of a stop string."""

    num_tokens: int  # keep token_ids[:num_tokens]: the shortest prefix whose text contains `stop`
    stop: str  # the stop string that ended the response

    def text_before(self, text: str) -> str:
        """vLLM's output text: the decoded (kept) response cut just before the stop string."""
        cut = text.find(self.stop)
        return text if cut < 0 else text[:cut]


class StopChecker:
    """Finds the first stop string in a response's decoded text.

    Use :meth:`check` inside a decode loop, after every step: it decodes only a tail window of
    the response (the new tokens plus enough earlier tokens to spell the longest stop string),
    so a step costs O(longest stop string), not O(response length). Use :meth:`find` on a finished
    response (one full decode plus a binary search).

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (an HF tokenizer).
        stop_strings: the strings; empty means "never stop on text".
        skip_special_tokens: decode as vLLM does (special tokens contribute no text).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], *, skip_special_tokens: bool = True) -> None:
        stop_strings = list(stop_strings)
        if not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.skip_special_tokens = skip_special_tokens
        longest = max((len(s) for s in stop_strings), default=0)
        # Tokens of context decoded before the new ones: enough to spell all but the last char.
        self.context_tokens = _TOKENS_PER_CHAR * longest + _WINDOW_SLACK
        # Special tokens decode to no text: the window does not count them, or a run of them
        # between a stop string's characters would push its start out of the window.
        self.textless_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) if skip_special_tokens else ())

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def check(self, token_ids: Sequence[int], num_new: int = 1) -> StopMatch | None:
        """Did the last ``num_new`` tokens of ``token_ids`` (the response so far) complete a stop
        string? Returns where to cut, or None.

        Assumes earlier calls covered the earlier tokens (call it after every step): only text
        that a stop string ending in the new tokens could use is decoded. ``num_tokens`` of the
        match counts from the start of ``token_ids``.
        """
        if not self.stop_strings or not token_ids:
            return None
        ids = list(token_ids)
        start = self._window_start(ids, len(ids) - num_new)
        if self._first_stop(self._decode(ids[start:])) is None:
            return None
        return self._shortest_prefix(ids, start)

    def _window_start(self, ids: list[int], first_new: int) -> int:
        """Where the decoded window starts: ``context_tokens`` text-bearing tokens before
        ``first_new`` (fewer at the start of the response)."""
        start, counted = max(0, first_new), 0
        while start > 0 and counted < self.context_tokens:
            start -= 1
            counted += ids[start] not in self.textless_ids
        return start

    def find(self, token_ids: Sequence[int]) -> StopMatch | None:
        """The first stop string anywhere in a whole response, or None."""
        ids = list(token_ids)
        if not self.stop_strings or not ids or self._first_stop(self._decode(ids)) is None:
            return None
        return self._shortest_prefix(ids, 0)

    def _shortest_prefix(self, ids: list[int], start: int) -> StopMatch:
        """Smallest ``k`` such that the text of ``ids[start:k]`` contains a stop string (the
        whole of ``ids[start:]`` does). A longer prefix's text extends a shorter one's, so the
        test is monotone in ``k`` and a binary search finds it with O(log n) decodes."""
        lo, hi = start + 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._first_stop(self._decode(ids[start:mid])) is None:
                lo = mid + 1
            else:
                hi = mid
        stop = self._first_stop(self._decode(ids[start:lo]))
        assert stop is not None  # ids[start:len(ids)] contains one
        return StopMatch(lo, stop)

    def _first_stop(self, text: str) -> str | None:
        """The stop string that starts earliest in ``text`` (the list order breaks ties), or None.
        Earliest start = the shortest vLLM output text when two complete on the same token."""
        best, best_at = None, len(text)
        for stop in self.stop_strings:
            at = text.find(stop)
            if at != -1 and at < best_at:
                best, best_at = stop, at
        return best

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
