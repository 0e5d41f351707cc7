"""Rollout throughput: the native engine (paged KV cache, continuous batching, prefix sharing)
vs ``transformers``' ``generate`` on the same random weights, prompts and sampling.

Both sides get the same model (a Qwen2-shaped random decoder; the HF ``Qwen2ForCausalLM`` loads
the native model's state dict, so the weights are identical), the same prompts (random token
ids of ragged lengths), the same sampling (temperature 1, no top-k/top-p, no stop token: every
response runs to ``--new-tokens``) and the same ``torch.set_num_threads``. For each batch size
(prompts) and n (samples per prompt) the wall time of one generate call of all
``batch x n`` responses is measured after a warm-up call, and reported as generated tokens/s,
the native/HF ratio and the peak extra memory of the call (host RSS sampled on CPU, the CUDA
allocator's peak on GPU).

On a GPU it also measures the native engine's steady decode rate and its share of the HBM
roofline for a Qwen2.5-0.5B-shaped model at batch 256: the time of one decode step (from two
runs that differ only in response length, so prefill cancels out), the bytes one step must
read (all weights + the K/V of every running sequence), and the device's copy bandwidth
measured with a large tensor copy. ``--roofline`` runs the same code at tiny scale on CPU.

    python perf/bench_rollout.py                          # CPU: tiny model, short lengths (< 3 min)
    python perf/bench_rollout.py --model qwen2.5-0.5b --prompt-len 256 --new-tokens 256   # GPU
    python perf/bench_rollout.py --batches 64 --n 8 --threads 2 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spmd_rl.models import build_model  # noqa: E402
from spmd_rl.models.args import ModelArgs  # noqa: E402
from spmd_rl.rollout.native import NativeEngine  # noqa: E402
from spmd_rl.rollout.types import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    # CPU default: small enough that 2 x 6 generate calls take well under 3 minutes on 2 cores.
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=32),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64),
    # Qwen2.5-0.5B's shapes (random weights).
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, rope_theta=1e6, tie_word_embeddings=True),
}


def model_args(name: str) -> ModelArgs:
    shape = dict(MODELS[name])
    return ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", attention_bias=True,
                     max_position_embeddings=32768, **shape)


def hf_twin(native: torch.nn.Module, args: ModelArgs, device: torch.device, dtype: torch.dtype):
    """A transformers Qwen2ForCausalLM holding exactly the native model's weights."""
    import transformers

    cfg = transformers.Qwen2Config(**{k: v for k, v in args.to_hf_config().items() if k != "architectures"})
    cfg.eos_token_id, cfg.pad_token_id = None, 0
    # Built for real (not on the meta device): the rotary inv_freq buffer is not in the state dict.
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(cfg).to(dtype)
    missing, unexpected = hf.load_state_dict(native.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF twin does not match the native weights: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.eval()
    ids = torch.arange(1, 17, device=device)[None]
    with torch.inference_mode():
        ours = native.compute_logits(native(ids, torch.arange(16, device=device)[None])).float()
        theirs = hf(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    if diff > (1e-3 if dtype == torch.float32 else 0.1):
        raise RuntimeError(f"HF twin's logits differ from the native model's by {diff}")
    return hf


def make_prompts(batch: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``batch`` random prompts with lengths uniform in [max_len / 2, max_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, max_len // 2), max_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak on GPU, sampled host RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_gb = device, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base, self.peak, self.running = _rss_bytes(), _rss_bytes(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_gb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30
        else:
            self.running = False
            self.thread.join()
            self.peak_gb = (max(self.peak, _rss_bytes()) - self.base) / 2**30


def run_native(engine: NativeEngine, prompts, params: SamplingParams, device) -> tuple[int, float, float]:
    """(generated tokens, seconds, peak extra GiB) of one generate call."""
    with PeakMemory(device) as mem:
        _sync(device)
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        _sync(device)
        seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for group in out for c in group), seconds, mem.peak_gb


@torch.inference_mode()
def run_hf(hf, prompts, params: SamplingParams, device) -> tuple[int, float, float]:
    """Same as :func:`run_native` for HF generate (left-padded batch, num_return_sequences = n)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=params.max_new_tokens,
                  num_return_sequences=params.n, pad_token_id=0)
    if params.greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_k=0, top_p=1.0)
    with PeakMemory(device) as mem:
        _sync(device)
        start = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
    return (out.shape[1] - width) * out.shape[0], seconds, mem.peak_gb


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Measured device-memory bandwidth in bytes/s: a large tensor copy reads and writes nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def decode_roofline(model, device, dtype, batch: int, prompt_len: int, steps: tuple[int, int],
                    kernels: str, copy_bytes: int) -> dict:
    """Steady decode rate of the native engine at ``batch`` sequences and its share of the memory
    roofline: bytes one decode step must read (weights + K/V of every sequence) / step time,
    over the measured copy bandwidth."""
    args = model.args
    engine = NativeEngine(model, max_num_seqs=batch, max_num_batched_tokens=max(8192, batch * prompt_len),
                          max_seq_len=prompt_len + steps[1] + 1, device=device, dtype=dtype, kernels=kernels)
    prompts = [[(7 * i + j) % (args.vocab_size - 1) + 1 for j in range(prompt_len)] for i in range(batch)]
    timings = {}
    for new in (2, *steps):  # the first call warms up
        params = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0)
        _sync(device)
        start = time.perf_counter()
        engine.generate(prompts, params)
        _sync(device)
        timings[new] = (time.perf_counter() - start, engine.last_stats["num_steps"])
    (t1, s1), (t2, s2) = timings[steps[0]], timings[steps[1]]
    step_s = (t2 - t1) / (s2 - s1)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())  # tied counted once
    kv_per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.empty((), dtype=dtype).element_size()
    mean_context = prompt_len + (steps[0] + steps[1]) / 2  # the decode steps between the two runs
    step_bytes = weight_bytes + batch * mean_context * kv_per_token
    bandwidth = copy_bandwidth(device, copy_bytes)
    return {
        "batch": batch, "prompt_len": prompt_len, "decode_steps": [steps[0], steps[1]],
        "decode_step_ms": step_s * 1e3, "decode_tokens_per_s": batch / step_s,
        "weight_bytes": weight_bytes, "kv_bytes_per_step": step_bytes - weight_bytes,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "roofline_frac": step_bytes / step_s / bandwidth,
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b" if on_gpu else "tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256], help="prompts per generate call")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8], help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=128 if on_gpu else 24, help="longest prompt")
    parser.add_argument("--new-tokens", type=int, default=128 if on_gpu else 16, help="tokens per response")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="torch.set_num_threads")
    parser.add_argument("--max-num-seqs", type=int, default=1024, help="native engine's running-set bound")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine (alternating); best kept")
    parser.add_argument("--skip-hf", action="store_true", help="native engine only")
    parser.add_argument("--roofline", action="store_true", help="also the decode roofline on CPU (tiny scale)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default perf/results/rollout_<device>.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kernels = "triton" if on_gpu else "torch"
    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"bench_rollout on {name}, {args.threads} threads, torch {torch.__version__}, model {args.model}, "
          f"prompts <= {args.prompt_len} tokens, {args.new_tokens} new tokens", flush=True)
    started = time.time()
    margs = model_args(args.model)
    native = build_model(None, args=margs, device=device, dtype=dtype, seed=0).eval()
    hf = None if args.skip_hf else hf_twin(native, margs, device, dtype)

    rows = []
    for batch in args.batches:
        for n in args.n:
            prompts = make_prompts(batch, args.prompt_len, margs.vocab_size, seed=batch)
            params = SamplingParams(n=n, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
            seqs = batch * n
            engine = NativeEngine(native, max_num_seqs=min(seqs, args.max_num_seqs),
                                  max_num_batched_tokens=max(4096, batch * args.prompt_len),
                                  max_seq_len=args.prompt_len + args.new_tokens, kernels=kernels)
            warm = SamplingParams(n=n, temperature=1.0, max_new_tokens=2, seed=1)
            engine.generate(prompts[:2], warm)
            if hf is not None:
                run_hf(hf, prompts[:2], warm, device)
            # Alternate the two and keep each one's fastest run: on a shared machine the load
            # changes from call to call, and the best run is the least disturbed.
            best: dict[str, tuple[int, float, float]] = {}
            for _ in range(args.repeats):
                for impl in ("native", "hf") if hf is not None else ("native",):
                    got = run_native(engine, prompts, params, device) if impl == "native" else run_hf(
                        hf, prompts, params, device)
                    if impl not in best or got[1] < best[impl][1]:
                        best[impl] = (got[0], got[1], max(got[2], best.get(impl, got)[2]))
            tokens, seconds, mem = best["native"]
            row = {"batch": batch, "n": n, "sequences": seqs, "native_tokens": tokens, "native_s": seconds,
                   "native_tok_s": tokens / seconds, "native_peak_gb": mem,
                   "native_stats": {k: engine.last_stats[k] for k in ("num_steps", "num_preemptions",
                                                                       "prefix_hit_blocks", "peak_blocks_used")}}
            engine.sleep()
            del engine
            if hf is not None:
                tokens, seconds, mem = best["hf"]
                row.update(hf_tokens=tokens, hf_s=seconds, hf_tok_s=tokens / seconds, hf_peak_gb=mem,
                           speedup_vs_hf=row["native_tok_s"] / (tokens / seconds))
            rows.append(row)
            hf_part = (f"  hf {row['hf_tok_s']:9.0f} tok/s {row['hf_peak_gb']:6.2f} GB  x{row['speedup_vs_hf']:.2f}"
                       if hf is not None else "")
            print(f"  batch {batch:4d} n {n}  native {row['native_tok_s']:9.0f} tok/s {row['native_peak_gb']:6.2f} GB"
                  f"{hf_part}", flush=True)

    roofline = None
    if on_gpu or args.roofline:
        rmodel = native if not on_gpu else build_model(None, args=model_args("qwen2.5-0.5b"), device=device,
                                                      dtype=dtype, seed=0).eval()
        batch, prompt_len, steps = (256, 128, (32, 160)) if on_gpu else (8, 16, (4, 12))
        roofline = decode_roofline(rmodel, device, dtype, batch, prompt_len, steps, kernels,
                                   copy_bytes=2**30 if on_gpu else 2**26)
        roofline["model"] = "qwen2.5-0.5b" if on_gpu else args.model
        print(f"  decode roofline ({roofline['model']}, batch {batch}): {roofline['decode_tokens_per_s']:.0f} tok/s, "
              f"{roofline['decode_step_ms']:.2f} ms/step, {roofline['roofline_frac'] * 100:.1f}% of the measured "
              f"{roofline['copy_bandwidth_gb_per_s']:.0f} GB/s copy bandwidth", flush=True)

    print()
    print("| batch | n | native tok/s | HF tok/s | native / HF | native peak GB | HF peak GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['n']} | {r['native_tok_s']:.0f} | {r.get('hf_tok_s', float('nan')):.0f} | "
              f"{r.get('speedup_vs_hf', float('nan')):.2f} | {r['native_peak_gb']:.3f} | "
              f"{r.get('hf_peak_gb', float('nan')):.3f} |")
    tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") if on_gpu else "cpu"
    out = args.out or RESULTS / f"rollout_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype), "config": config,
                               "model_shape": MODELS[args.model], "seconds": round(time.time() - started, 1),
                               "results": rows, "decode_roofline": roofline}, indent=2) + "\n")
    print(f"wrote {out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
