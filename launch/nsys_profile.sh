#!/usr/bin/env bash
# Run a training under Nsight Systems, capturing only chosen steps. Same arguments and
# environment as launch/train.sh; on every node:
#
#   NSYS_STEPS=3-5 NSYS_OUT=runs/x/nsys bash launch/nsys_profile.sh --config configs/x.yaml key=value ...
#
# The trainer calls cudaProfilerStart before step 3 and cudaProfilerStop after step 5
# (SPMD_RL_NSYS_STEPS, see spmd_rl/observability/profiler.py); nsys records only in between.
# Phases show up as NVTX ranges named like the timing_s/* metrics (gen, update_actor, ...).
#
#   NSYS_STEPS   steps to capture: N, A-B, or a comma list (default 3-5). With several separate
#                ranges set NSYS_CAPTURE_END=repeat, else nsys stops after the first one.
#   NSYS_OUT     output folder (default runs/nsys); created unless DRY_RUN.
#   NSYS_MODE    rank (default): one report per rank, <NSYS_OUT>/rank<RANK>.nsys-rep, nsys launched
#                by torchrun around each worker; node: one report per node with all its ranks,
#                <NSYS_OUT>/node<NODE_RANK>.nsys-rep, nsys around torchrun.
#   NSYS_TRACE   --trace list (default cuda,nvtx,osrt).
#   NSYS_EXTRA   more nsys options, word-split (e.g. "--cuda-memory-usage=true").
#   DRY_RUN=1    print the command instead of running it.
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, ENTRY: as in launch/train.sh.
#
# Open a report with `nsys-ui <file>.nsys-rep`, or `nsys stats <file>.nsys-rep` for tables.
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${NSYS_STEPS:=3-5}" "${NSYS_OUT:=runs/nsys}" "${NSYS_MODE:=rank}" "${NSYS_TRACE:=cuda,nvtx,osrt}"
: "${NSYS_CAPTURE_END:=stop}" "${NSYS_EXTRA:=}" "${DRY_RUN:=0}"
if [[ "$NSYS_MODE" != rank && "$NSYS_MODE" != node ]]; then
    echo "error: NSYS_MODE=$NSYS_MODE is not valid (choose from: rank, node)" >&2
    exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
# The workers read the steps from the environment torchrun passes on.
export SPMD_RL_NSYS_STEPS="$NSYS_STEPS"

torchrun_args=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
               --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
# shellcheck disable=SC2206  # NSYS_EXTRA is meant to be word-split
nsys_args=(nsys profile --trace="$NSYS_TRACE" --capture-range=cudaProfilerApi
           --capture-range-end="$NSYS_CAPTURE_END" --force-overwrite=true ${NSYS_EXTRA})
entry=(-m "${ENTRY:-spmd_rl.train}" "$@")

if [[ "$NSYS_MODE" == rank ]]; then
    # nsys expands %q{RANK} from each worker's environment, which torchrun sets.
    cmd=("${torchrun_args[@]}" --no-python "${nsys_args[@]}" -o "$NSYS_OUT/rank%q{RANK}" python "${entry[@]}")
else
    cmd=("${nsys_args[@]}" -o "$NSYS_OUT/node$NODE_RANK" "${torchrun_args[@]}" "${entry[@]}")
fi

if [[ "$DRY_RUN" == 1 ]]; then
    # One line; quote only the words that need it, so the line reads as typed.
    line="SPMD_RL_NSYS_STEPS=$SPMD_RL_NSYS_STEPS"
    for word in "${cmd[@]}"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,%{}@+-]+$ ]]; then line+=" $word"; else line+=" $(printf '%q' "$word")"; fi
    done
    echo "$line"
    exit 0
fi
mkdir -p "$NSYS_OUT"
exec "${cmd[@]}"
