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
    # its dist-info too: the backend checks the installed version through importlib.metadata
    for info in "$megatron_path"/megatron_core-*.dist-info; do
        [[ -d "$info" ]] && ln -s "$(cd "$info" && pwd)" "$only_megatron/$(basename "$info")"
    done
    export PYTHONPATH="$PYTHONPATH:$only_megatron"
elif [[ -n "${MEGATRON_PATH:-}" ]]; then
    echo "MEGATRON_PATH=$MEGATRON_PATH has no megatron/ package folder" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
# Pre-flight, seconds: the source tree imports (kernels/ as spmd_rl.kernels) and Triton can build and
# launch a kernel here (it compiles a launcher with the machine's C compiler). Without either,
# every stage would fail; stop before spending GPU time.
python - <<'PY' || { echo "pre-flight failed: fix the above before running a stage" >&2; exit 2; }
import torch, triton, triton.language as tl
import spmd_rl.kernels.logprob, spmd_rl.rollout.native.engine  # noqa: F401

@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

x = torch.zeros(100, device="cuda")
_add_one[(1,)](x, 100, BLOCK=128)
assert x.sum().item() == 100, "a trivial Triton kernel gave a wrong result"
print("pre-flight ok:", torch.cuda.get_device_name())
PY

status=0
run() {  # run a step, remember a failure, keep going with the other steps
    echo "+ $*"
    "$@" || status=$?
}

if [[ "$stage" == tests || "$stage" == all ]]; then
    # The kernel unit files' other tests feed CPU tensors to the interpreter (TRITON_INTERPRET is
    # only set without a GPU): on the GPU only their `gpu`-marked tests apply.
    run python -m pytest -q -rs tests/gpu
    run python -m pytest -q -rs -m gpu tests/unit/test_kernel_logprob.py tests/unit/test_kernel_varlen_attention.py \
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
