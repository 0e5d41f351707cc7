#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit in ~10 minutes on one H100/H200:
#
#   bash perf/gpu_suite.sh tests     # CUDA tests: tests/gpu (CUDA graphs, NCCL, megatron on CUDA) + Triton kernels
#   bash perf/gpu_suite.sh kernels   # perf/bench_kernels.py  -> perf/results/bench_kernels_<device>.json
#   bash perf/gpu_suite.sh rollout   # perf/bench_rollout.py (Qwen2.5-0.5B shape, HBM roofline at batch 256)
#   bash perf/gpu_suite.sh train     # perf/bench_train.py MFU for the Qwen2.5-0.5B and 1.5B shapes
#   bash perf/gpu_suite.sh compile   # perf/bench_train.py --compile: compiled vs eager blocks, Qwen2.5-0.5B shape
#   bash perf/gpu_suite.sh all
#
# Runs from a source checkout without installing it (PYTHONPATH), so a machine that has torch,
# triton and transformers but no package index works. megatron-core is pure Python: a copy of
# its `megatron/` package folder under $MEGATRON_PATH (default: this checkout's .venv
# site-packages) enables the megatron GPU tests. Result JSONs are also copied to $RESULTS_DIR
# when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Only the megatron package goes on the path (a whole foreign site-packages could shadow this
# machine's own wheels); a MEGATRON_PATH given but without megatron/ in it is an error, not a skip.
megatron_path="${MEGATRON_PATH:-$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -1)}"
if [[ -n "$megatron_path" && -d "$megatron_path/megatron" ]]; then
    only_megatron="$(mktemp -d)"
    ln -s "$(cd "$megatron_path" && pwd)/megatron" "$only_megatron/megatron"
    export PYTHONPATH="$PYTHONPATH:$only_megatron"
elif [[ -n "${MEGATRON_PATH:-}" ]]; then
    echo "MEGATRON_PATH=$MEGATRON_PATH has no megatron/ package folder" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

status=0
run() {  # run a step, remember a failure, keep going with the other steps
    echo "+ $*"
    "$@" || status=$?
}

if [[ "$stage" == tests || "$stage" == all ]]; then
    run python -m pytest -q -rs tests/gpu tests/unit/test_kernel_logprob.py tests/unit/test_kernel_varlen_attention.py \
        tests/unit/test_kernel_paged_attention.py
fi
if [[ "$stage" == kernels || "$stage" == all ]]; then
    run python perf/bench_kernels.py
fi
if [[ "$stage" == rollout || "$stage" == all ]]; then
    run python perf/bench_rollout.py --model qwen2.5-0.5b
fi
if [[ "$stage" == train || "$stage" == all ]]; then
    run python perf/bench_train.py --model-shape qwen2.5-0.5b
    run python perf/bench_train.py --model-shape qwen2.5-1.5b
fi
if [[ "$stage" == compile || "$stage" == all ]]; then
    run python perf/bench_train.py --model-shape qwen2.5-0.5b --compile
fi
if [[ -n "${RESULTS_DIR:-}" ]]; then
    mkdir -p "$RESULTS_DIR" && cp perf/results/*.json "$RESULTS_DIR"/
fi
exit $status
