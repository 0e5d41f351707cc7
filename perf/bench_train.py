"""Training throughput of one actor update: padding-free (packed) vs right-padded micro-batches.

One "update" is what :func:`spmd_rl.trainer.actor.update_policy` does per mini-batch minus the
optimizer step: for every micro-batch, the policy's forward (logprobs and entropy of the
response tokens, through :func:`~spmd_rl.trainer.actor.forward_logprobs`) and the backward of a
token-mean loss. Both modes see the same sequences in the same micro-batches of
``--micro-batch-size`` rows; packed puts each micro-batch in one row with varlen attention
(``actor.use_remove_padding=true``), padded right-pads it to its longest sequence
(``use_remove_padding=false``). ``--max-tokens N`` adds a third row: packed micro-batches formed
by a token budget (``actor.max_tokens_per_micro_batch``). ``--compile`` adds both layouts again
with ``torch.compile``d decoder blocks (``model.compile=true``, a copy of the same weights); the
warmup update compiles them, including the dynamic-shape recompile of the second shape.

Throughput counts real tokens only (prompt + response, no padding): tokens/s = tokens / median
seconds per update. The packed/padded ratio is the number to compare across machines. With a
known GPU peak (or ``SPMD_RL_PEAK_TFLOPS``) MFU is reported too, from the model FLOPs of
:mod:`spmd_rl.observability.flops` (useful work only: padding does not count).

Response lengths are uniform in ``--min-response..--max-response`` (32..1024), prompts
``--prompt-length`` tokens, all divided by ``--scale`` (default 4 on CPU so that the default run
takes well under two minutes on two cores, 1 on GPU).

    python perf/bench_train.py                                    # CPU: tiny model, lengths / 4
    python perf/bench_train.py --device cuda --model-shape qwen2.5-0.5b --batch 64
    python perf/bench_train.py --device cuda --model-shape qwen2.5-0.5b --batch 64 --compile
    python perf/bench_train.py --model-shape qwen2.5-1.5b --num-layers 1 --batch 4 --scale 16   # CPU check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from spmd_rl.distributed.compile import wrap_decoder_blocks
from spmd_rl.kernels.backend import resolve_kernel_backend
from spmd_rl.models import ModelArgs, build_model
from spmd_rl.observability.flops import mfu, peak_flops, training_flops
from spmd_rl.rollout.types import Completion
from spmd_rl.trainer.actor import forward_logprobs
from spmd_rl.trainer.batch import RolloutBatch, build_rollout_batch
from spmd_rl.trainer.minibatch import micro_batches, sequence_lengths
from spmd_rl.trainer.policy import PolicyModel

RESULTS = Path(__file__).resolve().parent / "results"

# Shapes of the public Qwen2.5 configs (config.json of Qwen/Qwen2.5-0.5B and -1.5B), random weights.
MODEL_SHAPES = {
    "tiny": ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=512, hidden_size=128,
                      intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32),
    "qwen2.5-0.5b": ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=151936,
                              hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                              head_dim=64, rope_theta=1000000.0, max_position_embeddings=32768,
                              tie_word_embeddings=True, attention_bias=True),
    "qwen2.5-1.5b": ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=151936,
                              hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                              head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
                              tie_word_embeddings=True, attention_bias=True),
}


def make_batch(num_seqs: int, prompt_length: int, min_response: int, max_response: int, vocab: int,
               seed: int) -> RolloutBatch:
    """``num_seqs`` random prompts of ``prompt_length`` tokens with responses of uniform length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_response, max_response + 1, (num_seqs,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (prompt_length,), generator=g).tolist() for _ in range(num_seqs)]
    completions = [[Completion(torch.randint(0, vocab, (n,), generator=g).tolist(), [0.0] * n, "length")]
                   for n in lengths]
    return build_rollout_batch(prompts, completions)


def update_once(policy: PolicyModel, split: list[RolloutBatch], packed: bool, device: torch.device) -> None:
    """Forward + backward of every micro-batch (gradients accumulate, as in the trainer)."""
    tokens = sum(float(micro.response_mask.sum()) for micro in split)
    for micro in split:
        logprobs, entropy = forward_logprobs(policy, micro, 1.0, device, with_entropy=True, packed=packed)
        mask = micro.response_mask.to(device)
        loss = -((logprobs + 0.01 * entropy) * mask).sum() / tokens  # token-mean over the whole batch
        loss.backward()


