"""mean@N / maj@N / best@N on hand-made generations, merging over ranks, and answer extraction."""

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.rewards.answers import extract_answer  # noqa: E402
from spmd_rl.trainer.eval_metrics import (  # noqa: E402
    PromptGroup,
    SourceTotals,
    accumulate,
    majority_answer,
    merge_totals,
    prompt_metrics,
    validation_metrics,
)


def test_majority_ignores_none_then_earliest_wins_a_tie():
    assert majority_answer(["5", "5", "7", None]) == "5"
    assert majority_answer([None, None, "7"]) == "7"  # None never outvotes a real answer
    assert majority_answer(["7", "5", "5", "7"]) == "7"  # 2-2 tie: 7 was seen first
    assert majority_answer(["3", None, "9"]) == "3"
    assert majority_answer([None, None]) is None


@pytest.mark.parametrize("scores, answers, expected", [
    ([1, 1, 0, 0], ["5", "5", "7", None], (0.5, 1.0, 1.0)),  # majority "5" is right
    ([0, 0, 1, 1], ["4", "4", "9", None], (0.5, 0.0, 1.0)),  # majority "4" is wrong, best still 1
    ([0, 1, 1, 0], ["2", "3", "3", "2"], (0.5, 0.0, 1.0)),  # tie: "2" first, so maj = its score 0
    ([1, 0, 0, 0], [None, None, None, None], (0.25, 0.25, 1.0)),  # all None: they all "agree"
    ([0, 0, 1], [None, None, "8"], (1 / 3, 1.0, 1.0)),  # a single answer beats two Nones
    ([1], ["6"], (1.0, 1.0, 1.0)),  # N = 1: all three are the score
])
def test_prompt_metrics_by_hand(scores, answers, expected):
    assert prompt_metrics(scores, answers) == pytest.approx(expected)


def test_prompt_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="need one answer per score and at least one response, "
                                         "got 2 scores and 1 answers"):
        prompt_metrics([1, 0], ["1"])


# Two sources, 4 responses per prompt. Per prompt (mean, maj, best), lengths summed:
#   a0: (0.5, 1, 1) len 10  a1: (0.5, 0, 1) len 4  a2: (0, 0, 0) len 8
#   b0: (0.75, 1, 1) len 6  b1: (0.25, 0.25, 1) len 12
GROUPS = [
    PromptGroup("a", [1, 1, 0, 0], ["5", "5", "7", None], [1, 2, 3, 4]),
    PromptGroup("b", [1, 1, 1, 0], ["x", "x", "x", "y"], [1, 1, 2, 2]),
    PromptGroup("a", [0, 1, 1, 0], ["2", "3", "3", "2"], [1, 1, 1, 1]),
    PromptGroup("b", [1, 0, 0, 0], [None, None, None, None], [3, 3, 3, 3]),
    PromptGroup("a", [0, 0, 0, 0], ["1", "2", "3", "4"], [2, 2, 2, 2]),
]
EXPECTED = {
    "val-core/a/acc/mean@4": 1 / 3, "val-core/a/acc/maj@4": 1 / 3, "val-core/a/acc/best@4": 2 / 3,
    "val-core/b/acc/mean@4": 0.5, "val-core/b/acc/maj@4": 0.625, "val-core/b/acc/best@4": 1.0,
    "val-core/acc": 2.0 / 5, "val/acc/maj@4": 2.25 / 5, "val/acc/best@4": 4 / 5,
    "val/response_length/mean": 40 / 20,
    "val-core/a/response_length/mean": 22 / 12, "val-core/b/response_length/mean": 18 / 8,
}


def test_metrics_per_source_and_overall_by_hand():
    totals = accumulate(GROUPS)
    assert totals["a"] == SourceTotals(prompts=3, responses=12, mean_sum=1.0, maj_sum=1.0, best_sum=2.0, length_sum=22)
    metrics = validation_metrics(merge_totals([totals]), 4)
    assert metrics == pytest.approx(EXPECTED)
    assert set(metrics) == set(EXPECTED)


def test_merging_ranks_equals_all_at_once():
    # Prompts dealt round-robin to 2 ranks (as validation shards them), and a rank with none.
    rank0, rank1 = accumulate(GROUPS[0::2]), accumulate(GROUPS[1::2])
    merged = validation_metrics(merge_totals([rank0, rank1, accumulate([])]), 4)
    assert merged == pytest.approx(validation_metrics(accumulate(GROUPS), 4), abs=1e-15)
    assert merged == pytest.approx(EXPECTED)
    assert list(merge_totals([rank1, rank0])) == ["a", "b"]  # sources sorted whatever the rank order


def test_n_equal_one_logs_three_equal_numbers():
    groups = [PromptGroup("s", [1.0], ["3"], [2]), PromptGroup("s", [0.0], [None], [4])]
    metrics = validation_metrics(accumulate(groups), 1)
    assert [metrics[f"val-core/s/acc/{m}@1"] for m in ("mean", "maj", "best")] == [0.5, 0.5, 0.5]
    assert metrics["val/response_length/mean"] == 3.0


def test_no_prompt_gives_zeros_not_a_division_error():
    assert validation_metrics({}, 2) == {"val-core/acc": 0.0, "val/acc/maj@2": 0.0, "val/acc/best@2": 0.0,
                                         "val/response_length/mean": 0.0}


@pytest.mark.parametrize("source, response, expected", [
    # gsm8k: the strict "#### n" the reward compares, thousands separators removed
    ("openai/gsm8k", "She pays 3 * 4 = 12 dollars.\n#### 1,234", "1234"),
    ("openai/gsm8k", "The answer is 72", None),  # no "####": no answer (as the strict reward sees it)
    # MATH: last \boxed{}, normalised by strip_string
    ("lighteval/MATH", "so \\boxed{3} or rather \\boxed{\\dfrac12}", "\\frac{1}{2}"),
    ("HuggingFaceH4/MATH-500", "x = \\boxed{0.5}", "\\frac{1}{2}"),
    ("DigitalLearningGmbH/MATH-lighteval", "\\boxed{10^{\\circ}}", "10"),
    ("lighteval/MATH", "I think it is 4", None),
    ("lighteval/MATH", "\\boxed{4", None),  # cut off inside the box
    # addition: the stripped response, end markers removed
    ("synthetic/addition", " 95<|endoftext|>\n", "95"),
    ("synthetic/addition", "<|im_end|>", None),
    # anything else: the stripped text
    ("my/custom", "  Paris \n", "Paris"),
    ("my/custom", "   ", None),
])
def test_extract_answer(source, response, expected):
    assert extract_answer(source, response) == expected
