#!/usr/bin/env bash
# Launch with torchrun, on one node or, run once on every node, on several.
#
#   bash launch/train.sh --config configs/grpo_addition.yaml key=value ...       # this machine only
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 host> bash launch/train.sh --config configs/x.yaml ...
#
# Every argument goes to `python -m $ENTRY` unchanged. Environment:
#
#   ENTRY           module to run (default spmd_rl.train; spmd_rl.sft, spmd_rl.evaluate).
#   NPROC_PER_NODE  workers on this node (default: the visible GPUs, or 1 without CUDA).
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
#                   setting any of them switches from a standalone run to a c10d rendezvous at
#                   MASTER_ADDR:MASTER_PORT (defaults: 1 node, rank 0, port 29500). MASTER_ADDR is
#                   node 0's host name or IP, the same on every node; it may be left out only
#                   when NNODES=1 (127.0.0.1 then).
#   DRY_RUN=1       print the torchrun command line instead of running it.
set -euo pipefail
: "${DRY_RUN:=0}"

die() { echo "error: $*" >&2; exit 2; }
positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1=$2 is not a positive integer"; }

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))') \
        || die "could not count the GPUs with torch; set NPROC_PER_NODE"
fi
positive_int NPROC_PER_NODE "$NPROC_PER_NODE"

if [[ -z "${NNODES:-}${NODE_RANK:-}${MASTER_ADDR:-}${MASTER_PORT:-}" ]]; then
    # --standalone: a local rendezvous on a free port, so two runs on one machine do not collide.
    torchrun_args=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE")
else
    : "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_PORT:=29500}"
    positive_int NNODES "$NNODES"
    positive_int MASTER_PORT "$MASTER_PORT"
    if [[ ! "$NODE_RANK" =~ ^(0|[1-9][0-9]*)$ ]] || (( NODE_RANK >= NNODES )); then
        die "NODE_RANK=$NODE_RANK is not valid for NNODES=$NNODES (choose from 0 to $((NNODES - 1)))"
    fi
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        (( NNODES == 1 )) || die "NNODES=$NNODES needs MASTER_ADDR: set it to node 0's host name or IP, the same on every node"
        MASTER_ADDR=127.0.0.1
    fi
    torchrun_args=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
                   --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
fi
cmd=("${torchrun_args[@]}" -m "${ENTRY:-spmd_rl.train}" "$@")

if [[ "$DRY_RUN" == 1 ]]; then
    # One line; quote only the words that need it, so the line reads as typed.
    line=""
    for word in "${cmd[@]}"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,%{}@+-]+$ ]]; then line+=" $word"; else line+=" $(printf '%q' "$word")"; fi
    done
    echo "${line# }"
    exit 0
fi
exec "${cmd[@]}"