def time_updates(modes: dict[str, tuple[PolicyModel, list[RolloutBatch], bool]], device: torch.device,
                 repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` updates of every mode after ``warmup`` untimed ones. The modes take
    turns within each repeat, so a slow spell of a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(warmup + repeats):
        for name, (policy, split, packed) in modes.items():
            policy.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            update_once(policy, split, packed, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def padded_tokens(split: list[RolloutBatch]) -> int:
    """Tokens the padded layout computes: rows x longest sequence, per micro-batch."""
    return sum(len(m) * max(sequence_lengths(m)) for m in split)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="tiny",
                   help="random model of this shape (qwen2.5-* for GPU MFU)")
    p.add_argument("--num-layers", type=int, default=0, help="override the shape's layer count (0 = keep)")
    p.add_argument("--batch", type=int, default=32, help="sequences per update")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--max-tokens", type=int, default=0, help="also time packed token-budget micro-batches (0 = skip)")
    p.add_argument("--compile", action="store_true", help="also time both layouts with torch.compile'd blocks")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--min-response", type=int, default=32)
    p.add_argument("--max-response", type=int, default=1024)
    p.add_argument("--scale", type=int, default=0, help="divide all lengths by this (0 = 4 on CPU, 1 on GPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default perf/results/bench_train_<device>[_<shape>][_compiled].json)")
    args = p.parse_args(argv)
    problems = [f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
                for name in ("batch", "micro_batch_size", "prompt_length", "min_response", "repeats")
                if getattr(args, name) <= 0]
    if args.max_response < args.min_response:
        problems.append(f"--max-response {args.max_response} must be >= --min-response {args.min_response}")
    if args.scale < 0 or args.num_layers < 0 or args.max_tokens < 0 or args.warmup < 0:
        problems.append("--scale, --num-layers, --max-tokens and --warmup must be >= 0")
    if args.compile and args.warmup < 1:
        problems.append("--compile needs --warmup >= 1: the untimed warmup update is where the blocks compile")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu")
    scale = args.scale or (4 if device.type == "cpu" else 1)
    shape = MODEL_SHAPES[args.model_shape]
    if args.num_layers:
        shape = shape.replace(num_layers=args.num_layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernels = resolve_kernel_backend("auto", device)
    decoder = build_model(None, args=shape, device=device, dtype=dtype, seed=args.seed)
    decoder.set_kernels(kernels)
    policy = PolicyModel(decoder, kernels)

    prompt_len = max(1, args.prompt_length // scale)
    lo, hi = max(1, args.min_response // scale), max(1, args.max_response // scale)
    batch = make_batch(args.batch, prompt_len, lo, hi, shape.vocab_size, args.seed)
    lengths = sequence_lengths(batch)
    tokens = sum(lengths)
    flops = training_flops(shape, lengths, lm_head_tokens=sum(len(r) for r in batch.response_ids))
    fixed = [micro for _, micro in micro_batches(batch, args.micro_batch_size)]
    modes = {"packed": (policy, fixed, True), "padded": (policy, fixed, False)}
    if args.max_tokens:
        budget = [m for _, m in micro_batches(batch, 1, max_tokens=args.max_tokens)]
        modes["packed_token_budget"] = (policy, budget, True)
    if args.compile:
        compiled = PolicyModel(wrap_decoder_blocks(copy.deepcopy(decoder), compile=True,
                                                   activation_checkpointing=False), kernels)
        modes.update(packed_compiled=(compiled, fixed, True), padded_compiled=(compiled, fixed, False))

    results = {}
    all_times = time_updates(modes, device, args.repeats, args.warmup)
    for name, (_, split, packed) in modes.items():
        times = all_times[name]
        seconds = statistics.median(times)
        computed = tokens if packed else padded_tokens(split)
        results[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "micro_batches": len(split),
                         "computed_tokens": computed, "mfu": mfu(flops, seconds, device), "times": times}
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    compiled_over_eager = {layout: results[f"{layout}_compiled"]["tokens_per_s"] / results[layout]["tokens_per_s"]
                           for layout in ("packed", "padded") if f"{layout}_compiled" in results}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "benchmark": "bench_train",
        "device": device.type,
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": kernels,
        "dtype": str(dtype).replace("torch.", ""),
        "model_shape": args.model_shape,
        "model": {k: getattr(shape, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                   "num_heads", "num_kv_heads", "head_dim")},
        "batch": args.batch,
        "micro_batch_size": args.micro_batch_size,
        "max_tokens": args.max_tokens,
        "scale": scale,
        "prompt_length": prompt_len,
        "response_length_range": [lo, hi],
        "tokens_per_update": tokens,
        "training_flops_per_update": flops,
        "peak_flops": peak_flops(device),
        "results": results,
        "packed_over_padded": ratio,
        "compiled_over_eager": compiled_over_eager,
    }
    print_table(report)
    suffix = ("" if args.model_shape == "tiny" else f"_{args.model_shape}") + ("_compiled" if args.compile else "")
    out = args.out or RESULTS / f"bench_train_{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return report


def print_table(report: dict) -> None:
    print(f"{report['model_shape']} on {report['device']} ({report['device_name']}, {report['dtype']}, "
          f"kernels={report['kernels']}): {report['batch']} sequences, prompt {report['prompt_length']}, "
          f"responses {report['response_length_range'][0]}..{report['response_length_range'][1]}, "
          f"{report['tokens_per_update']} tokens per update")
    print(f"{'mode':<22}{'micro-batches':>14}{'computed tokens':>17}{'s/update':>11}{'tokens/s':>12}{'MFU':>8}")
    for name, r in report["results"].items():
        u = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{name:<22}{r['micro_batches']:>14}{r['computed_tokens']:>17}{r['seconds']:>11.3f}"
              f"{r['tokens_per_s']:>12.0f}{u:>8}")
    print(f"packed / padded tokens/s: {report['packed_over_padded']:.2f}x")
    for layout, r in report["compiled_over_eager"].items():
        print(f"{layout} compiled / eager tokens/s: {r:.2f}x")


if __name__ == "__main__":
    main()
