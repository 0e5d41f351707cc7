"""Convert GSM8K jsonl files to verl-schema parquet.

    python -m spmd_rl.data.prepare.gsm8k --src ../shared/data/gsm8k --out data/gsm8k

Reads ``{train,test}.jsonl`` (``{question, answer}`` per line) and writes ``train.parquet`` and
``test.parquet`` with the same rows as verl's ``examples/data_preprocess/gsm8k.py``, so either
tool's output trains the same way.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from spmd_rl.data.parquet_io import write_rows
from spmd_rl.errors import UserError, exit_on_user_error

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
# GSM8K answers end with "#### <number>"; the number may be negative, decimal or use commas.
_FINAL_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_solution(answer: str) -> str | None:
    """The number after ``####`` with thousands separators removed, or None if there is none."""
    match = _FINAL_ANSWER.search(answer)
    return match.group(1).replace(",", "") if match else None


def make_gsm8k_row(example: dict, split: str, index: int) -> dict:
    """One verl-schema row from a GSM8K ``{question, answer}`` record."""
    question, answer = example["question"], example["answer"]
    solution = extract_solution(answer)
    if solution is None:
        raise UserError(f"GSM8K {split} record {index} has no '#### <number>' final answer: check the source file")
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": question + " " + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": solution},
        "extra_info": {"split": split, "index": index, "answer": answer, "question": question},
    }


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file, skipping blank lines."""
    if not path.is_file():
        raise UserError(f"{path} not found: --src must be a folder holding train.jsonl and test.jsonl")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_gsm8k(src: str | Path, out: str | Path) -> dict[str, int]:
    """Write ``out/{train,test}.parquet`` from ``src/{train,test}.jsonl``; return rows per split."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"--src {src} does not exist: point it at the folder holding GSM8K's train.jsonl and test.jsonl")
    counts = {}
    for split in ("train", "test"):
        records = read_jsonl(src / f"{split}.jsonl")
        rows = [make_gsm8k_row(r, split, i) for i, r in enumerate(records)]
        write_rows(rows, out / f"{split}.parquet")
        counts[split] = len(rows)
    return counts


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--out", default="data/gsm8k", help="output folder for train/test.parquet")
    args = parser.parse_args(argv)
    for split, n in prepare_gsm8k(args.src, args.out).items():
        print(f"wrote {n} {split} rows to {Path(args.out) / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
