"""Reward layer: built-in scorers on real data, custom function loading, batch scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.rewards import (  # noqa: E402
    RewardScorer,
    ScoreResult,
    UnknownDataSourceError,
    compute_score,
    load_custom_reward_function,
)
from spmd_rl.rewards import addition, gsm8k  # noqa: E402
from spmd_rl.rewards import math as math_reward  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def read_jsonl(relative: str) -> list[dict]:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"../shared/{relative} not found: {path}")
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- gsm8k


def gsm8k_truth(answer: str) -> str:
    """The ground truth as the data preparation writes it: text after '#### ', commas removed."""
    return answer.split("#### ")[-1].strip().replace(",", "")


def test_gsm8k_reference_answers_score_one_on_the_test_set():
    rows = read_jsonl("data/gsm8k/test.jsonl")
    assert len(rows) == 1319
    for row in rows:
        answer, truth = row["answer"], gsm8k_truth(row["answer"])
        assert gsm8k.compute_score(answer, truth) == 1.0, answer[-80:]
        wrong = str(int(truth) + 1)
        assert gsm8k.compute_score(answer, wrong) == 0.0
        assert gsm8k.compute_score(answer.replace("####", ""), truth) == 0.0


def test_gsm8k_only_the_last_300_characters_count():
    answer = "#### 42\n" + "x" * 300
    assert gsm8k.extract_solution(answer) is None
    assert gsm8k.compute_score(answer, "42") == 0.0
    tail = "#### 42" + "x" * (300 - len("#### 42"))  # starts exactly 300 chars before the end
    assert gsm8k.compute_score("y" * 1000 + tail, "42") == 1.0


def test_gsm8k_extraction_details():
    # the last "####" wins; thousands separators are removed
    assert gsm8k.extract_solution("#### 5\n#### 1,234") == "1234"
    assert gsm8k.compute_score("so the total is #### 1,234", "1234") == 1.0
    assert gsm8k.compute_score("so the total is #### 1,234", "1,234") == 1.0
    assert gsm8k.compute_score("#### -7", "-7") == 1.0
    # strict needs a number right after "#### ": a dollar sign there is a format failure
    assert gsm8k.extract_solution("#### $1,234") is None
    assert gsm8k.compute_score("#### $1,234", "1234") == 0.0
    # flexible takes the last number anywhere, dollar signs and separators dropped
    assert gsm8k.extract_solution("She earns $1,234 in total.", method="flexible") == "1234"
    assert gsm8k.compute_score("She earns $1,234.", "1234", method="flexible") == 0.0  # "1234." != "1234"
    assert gsm8k.compute_score("She earns $1,234 total", "1234", method="flexible") == 1.0
    # a found-but-wrong answer gets format_score, no answer gets 0
    assert gsm8k.compute_score("#### 5", "6", format_score=0.1) == 0.1
    assert gsm8k.compute_score("no answer", "6", format_score=0.1) == 0.0
    with pytest.raises(ValueError, match="unknown gsm8k extraction method 'loose'"):
        gsm8k.extract_solution("#### 1", method="loose")


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "response,truth,expected",
    [
        ("so \\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\tfrac{3}{4}}", "3/4", 1.0),
        ("\\boxed{10\\text{ units}}", "10", 1.0),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", 1.0),
        ("\\boxed{90^\\circ}", "90", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        ("\\boxed{.5}", "0.5", 1.0),
        ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0),
        ("\\boxed{50\\%}", "50", 1.0),
        ("\\boxed{\\$18}", "18", 1.0),
        ("\\fbox{7}", "7", 1.0),
        ("the answer is \\boxed 7$.", "7", 1.0),
        ("\\boxed{1} then corrected: \\boxed{2}", "2", 1.0),  # the last box counts
        ("\\boxed{1} then corrected: \\boxed{2}", "1", 0.0),
        ("\\boxed{2/4}", "\\frac{1}{2}", 0.0),  # string equivalence, not symbolic
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
        ("no box: 1/2", "\\frac{1}{2}", 0.0),
        ("cut off \\boxed{\\frac{1}{2", "\\frac{1}{2}", 0.0),
        ("\\boxed\\frac12", "\\frac{1}{2}", 0.0),  # malformed box: wrong, not an exception
    ],
)
def test_math_equivalences(response, truth, expected):
    assert math_reward.compute_score(response, truth) == expected


def test_math_helpers():
    assert math_reward.last_boxed_only_string("a \\boxed{\\frac{1}{2}} b") == "\\boxed{\\frac{1}{2}}"
    assert math_reward.remove_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert math_reward.strip_string("\\dfrac12") == "\\frac{1}{2}"
    assert math_reward.is_equiv(None, None) and not math_reward.is_equiv("1", None)


def test_math500_reference_boxes_match_their_answers():
    rows = read_jsonl("data/math500/test.jsonl")
    hits = [math_reward.compute_score(row["solution"], row["answer"]) for row in rows]
    rate = sum(hits) / len(rows)
    print(f"MATH-500 reference solutions scored 1.0: {int(sum(hits))}/{len(rows)} = {rate:.3f}")
    assert rate >= 0.95


# ----------------------------------------------------------------------------- addition


def test_addition_scorer():
    assert addition.compute_score("579", "579") == 1.0
    assert addition.compute_score("  579\n", 579) == 1.0
    assert addition.compute_score("579<|endoftext|>", "579") == 1.0
    assert addition.compute_score("579 <|im_end|><|endoftext|>", "579") == 1.0
    assert addition.compute_score("-12</s>", "-12") == 1.0
    for wrong in ("578", "0579", "579.", "579 580", "the answer is 579", "", "<|endoftext|>"):
        assert addition.compute_score(wrong, "579") == 0.0, wrong


# ----------------------------------------------------------------------------- dispatch


def test_default_compute_score_dispatches_by_data_source():
    assert compute_score("openai/gsm8k", "#### 12", "12") == 1.0
    assert compute_score("openai/gsm8k", "\\boxed{12}", "12") == 0.0
    for source in ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500"):
        assert compute_score(source, "\\boxed{\\frac12}", "\\frac{1}{2}") == 1.0
    assert compute_score("synthetic/addition", "12", "12", extra_info={"a": 5, "b": 7}) == 1.0


def test_unknown_data_source_names_it_and_the_fix():
    with pytest.raises(UnknownDataSourceError) as info:
        compute_score("my/dataset", "x", "y")
    assert isinstance(info.value, UserError)
    assert str(info.value) == (
        "no built-in reward for data_source 'my/dataset' (known: openai/gsm8k, lighteval/MATH, "
        "DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500, synthetic/addition); set "
        "reward.custom_function.path to a Python file defining "
        "compute_score(data_source, solution_str, ground_truth, extra_info)"
    )


# ----------------------------------------------------------------------------- custom


def test_load_custom_reward_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def helper(x):\n    return x\n\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return {'score': float(solution_str == ground_truth), 'length': len(solution_str)}\n\n"
        "def other_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return 0.5\n"
    )
    fn = load_custom_reward_function(str(path))
    assert fn("any", "ab", "ab", None) == {"score": 1.0, "length": 2}
    assert load_custom_reward_function(str(path), name="other_score")("a", "b", "c", None) == 0.5


def test_custom_reward_missing_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(UserError) as info:
        load_custom_reward_function(str(missing))
    assert str(info.value) == (
        f"reward.custom_function.path: file not found: {missing}; give the path of a Python file"
    )


def test_custom_reward_missing_function_lists_callables(tmp_path):
    path = tmp_path / "rewards_lib.py"
    path.write_text("import os\nVALUE = 3\n\ndef score_a(*a):\n    return 1\n\nclass Scorer:\n    pass\n")
    with pytest.raises(UserError) as info:
        load_custom_reward_function(str(path))
    assert str(info.value) == (
        f"reward.custom_function.name: {path} has no function 'compute_score' "
        "(callables found: Scorer, score_a); set reward.custom_function.name to one of them"
    )
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- RewardScorer


def test_reward_scorer_default_and_extras():
    result = RewardScorer().score(
        ["openai/gsm8k", "synthetic/addition", "HuggingFaceH4/MATH-500"],
        ["#### 3", "4", "\\boxed{1}"],
        ["3", "5", "1"],
        [None, None, None],
    )
    assert result == ScoreResult(scores=[1.0, 0.0, 1.0], extras={})

    def fn(data_source, solution_str, ground_truth, extra_info):
        if solution_str == "plain":
            return 0.25
        return {"score": 1.0, "acc": True, "length": len(solution_str), "note": "text is not an extra"}

    result = RewardScorer(fn).score(["d"] * 3, ["abc", "plain", "xy"], ["t"] * 3, None)
    assert result.scores == [1.0, 0.25, 1.0]
    assert result.extras == {"acc": [1.0, 0.0, 1.0], "length": [3.0, 0.0, 2.0]}


def test_reward_scorer_counts_errors_and_prints_the_first_once(capsys):
    def fn(data_source, solution_str, ground_truth, extra_info):
        if solution_str.startswith("bad"):
            raise RuntimeError(f"cannot parse\n{solution_str}")
        if solution_str == "nodict":
            return {"acc": 1.0}
        return 1.0

    scorer = RewardScorer(fn)
    first = scorer.score(["src/a", "src/b", "src/c"], ["ok", "bad1", "bad2"], ["", "", ""], None)
    assert first.scores == [1.0, 0.0, 0.0] and scorer.num_errors == 2
    second = scorer.score(["src/d", "src/e"], ["bad3", "nodict"], ["", ""], None)
    assert second.scores == [0.0, 0.0] and scorer.num_errors == 4  # cumulative; a dict without 'score' counts

    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert lines == [
        "warning: reward function failed on a sample of data_source 'src/b' "
        "(RuntimeError: cannot parse bad1); it scores 0.0, and further failures are only counted"
    ]


def test_reward_scorer_propagates_unknown_data_source(capsys):
    scorer = RewardScorer()
    with pytest.raises(UnknownDataSourceError, match="'my/data'"):
        scorer.score(["openai/gsm8k", "my/data"], ["#### 1", "1"], ["1", "1"], [None, None])
    assert scorer.num_errors == 0
    assert capsys.readouterr().err == ""


def test_reward_scorer_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="lengths differ"):
        RewardScorer().score(["openai/gsm8k"], ["a", "b"], ["1", "2"], None)
