#!/usr/bin/env bash
# The learning demo, from nothing, on CPU with 2 ranks:
#   1. build a character tokenizer and the addition data set (train / held-out test / SFT),
#   2. SFT a small random-init model so it can start,
#   3. GRPO it, validating accuracy on the held-out test set before, during and after.
# Everything lands in runs/demo/. Takes about 10 minutes on a 2-core laptop.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
OUT=runs/demo
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python -m spmd_rl.data.prepare.addition --out $OUT/data --tokenizer-out $OUT/init \
    --num-train 20000 --num-test 256 --min-digits 1 --max-digits 2 --seed 0
python examples/make_tiny_model.py --tokenizer $OUT/init --out $OUT/init

torchrun --standalone --nproc-per-node "$NPROC" -m spmd_rl.sft --config configs/sft_addition.yaml "$@"
torchrun --standalone --nproc-per-node "$NPROC" -m spmd_rl.train --config configs/grpo_addition.yaml "$@"

python examples/summarize_demo.py $OUT/grpo/metrics.jsonl
