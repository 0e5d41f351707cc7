"""A vocab-sharded lm-head over 2 gloo ranks gives the unsharded logprobs, entropy and gradients,
for the torch reference and for the Triton kernel (its CPU interpreter here).

Relative error = ||out - ref|| / max(||ref||, tiny) (Frobenius), against a float64 oracle on the
full vocabulary; bounds fp32 <= 1e-4, bf16 <= 1e-2.
"""

import os

import pytest
import torch

# The spawned ranks import triton afresh: interpret on CPU must be chosen before that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.distributed.launcher import run_on_ranks  # noqa: E402

torch.set_num_threads(1)

N, V, H = 29, 250, 24
SHARDS = [(0, 130), (130, 250)]  # uneven on purpose; neither is a multiple of BLOCK_V = 64
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(dtype):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:4] = torch.tensor([0, 129, 130, 249])  # both sides of the shard boundary
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, targets, g_lp, g_ent


def _tp_worker(rank, world_size):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    from spmd_rl.kernels.logprob import logprobs_and_entropy, logprobs_from_logits

    group = dist.group.WORLD
    start, end = SHARDS[rank]
    for backend, dtype in [("torch", torch.float32), ("triton", torch.float32),
                           ("triton", torch.bfloat16)]:
        hidden, weight, targets, g_lp, g_ent = _inputs(dtype)
        # float64 oracle on the full vocabulary.
        h64 = hidden.double().requires_grad_()
        w64 = weight.double().requires_grad_()
        ref_lp, ref_ent = logprobs_from_logits(h64 @ w64.t() / 0.7, targets, with_entropy=True)
        ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()

        h = hidden.clone().requires_grad_()
        w = weight[start:end].clone().requires_grad_()
        lp, ent = logprobs_and_entropy(h, w, targets, backend=backend, temperature=0.7,
                                       with_entropy=True, vocab_start=start, tp_group=group)
        # The loss is replicated on both ranks, as after a vocab-parallel lm-head.
        ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
        tol = TOL[dtype]
        what = f"{backend} {dtype} rank {rank}"
        assert _rel_err(lp, ref_lp) <= tol, what
        assert _rel_err(ent, ref_ent) <= tol, what
        assert _rel_err(h.grad, h64.grad) <= tol, what  # all-reduced over both shards
        assert _rel_err(w.grad, w64.grad[start:end]) <= tol, what  # this rank's rows only

        # A target outside every shard fails on both ranks alike (the check is all-reduced).
        bad = targets.clone()
        bad[5] = V
        with pytest.raises(ValueError, match=r"targets must be token ids in \[0, vocab_size\)"):
            logprobs_and_entropy(hidden, weight[start:end], bad, backend=backend,
                                 vocab_start=start, tp_group=group)


def test_vocab_sharded_over_two_ranks_equals_unsharded():
    run_on_ranks(_tp_worker, 2)
