"""MATH rule reward: the Hendrycks et al. 2021 (arXiv:2103.03874) answer check, as verl's
``math_reward``.

The answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) of the response; it is
equivalent to the ground truth when both normalise (``strip_string``) to the same string.
This is string equivalence, not symbolic: ``\\frac12``, ``\\dfrac{1}{2}``, ``1/2`` and ``0.5``
all match ``\\frac{1}{2}``, but ``2/4`` does not.
"""

from __future__ import annotations

import re


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}``/``\\fbox{...}`` of ``text`` with balanced braces, or None.

    Also accepts the brace-less form ``\\boxed 5`` (up to the next ``$``).
    """
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    if text.startswith("\\boxed ", idx):
        return "\\boxed " + text[idx + len("\\boxed ") :].split("$")[0]
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx : i + 1]
    return None  # unbalanced: the response was cut off inside the box


def remove_boxed(boxed: str) -> str:
    """``\\boxed{x}`` -> ``x`` (also ``\\fbox{x}`` and ``\\boxed x``)."""
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    for prefix in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(prefix) and boxed.endswith("}"):
            return boxed[len(prefix) : -1]
    raise ValueError(f"not a boxed expression: {boxed[:40]!r}")


def _fix_fracs(s: str) -> str:
    """Add braces to shorthand fractions: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{b}`` -> ``\\frac{1}{b}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            # already braced, or too short to be a shorthand fraction: keep as written
            out += part
            continue
        num, rest = part[0], part[1:]
        if rest.startswith("{"):
            out += "{" + num + "}" + rest
        else:
            out += "{" + num + "}{" + rest[0] + "}" + rest[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are plain integers."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    # only canonical integers ("3/4", not "03/4" or "3.0/4") are rewritten
    return f"\\frac{{{num}}}{{{den}}}" if s == f"{num}/{den}" else s


def _remove_right_units(s: str) -> str:
    """Drop a trailing ``\\text{ units}`` (note the space: ``\\text{cm}`` alone is kept)."""
    parts = s.split("\\text{ ")
    return parts[0] if len(parts) == 2 else s


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (only the single following character, as Hendrycks)."""
    return re.sub(r"\\sqrt([^{])", r"\\sqrt{\1}", s)


# plain substring rewrites, applied in this order before the structural fixes
_REPLACEMENTS = (
    ("\n", ""),
    ("\\!", ""),  # thin negative space
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),  # degrees
    ("^\\circ", ""),
    ("\\$", ""),  # currency
)


def strip_string(s: str) -> str:
    """Normalise a LaTeX answer so that equivalent spellings compare equal."""
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _remove_right_units(s)
    s = s.replace("\\%", "")  # escaped percent only: a bare "%" is kept, as in the reference
    # leading-zero for decimals: " .5" -> " 0.5", "{.5" -> "{0.5", ".5" -> "0.5"
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # "x = 5" -> "5" when the left side is a short variable name
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(answer: str | None, ground_truth: str | None) -> bool:
    """True when both strings normalise to the same answer (both None also counts as equal)."""
    if answer is None or ground_truth is None:
        return answer is None and ground_truth is None
    return strip_string(answer) == strip_string(ground_truth)


def compute_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the last boxed answer of ``solution_str`` is equivalent to ``ground_truth``, else 0.0."""
    boxed = last_boxed_only_string(solution_str)
    if boxed is None:
        return 0.0
    try:
        answer = remove_boxed(boxed)
    except ValueError:  # e.g. "\\boxed\\frac12": a malformed box is a wrong answer, not an error
        return 0.0
    return 1.0 if is_equiv(answer, str(ground_truth)) else 0.0
