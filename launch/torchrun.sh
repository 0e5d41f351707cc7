#!/usr/bin/env bash
# Single- or multi-node launch. On every node:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0 host> bash launch/torchrun.sh --config configs/x.yaml key=value ...
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${NPROC_PER_NODE:=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m "${ENTRY:-spmd_rl.train}" "$@"
