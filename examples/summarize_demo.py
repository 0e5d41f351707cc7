"""Print held-out accuracy before and after RL from a run's metrics.jsonl."""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    val = [(r["step"], r["val-core/acc"]) for r in rows if "val-core/acc" in r]
    if len(val) < 2:
        sys.exit(f"{path} holds fewer than two validations: run with trainer.val_before_train=true")
    print("held-out accuracy (val-core/acc) by step: " + ", ".join(f"{s}: {a:.3f}" for s, a in val))
    print(f"before RL {val[0][1]:.3f} -> after RL {val[-1][1]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
