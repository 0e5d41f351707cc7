"""Synthetic integer addition, the task of the learning demo.

    python -m spmd_rl.data.prepare.addition --out data/addition [--num-train 20000] [--num-test 500]
        [--min-digits 1] [--max-digits 3] [--seed 0] [--tokenizer-out DIR]

Writes ``train.parquet`` and ``test.parquet`` in verl's schema (prompt ``"123+45="``, ground truth
``"168"``) with no test pair in train, plus ``sft_train.parquet`` (columns ``prompt`` and
``response``) from the train rows. A model small enough to train from scratch on CPU learns it
by SFT and then improves by RL, which is what the demo shows.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from spmd_rl.data.parquet_io import write_rows
from spmd_rl.data.tokenizer import build_char_tokenizer
from spmd_rl.errors import UserError, exit_on_user_error

DATA_SOURCE = "synthetic/addition"


def _operand_range(min_digits: int, max_digits: int) -> tuple[int, int]:
    """Inclusive range of integers with ``min_digits``..``max_digits`` digits (0 counts as 1 digit)."""
    if not 1 <= min_digits <= max_digits:
        raise UserError(f"need 1 <= --min-digits ({min_digits}) <= --max-digits ({max_digits})")
    return (0 if min_digits == 1 else 10 ** (min_digits - 1)), 10**max_digits - 1


def _randint(rng, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from a ``random.Random`` or a ``numpy.random.Generator``."""
    if hasattr(rng, "integers"):
        return int(rng.integers(lo, hi + 1))
    return rng.randint(lo, hi)


def _sample_pair(rng, min_digits: int, max_digits: int) -> tuple[int, int]:
    """Operands whose digit counts are each uniform in [min_digits, max_digits].

    Drawing the digit count first keeps short operands common; drawing the number uniformly
    would make almost every operand ``max_digits`` long.
    """
    pair = []
    for _ in range(2):
        digits = _randint(rng, min_digits, max_digits)
        lo, hi = _operand_range(digits, digits)
        pair.append(_randint(rng, lo, hi))
    return pair[0], pair[1]


def make_addition_row(a: int, b: int, split: str, index: int) -> dict:
    """One verl-schema row for ``a + b``."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{a}+{b}="}],
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": str(a + b)},
        "extra_info": {"split": split, "index": index, "a": a, "b": b},
    }


def make_addition_rows(
    n: int,
    min_digits: int,
    max_digits: int,
    rng,
    *,
    split: str = "train",
    exclude: set[tuple[int, int]] | None = None,
    unique: bool = False,
) -> list[dict]:
    """``n`` verl-schema addition rows with operands of ``min_digits``..``max_digits`` digits.

    ``rng`` is a ``random.Random`` (or numpy Generator). Pairs in ``exclude`` are never drawn;
    with ``unique=True`` no pair repeats. Raises a UserError when the pair space is too small.
    """
    lo, hi = _operand_range(min_digits, max_digits)
    available = (hi - lo + 1) ** 2 - len(exclude or ())
    if available <= 0 or (unique and n > available):
        raise UserError(
            f"only {max(available, 0)} distinct {min_digits}..{max_digits}-digit pairs are left for {n} {split} rows: "
            "raise --max-digits or lower --num-train/--num-test"
        )
    taken = set(exclude or ())
    rows = []
    while len(rows) < n:
        a, b = _sample_pair(rng, min_digits, max_digits)
        if (a, b) in taken:
            continue
        if unique:
            taken.add((a, b))
        rows.append(make_addition_row(a, b, split, len(rows)))
    return rows


def sft_rows(rows: list[dict]) -> list[dict]:
    """SFT pairs (``prompt`` messages, ``response`` answer string) from verl-schema rows."""
    return [{"prompt": r["prompt"], "response": r["reward_model"]["ground_truth"]} for r in rows]


def prepare_addition(
    out: str | Path, *, num_train: int, num_test: int, min_digits: int, max_digits: int, seed: int
) -> dict[str, int]:
    """Write the three parquet files under ``out``; return rows per file stem."""
    rng = random.Random(seed)
    # Test first and distinct, so accuracy is over distinct problems; train then avoids them.
    test = make_addition_rows(num_test, min_digits, max_digits, rng, split="test", unique=True)
    held_out = {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in test}
    train = make_addition_rows(num_train, min_digits, max_digits, rng, split="train", exclude=held_out)
    out = Path(out)
    write_rows(train, out / "train.parquet")
    write_rows(test, out / "test.parquet")
    write_rows(sft_rows(train), out / "sft_train.parquet")
    return {"train": len(train), "test": len(test), "sft_train": len(train)}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/addition", help="output folder")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--min-digits", type=int, default=1)
    parser.add_argument("--max-digits", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-out", default=None, help="also save the char-level tokenizer here")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_test < 1:
        raise UserError(f"--num-train ({args.num_train}) and --num-test ({args.num_test}) must be at least 1")
    counts = prepare_addition(
        args.out,
        num_train=args.num_train,
        num_test=args.num_test,
        min_digits=args.min_digits,
        max_digits=args.max_digits,
        seed=args.seed,
    )
    for stem, n in counts.items():
        print(f"wrote {n} rows to {Path(args.out) / f'{stem}.parquet'}")
    if args.tokenizer_out:
        tokenizer = build_char_tokenizer(args.tokenizer_out)
        print(f"wrote a {len(tokenizer)}-token char tokenizer to {args.tokenizer_out}")


if __name__ == "__main__":
    main()
