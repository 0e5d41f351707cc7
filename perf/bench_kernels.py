"""Triton kernels vs their baselines: time and peak memory at realistic shapes (GPU), or
interpreter correctness at tiny shapes (CPU).

On a CUDA device, for each kernel the median time of ``--repeats`` calls (after warm-up, CUDA
events) and the peak extra memory of one call are measured for the Triton kernel and its
baselines in the same run, and reported as ratios:

- ``logprob``: fused lm-head -> logprob + entropy, forward + backward, vs the plain torch path that
  materialises the ``[N, V]`` logits (``h @ W.T``, ``log_softmax``, gather, entropy) and vs the
  project's chunked torch reference. Goal: peak memory <= 1/4 of the plain path at >= 1.0x speed.
- ``varlen_attention``: packed causal attention over ``cu_seqlens`` with GQA, forward + backward,
  vs the torch reference (SDPA per sequence) and vs flash-attn's varlen function when installed.
  Goal: >= 0.8x flash-attn's speed.
- ``paged_decode``: one decode step over a paged KV cache vs the torch reference (gather + SDPA
  math); also achieved bandwidth as % of the device's HBM peak. Goal: >= 60 % of the bound.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here): timings mean
nothing there, so only the relative error against a float64 reference is recorded.

    python perf/bench_kernels.py                     # GPU: full shapes; CPU: interpreter check
    python perf/bench_kernels.py --only logprob --repeats 5 --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

RESULTS = Path(__file__).resolve().parent / "results"
# Dense HBM bandwidth (bytes/s) by device name, for the paged-decode bound.
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "H20": 4.0e12, "L40S": 0.864e12}


# ----------------------------------------------------------------------------- measuring


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_gb(fn: Callable[[], object]) -> float:
    """Peak memory one call allocates on top of what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- logprob


def naive_logprobs(hidden, weight, targets, temperature):
    """What a trainer without a fused kernel does: the full [N, V] logits in fp32."""
    logits = (hidden @ weight.t()).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None])[:, 0], entropy


def logprob_case(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h, device=device, generator=gen) * 1.0).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    return hidden, weight, targets


def logprob_fns(hidden, weight, targets, temperature=0.7) -> dict[str, Callable[[], tuple]]:
    from spmd_rl.kernels.logprob import fused_logprobs, logprobs_from_hidden

    def run(compute):
        def step():
            hidden.grad = weight.grad = None
            lp, ent = compute()
            (lp.sum() + 0.01 * ent.sum()).backward()
            return lp.detach(), ent.detach(), hidden.grad, weight.grad
        return step

    return {
        "triton": run(lambda: fused_logprobs(hidden, weight, targets, temperature=temperature, with_entropy=True)),
        "torch_chunked": run(lambda: logprobs_from_hidden(hidden, weight, targets, temperature=temperature,
                                                          with_entropy=True)),
        "torch_full_logits": run(lambda: naive_logprobs(hidden, weight, targets, temperature)),
    }


# ----------------------------------------------------------------------------- varlen attention


