"""Tensor parallelism: our local-shard blocks vs torch's DTensor plan, on 2 ranks.

Both shard the same weights the same way (column-parallel q/k/v/gate/up, row-parallel o/down,
vocab-parallel embedding and lm-head, all DTensors). The baseline applies torch's stock
``ColwiseParallel``/``RowwiseParallel`` plans, so every op of a block dispatches through DTensor
and each column-parallel projection all-reduces its own input gradient; ours
(``spmd_rl/distributed/tensor_parallel.py``) computes on the local shards with two explicit
all-reduces per block forward and two backward. Measured in the same run:

* generation: tokens/s of the native engine (tp=2), the same prompts and seeds for both;
* training: seconds of one packed forward + backward of the policy's response logprobs.

The two must compute the same thing: the benchmark asserts the greedy tokens are equal and the
logprobs agree to 1e-5 before it reports times. Ratios are ours / baseline (higher is better for
tokens/s, lower for seconds).

    python perf/bench_tp.py                       # 2 gloo ranks on CPU, tiny Qwen2 shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def dtensor_plan_tp(decoder, tp_mesh):
    """The baseline: torch's stock DTensor plans on the same modules and placements."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for block in decoder.model.layers:
        parallelize_module(block, tp_mesh, plan)
    parallelize_module(decoder.model.embed_tokens, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    parallelize_module(decoder.lm_head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1)))
    return decoder


def model_args():
    from spmd_rl.models import ModelArgs

    return ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=2048, hidden_size=128,
                     intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                     tie_word_embeddings=False, attention_bias=True)


def measure(impl: str, opts, tp_mesh) -> dict:
    import spmd_rl.distributed.tensor_parallel as tensor_parallel
    from spmd_rl.models import build_model
    from spmd_rl.rollout.native.engine import NativeEngine
    from spmd_rl.rollout.types import SamplingParams
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs

    apply = dtensor_plan_tp if impl == "dtensor_plan" else tensor_parallel.apply_tp
    original = tensor_parallel.apply_tp
    tensor_parallel.apply_tp = apply  # the engine shards its copy through this function
    try:
        engine = NativeEngine(build_model(None, args=model_args(), seed=0), max_num_seqs=64, max_seq_len=128,
                              num_blocks=1024, block_size=16, max_num_batched_tokens=4096, tp_mesh=tp_mesh)
    finally:
        tensor_parallel.apply_tp = original
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 2048, (16,), generator=g).tolist() for _ in range(opts.prompts)]
    greedy = engine.generate(prompts[:4], SamplingParams(n=1, temperature=0.0, max_new_tokens=8))  # also warms up
    sampling = SamplingParams(n=opts.n, temperature=1.0, max_new_tokens=opts.new_tokens, seed=3)
    gen_s = min(_timed(lambda: engine.generate(prompts, sampling)) for _ in range(opts.repeats))
    tokens = opts.prompts * opts.n * opts.new_tokens

    policy = PolicyModel(apply(build_model(None, args=model_args(), seed=0), tp_mesh))
    lengths = torch.randint(opts.min_len, opts.max_len + 1, (opts.sequences,), generator=g).tolist()
    responses = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in lengths]
    inputs = build_scoring_inputs([p[:8] for p in prompts[: opts.sequences]], responses, "cpu")

    def train_step():
        logprobs, _ = policy(inputs)
        logprobs.sum().backward()
        return logprobs

    logprobs = train_step().detach()
    train_s = min(_timed(train_step) for _ in range(opts.repeats))
    return {"greedy": [c[0].token_ids for c in greedy], "logprobs": logprobs, "generate_s": gen_s,
            "generate_tok_s": tokens / gen_s, "train_step_s": train_s, "train_tokens": sum(lengths) + 8 * len(lengths)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _worker(rank: int, port: int, opts, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts.threads)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    results = {impl: measure(impl, opts, mesh) for impl in ("dtensor_plan", "local_shards")}
    base, ours = results["dtensor_plan"], results["local_shards"]
    if base["greedy"] != ours["greedy"]:
        raise AssertionError("the two tensor-parallel forms generate different greedy tokens")
    torch.testing.assert_close(ours["logprobs"], base["logprobs"], rtol=1e-5, atol=1e-5)
    if rank == 0:
        rows = {impl: {k: v for k, v in r.items() if k not in ("greedy", "logprobs")} for impl, r in results.items()}
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=16, help="sequences in the training step")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--out", type=Path, default=RESULTS / "tp_cpu.json")
    opts = parser.parse_args()

    from spmd_rl.distributed.init import free_port

    scratch = opts.out.with_suffix(".partial")
    mp.spawn(_worker, args=(free_port(), opts, str(scratch)), nprocs=2, join=True)
    rows = json.loads(scratch.read_text())
    scratch.unlink()
    base, ours = rows["dtensor_plan"], rows["local_shards"]
    ratios = {"generate_tok_s": ours["generate_tok_s"] / base["generate_tok_s"],
              "train_step_speedup": base["train_step_s"] / ours["train_step_s"]}
    print(f"{'tp=2 (gloo, CPU)':<18} {'generate tok/s':>15} {'train step s':>13}")
    for impl, r in rows.items():
        print(f"{impl:<18} {r['generate_tok_s']:>15.0f} {r['train_step_s']:>13.4f}")
    print(f"{'ours / baseline':<18} {ratios['generate_tok_s']:>14.2f}x {ratios['train_step_speedup']:>12.2f}x")
    result = {"device": f"CPU ({platform.machine()}), 2 gloo ranks x {opts.threads} thread(s)",
              "torch": torch.__version__, "config": {k: str(v) for k, v in vars(opts).items()},
              "results": rows, "ratios": ratios}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
