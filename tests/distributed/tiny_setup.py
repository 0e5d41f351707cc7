"""A throwaway run folder for distributed tests: addition data, a char tokenizer and a random-init
tiny decoder saved as an HF folder (no SFT: tests that need a trained model build their own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_tiny_setup(root: Path, num_train: int = 64, experts: int = 0) -> Path:
    """Write ``root/data/{train,test}.parquet`` and ``root/model`` (a Qwen3-MoE model with
    ``experts`` experts per layer when > 0); return ``root``."""
    for cmd in (
        [sys.executable, "-m", "spmd_rl.data.prepare.addition", "--out", str(root / "data"), "--num-train",
         str(num_train), "--num-test", "8", "--max-digits", "2", "--tokenizer-out", str(root / "model")],
        [sys.executable, str(REPO / "examples/make_tiny_model.py"), "--tokenizer", str(root / "model"),
         "--out", str(root / "model"), "--hidden-size", "32", "--layers", "2", "--experts", str(experts)],
    ):
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    from spmd_rl.models import ModelArgs, build_model, read_hf_config, save_pretrained

    args = ModelArgs.from_hf_config(read_hf_config(root / "model"))
    save_pretrained(build_model(None, args=args, seed=0), args, root / "model")  # random-init weights
    return root