def ragged_lengths(total: int, low: int, high: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return [x for x in lengths if x > 0]


def attention_case(lengths: list[int], hq: int, hkv: int, d: int, dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, d, device=device, generator=gen).to(dtype).requires_grad_()
               for heads in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def attention_fns(q, k, v, cu, max_seqlen: int) -> dict[str, Callable[[], tuple]]:
    from spmd_rl.kernels.varlen_attention import varlen_attention

    gen = torch.Generator(device=q.device).manual_seed(1)  # the same upstream gradient for every dtype
    grad_out = torch.randn(q.shape, device=q.device, generator=gen).to(q.dtype)

    def run(backend):
        def step():
            q.grad = k.grad = v.grad = None
            out = varlen_attention(q, k, v, cu, max_seqlen=max_seqlen, backend=backend)
            out.backward(grad_out)
            return out.detach(), q.grad, k.grad, v.grad
        return step

    fns = {"triton": run("triton"), "torch_sdpa_per_sequence": run("torch")}
    try:
        import flash_attn  # noqa: F401

        fns["flash_attn"] = run("flash_attn")
    except ImportError:
        pass
    return fns


# ----------------------------------------------------------------------------- paged decode


def paged_case(batch: int, low: int, high: int, hq: int, hkv: int, d: int, block_size: int, dtype, device: str,
               seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.randint(low, high + 1, (batch,), generator=gen, device=device).to(torch.int32)
    blocks_per_seq = -(-high // block_size)
    num_blocks = batch * blocks_per_seq
    k_pool = torch.randn(num_blocks, block_size, hkv, d, device=device, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, hkv, d, device=device, generator=gen).to(dtype)
    # Physical blocks shuffled, as after many allocations and frees.
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch, hq, d, device=device, generator=gen).to(dtype)
    return q, k_pool, v_pool, tables, lengths


def paged_fns(q, k_pool, v_pool, tables, lengths) -> dict[str, Callable[[], torch.Tensor]]:
    from spmd_rl.kernels.paged_attention import paged_decode_attention

    return {backend_name: (lambda b=backend: paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend=b))
            for backend_name, backend in (("triton", "triton"), ("torch_gather_reference", "torch"))}


# ----------------------------------------------------------------------------- drivers


def gpu_bench(only: set[str], repeats: int) -> list[dict]:
    from spmd_rl.kernels.paged_attention import bandwidth_bytes

    rows = []
    dev = "cuda"
    if "logprob" in only:
        n, h, v = 16384, 896, 151936
        case = logprob_case(n, h, v, torch.bfloat16, dev)
        fns = logprob_fns(*case)
        ref = [t.float() for t in fns["torch_full_logits"]()]
        rows += measure("logprob", f"N={n} H={h} V={v} bf16 fwd+bwd", fns, repeats, baseline="torch_full_logits",
                        check=lambda out: max(rel_err(o, r) for o, r in zip(out, ref)))
    if "varlen_attention" in only:
        lengths = ragged_lengths(32768, 64, 4096)
        case = attention_case(lengths, 14, 2, 64, torch.bfloat16, dev)
        fns = attention_fns(*case, max_seqlen=max(lengths))
        ref = [t.float() for t in fns["torch_sdpa_per_sequence"]()]
        baseline = "flash_attn" if "flash_attn" in fns else "torch_sdpa_per_sequence"
        rows += measure("varlen_attention", f"{len(lengths)} seqs, 32k tokens, Hq=14 Hkv=2 D=64 bf16 fwd+bwd", fns,
                        repeats, baseline=baseline, check=lambda out: max(rel_err(o, r) for o, r in zip(out, ref)))
    if "paged_decode" in only:
        case = paged_case(256, 1024, 4096, 14, 2, 64, 16, torch.bfloat16, dev)
        fns = paged_fns(*case)
        ref = fns["torch_gather_reference"]().float()
        measured = measure("paged_decode", "B=256 ctx 1k-4k Hq=14 Hkv=2 D=64 block 16 bf16", fns, repeats,
                           baseline="torch_gather_reference", check=lambda out: rel_err(out, ref))
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
        moved = bandwidth_bytes(*case)
        for row in measured:
            row["achieved_gb_per_s"] = moved / (row["time_ms"] / 1e3) / 1e9
            row["bandwidth_bound_frac"] = moved / (row["time_ms"] / 1e3) / peak if peak else None
        rows += measured
    return rows


def measure(kernel: str, shape: str, fns: dict[str, Callable], repeats: int, baseline: str,
            check: Callable[[object], float]) -> list[dict]:
    rows = []
    for name, fn in fns.items():
        error = check(fn())
        ms = cuda_time_ms(fn, repeats)
        gb = peak_extra_gb(fn)
        rows.append({"kernel": kernel, "shape": shape, "impl": name, "time_ms": ms, "peak_extra_gb": gb,
                     "rel_err_vs_torch": error, "baseline": baseline})
        print(f"  {kernel:<17} {name:<24} {ms:9.3f} ms  {gb:7.2f} GB", flush=True)
    base = next(r for r in rows if r["impl"] == baseline)
    for r in rows:
        r["speedup_vs_baseline"] = base["time_ms"] / r["time_ms"]
        r["memory_vs_baseline"] = r["peak_extra_gb"] / base["peak_extra_gb"] if base["peak_extra_gb"] else None
    return rows


def interpreter_check(only: set[str]) -> list[dict]:
    """Tiny shapes through Triton's interpreter: relative error vs a float64 torch reference."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        if "logprob" in only:
            hidden, weight, targets = logprob_case(37, 24, 250, dtype, "cpu")
            out = logprob_fns(hidden, weight, targets)["triton"]()
            h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
            ref = logprob_fns(h64, w64, targets)["torch_full_logits"]()
            rows.append({"kernel": "logprob", "shape": f"N=37 H=24 V=250 {tag}", "impl": "triton (interpreter)",
                         "rel_err_vs_float64": max(rel_err(o, r) for o, r in zip(out, ref))})
        if "varlen_attention" in only:
            lengths = [1, 17, 40, 5]
            q, k, v, cu = attention_case(lengths, 4, 2, 16, dtype, "cpu")
            out = attention_fns(q, k, v, cu, max(lengths))["triton"]()
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = attention_fns(q64, k64, v64, cu, max(lengths))["torch_sdpa_per_sequence"]()
            rows.append({"kernel": "varlen_attention", "shape": f"lengths {lengths} Hq=4 Hkv=2 D=16 {tag}",
                         "impl": "triton (interpreter)",
                         "rel_err_vs_float64": max(rel_err(o, r) for o, r in zip(out, ref))})
        if "paged_decode" in only:
            case = paged_case(5, 1, 70, 4, 2, 16, 16, dtype, "cpu")
            out = paged_fns(*case)["triton"]()
            ref = paged_fns(*(t.double() if t.is_floating_point() else t for t in case))["torch_gather_reference"]()
            rows.append({"kernel": "paged_decode", "shape": f"B=5 ctx 1-70 Hq=4 Hkv=2 D=16 block 16 {tag}",
                         "impl": "triton (interpreter)", "rel_err_vs_float64": rel_err(out, ref)})
    for r in rows:
        print(f"  {r['kernel']:<17} {r['shape']:<42} rel err {r['rel_err_vs_float64']:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["logprob", "varlen_attention", "paged_decode"],
                        choices=["logprob", "varlen_attention", "paged_decode"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default perf/results/bench_kernels_<device>.json)")
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        sys.exit("error: the kernels need triton: pip install triton")
    only = set(args.only)
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    print(f"bench_kernels on {device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    start = time.time()
    rows = gpu_bench(only, args.repeats) if on_gpu else interpreter_check(only)
    tag = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") if on_gpu else "cpu_interpreter"
    if only != {"logprob", "varlen_attention", "paged_decode"}:  # a partial run never replaces the full results
        tag += "_" + "_".join(sorted(only))
    out = args.out or RESULTS / f"bench_kernels_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                               "mode": "timing" if on_gpu else "interpreter correctness only (timings meaningless)",
                               "seconds": round(time.time() - start, 1), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
