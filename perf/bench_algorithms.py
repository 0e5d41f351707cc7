"""CPU cost of the RL algorithm math: advantage estimators, policy losses, value loss, KL penalties.

Every registered advantage estimator (no grad) and every registered policy loss (forward +
backward, ``agg_mode="token-mean"``) is timed on one ``[B, T]`` float32 batch with ragged
responses and ``--group-size`` responses per prompt; ``value_loss`` and ``kl.kl_penalty`` are
timed too when they exist. Each entry is the median of ``--repeats`` calls after two warm-up calls,
and is also given as a ratio to a baseline measured in the same run: one eager elementwise op,
``a + b`` on ``[B, T]`` tensors including the allocation of its output. The ratio
is the number to compare across machines; absolute CPU times are recorded with the machine
they came from.

    python perf/bench_algorithms.py                      # B=1024, T=2048
    python perf/bench_algorithms.py --batch 256 --length 512 --repeats 3 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_algorithms_cpu.json"


def make_batch(batch: int, length: int, group_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rollout-like float32 tensors: right-padded responses of length T/8..T, 0/1 outcome scores."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 8), length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # [B, T]
    scores = torch.randint(0, 2, (batch,), generator=gen).float()  # [B]
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), lengths - 1] = scores  # outcome reward on the last response token
    logprobs = -torch.rand(batch, length, generator=gen) * 2
    return {
        "rewards": rewards,
        "mask": mask,
        "values": torch.randn(batch, length, generator=gen),
        "old_values": torch.randn(batch, length, generator=gen),
        "baselines": torch.rand(batch, generator=gen),
        "group_index": torch.arange(batch) // group_size,
        "logprobs": logprobs,
        "old_logprobs": logprobs + 0.05 * torch.randn(batch, length, generator=gen),
        "ref_logprobs": logprobs + 0.1 * torch.randn(batch, length, generator=gen),
        "advantages": torch.randn(batch, length, generator=gen) * mask,
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def advantage_cases(data: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    from spmd_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS

    kwargs = dict(values=data["values"], group_index=data["group_index"], reward_baselines=data["baselines"],
                  gamma=1.0, lam=0.95)
    return {name: (lambda fn=fn: fn(data["rewards"], data["mask"], **kwargs))
            for name, fn in sorted(ADVANTAGE_ESTIMATORS.items())}


def _backward(make_loss: Callable[[], torch.Tensor], leaf: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        leaf.grad = None
        make_loss().backward()

    return step


def policy_loss_cases(data: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    # imported at run time: the loss registry grows independently of this script
    from spmd_rl.algorithms import losses

    logprobs = data["logprobs"].clone().requires_grad_()
    return {
        name: _backward(
            lambda fn=fn: fn(logprobs, data["old_logprobs"], data["advantages"], data["mask"],
                             agg_mode="token-mean")[0],
            logprobs,
        )
        for name, fn in sorted(losses.POLICY_LOSSES.items())
    }


def value_loss_cases(data: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    from spmd_rl.algorithms import losses

    if not hasattr(losses, "value_loss"):
        return {}
    values = data["values"].clone().requires_grad_()
    return {
        "value_loss": _backward(
            lambda: losses.value_loss(values, data["old_values"], data["values"] * 0.5, data["mask"],
                                      agg_mode="token-mean")[0],
            values,
        )
    }


def kl_cases(data: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    try:
        from spmd_rl.algorithms import kl
    except ImportError:
        return {}
    if not hasattr(kl, "kl_penalty"):
        return {}
    from spmd_rl.algorithms.masked import masked_mean

    logprobs = data["logprobs"].clone().requires_grad_()
    kinds = getattr(kl, "KL_KINDS", ("k1", "k2", "k3"))
    return {
        kind: _backward(
            lambda kind=kind: masked_mean(kl.kl_penalty(logprobs, data["ref_logprobs"], kind), data["mask"]),
            logprobs,
        )
        for kind in kinds
    }


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, object]:
    return {
        "device": "cpu",
        "platform": platform.platform(),
        "processor": cpu_model(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024, help="responses per batch (B)")
    parser.add_argument("--length", type=int, default=2048, help="max response length (T)")
    parser.add_argument("--group-size", type=int, default=16, help="responses per prompt")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per entry (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    data = make_batch(args.batch, args.length, args.group_size)
    elements = args.batch * args.length
    # an allocating add: like every eager op below it pays for a fresh [B, T] output (page faults
    # included), so the ratio counts "eager elementwise ops' worth" of work
    baseline_s = statistics.median(
        time_calls(lambda: data["rewards"] + data["values"], max(4 * args.repeats, 20), warmup=2)
    )

    groups = [("advantage", advantage_cases), ("policy_loss", policy_loss_cases),
              ("value_loss", value_loss_cases), ("kl_penalty", kl_cases)]
    results, errors = [], []
    for kind, build in groups:
        try:
            cases = build(data)
        except Exception as exc:  # one broken family must not hide the others
            errors.append({"kind": kind, "name": "*", "error": f"{type(exc).__name__}: {exc}"})
            continue
        for name, fn in cases.items():
            try:
                times = time_calls(fn, args.repeats)
            except Exception as exc:
                errors.append({"kind": kind, "name": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            median = statistics.median(times)
            results.append({
                "kind": kind,
                "name": name,
                "grad": kind != "advantage",
                "median_ms": round(median * 1e3, 3),
                "min_ms": round(min(times) * 1e3, 3),
                "times_ms": [round(t * 1e3, 3) for t in times],
                "x_eager_add": round(median / baseline_s, 2),
                "melem_per_s": round(elements / median / 1e6, 1),
            })

    report = {
        "benchmark": "bench_algorithms",
        "device_info": device_info(),
        "config": {"batch": args.batch, "length": args.length, "group_size": args.group_size,
                   "repeats": args.repeats, "dtype": "float32",
                   "valid_tokens": int(data["mask"].sum()), "policy_loss_agg_mode": "token-mean"},
        "baseline": {"name": "a + b of two [B, T] float32 tensors (allocating the output)",
                     "median_ms": round(baseline_s * 1e3, 3)},
        "results": results,
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"B={args.batch} T={args.length} group={args.group_size} float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; baseline add {baseline_s * 1e3:.2f} ms")
    print(f"| {'kind':<12} | {'name':<30} | {'median ms':>10} | {'min ms':>9} | {'x add':>7} | {'Melem/s':>8} |")
    print(f"|{'-' * 14}|{'-' * 32}|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 10}|")
    for row in results:
        print(f"| {row['kind']:<12} | {row['name']:<30} | {row['median_ms']:>10.2f} | {row['min_ms']:>9.2f} | "
              f"{row['x_eager_add']:>7.1f} | {row['melem_per_s']:>8.1f} |")
    for err in errors:
        print(f"ERROR {err['kind']} {err['name']}: {err['error']}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
