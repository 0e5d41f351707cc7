"""Fused lm-head -> logprob/entropy kernel (Triton, run by its CPU interpreter here) and the
torch reference, forward and backward, against a float64 oracle on the full logits.

Relative error = ||out - ref|| / max(||ref||, tiny) (Frobenius norm over the whole tensor);
bounds: fp32 <= 1e-4, bf16 <= 1e-2, for outputs and gradients.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

import spmd_rl.kernels.logprob as logprob_mod  # noqa: E402
from spmd_rl.kernels.logprob import (  # noqa: E402
    fused_logprobs,
    logprobs_and_entropy,
    logprobs_from_hidden,
    logprobs_from_logits,
)

torch.set_num_threads(1)

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
BLOCKS = dict(block_n=16, block_v=64, block_h=16)  # N=37, V=250, H=24 are none of them multiples


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(seed, dtype, n=37, v=250, h=24):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if n >= 2:
        targets[0], targets[1] = 0, v - 1  # first and last vocab ids (edge tiles)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_ent = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, targets, g_lp, g_ent


def oracle(hidden, weight, targets, temperature, g_lp, g_ent):
    """float64 full-logits logprob/entropy and the gradients of ``sum(g_lp*lp + g_ent*ent)``."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    lp, ent = logprobs_from_logits((h @ w.t()) / temperature, targets, with_entropy=True)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp * g_lp).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def run_fused(hidden, weight, targets, temperature, with_entropy, g_lp, g_ent, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, ent = fused_logprobs(h, w, targets, temperature=temperature, with_entropy=with_entropy, **kw)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp * g_lp.float()).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.float()).sum()
    loss.backward()
    return lp, ent, h.grad, w.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hand_computed_values(backend):
    # logits [0, ln 3] -> p = [1/4, 3/4]; entropy = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446...
    hidden = torch.ones(2, 1, requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    lp, ent = logprobs_and_entropy(hidden, weight, torch.tensor([1, 0]), backend=backend,
                                   with_entropy=True)
    assert torch.allclose(lp, torch.tensor([math.log(0.75), math.log(0.25)]), atol=1e-6)
    assert torch.allclose(ent, torch.full((2,), 0.5623351446188083), atol=1e-6)
    lp.sum().backward()
    # d lp / d logits = onehot - p: [-1/4, 1/4] and [3/4, -3/4]; d hidden = that @ W.
    expected = torch.tensor([[0.25 * math.log(3.0)], [-0.75 * math.log(3.0)]])
    assert torch.allclose(hidden.grad, expected, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_matches_float64_oracle(temperature):
    hidden, weight, targets, g_lp, g_ent = make_inputs(1, torch.float32)
    ref = oracle(hidden, weight, targets, temperature, g_lp, g_ent)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = logprobs_from_hidden(h, w, targets, temperature=temperature, with_entropy=True,
                                   chunk_size=16)  # 37 tokens -> 3 chunks
    ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
    for out, expect in zip((lp, ent, h.grad, w.grad), ref):
        assert rel_err(out, expect) <= 1e-4


def test_reference_default_path_unchanged():
    # Without a tp_group the reference is exactly the plain full-logits formula in fp32.
    hidden, weight, targets, _, _ = make_inputs(2, torch.float32)
    lp, ent = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, with_entropy=True)
    exp_lp, exp_ent = logprobs_from_logits((hidden @ weight.t()).float() / 0.7, targets, True)
    assert torch.equal(lp, exp_lp) and torch.equal(ent, exp_ent)
    lp16, none = logprobs_from_hidden(hidden.bfloat16(), weight.bfloat16(), targets)
    assert lp16.dtype == torch.float32 and none is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_matches_float64(dtype, with_entropy, temperature):
    seed = 10 + 4 * (dtype == torch.bfloat16) + 2 * with_entropy + (temperature != 1.0)
    hidden, weight, targets, g_lp, g_ent = make_inputs(seed, dtype)
    g_ent = g_ent if with_entropy else None
    ref = oracle(hidden, weight, targets, temperature, g_lp, g_ent)
    lp, ent, dh, dw = run_fused(hidden, weight, targets, temperature, with_entropy, g_lp, g_ent,
                                **BLOCKS)
    assert lp.dtype == torch.float32 and lp.shape == (37,)
    assert dh.dtype == dtype and dw.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(lp, ref[0]) <= tol
    assert rel_err(dh, ref[2]) <= tol
    assert rel_err(dw, ref[3]) <= tol
    if with_entropy:
        assert ent.dtype == torch.float32 and rel_err(ent, ref[1]) <= tol
    else:
        assert ent is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_kernel_at_qwen_vocab_matches_float64(dtype):
    # The compiled kernel with the GPU's default tiles (not the interpreter's): Qwen2.5's 151,936
    # vocab and 896 hidden, 1000 tokens (none a multiple of a tile), forward and backward.
    hidden, weight, targets, g_lp, g_ent = make_inputs(40, dtype, n=1000, v=151_936, h=896)
    weight = (weight.float() / 15).to(dtype)  # logits of std ~1, as a trained lm head's
    hidden, weight, targets, g_lp, g_ent = (t.cuda() for t in (hidden, weight, targets, g_lp, g_ent))
    ref = oracle(hidden, weight, targets, 0.7, g_lp, g_ent)
    out = run_fused(hidden, weight, targets, 0.7, True, g_lp, g_ent)
    for got, expect, what in zip(out, ref, ("logprobs", "entropy", "grad hidden", "grad weight")):
        assert rel_err(got, expect) <= TOL[dtype], what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_in_several_vocab_chunks(dtype, monkeypatch):
    # 70 tokens (5 token blocks -> one vocab split in the forward); the backward chunk is forced
    # to 64 vocab columns, so 4 chunks with a ragged last one (250 = 3*64 + 58).
    hidden, weight, targets, g_lp, g_ent = make_inputs(20, dtype, n=70)
    monkeypatch.setattr(logprob_mod, "_BWD_CHUNK_ELEMS", 70 * 64)
    ref = oracle(hidden, weight, targets, 0.7, g_lp, g_ent)
    out = run_fused(hidden, weight, targets, 0.7, True, g_lp, g_ent, **BLOCKS)
    for got, expect in zip(out, ref):
        assert rel_err(got, expect) <= TOL[dtype]


def test_fused_gradient_of_one_output_only():
    hidden, weight, targets, g_lp, g_ent = make_inputs(30, torch.float32)
    # Only the entropy feeds the loss (no gradient arrives for the logprobs).
    ref = oracle(hidden, weight, targets, 1.0, None, g_ent)
    out = run_fused(hidden, weight, targets, 1.0, True, None, g_ent, **BLOCKS)
    for got, expect in zip(out[2:], ref[2:]):
        assert rel_err(got, expect) <= 1e-4
    # Only the logprobs feed the loss although the entropy was computed; frozen weight.
    ref = oracle(hidden, weight, targets, 1.0, g_lp, None)
    h = hidden.clone().requires_grad_()
    lp, _ = fused_logprobs(h, weight, targets, with_entropy=True, **BLOCKS)
    (lp * g_lp.float()).sum().backward()
    assert weight.grad is None and rel_err(h.grad, ref[2]) <= 1e-4


def test_fused_strided_inputs_and_default_blocks():
    hidden, weight, targets, g_lp, g_ent = make_inputs(40, torch.float32, n=21, v=130)
    wide = torch.cat([hidden, torch.zeros_like(hidden)], dim=1)[:, :24]  # row stride 48
    column_major = weight.t().contiguous().t()  # strides (1, V)
    ref = oracle(hidden, weight, targets, 0.7, g_lp, g_ent)
    lp, ent = fused_logprobs(wide, column_major, targets, temperature=0.7, with_entropy=True)
    assert rel_err(lp, ref[0]) <= 1e-4 and rel_err(ent, ref[1]) <= 1e-4


def test_fused_empty_batch():
    hidden = torch.zeros(0, 24, requires_grad=True)
    weight = torch.randn(250, 24, requires_grad=True)
    lp, ent = fused_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 24) and torch.equal(weight.grad, torch.zeros(250, 24))


def test_dispatch_matches_each_backend():
    hidden, weight, targets, _, _ = make_inputs(50, torch.float32)
    by_torch = logprobs_and_entropy(hidden, weight, targets, backend="torch", temperature=0.7,
                                    with_entropy=True)
    direct = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, with_entropy=True)
    assert torch.equal(by_torch[0], direct[0]) and torch.equal(by_torch[1], direct[1])
    by_triton = logprobs_and_entropy(hidden, weight, targets, backend="triton", temperature=0.7,
                                     with_entropy=True)
    assert rel_err(by_triton[0], direct[0]) <= 1e-5 and rel_err(by_triton[1], direct[1]) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="cuda"), "unknown logprob backend 'cuda'; valid choices: torch, triton"),
        (dict(backend="triton", temperature=0.0), "temperature must be > 0; got 0.0"),
        (dict(backend="torch", temperature=-1.0), "temperature must be > 0; got -1.0"),
        (dict(backend="torch", vocab_start=5), "vocab_start=5 needs a tp_group"),
    ],
)
def test_bad_arguments(kwargs, message):
    hidden, weight, targets, _, _ = make_inputs(60, torch.float32, n=4, v=20)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        logprobs_and_entropy(hidden, weight, targets, **kwargs)


def test_bad_inputs_of_fused():
    hidden, weight, targets, _, _ = make_inputs(61, torch.float32, n=4, v=20)
    with pytest.raises(ValueError, match=r"hidden size mismatch: hidden is \(4, 24\), weight is \(20, 23\)"):
        fused_logprobs(hidden, weight[:, :23], targets)
    with pytest.raises(ValueError, match=r"targets must be \[N\] with N = 4"):
        fused_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="targets must be integer token ids; got dtype torch.float32"):
        fused_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="share one dtype of float32, bfloat16; got torch.float32 and torch.bfloat16"):
        fused_logprobs(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match="block_v must be a power of two >= 16 .* got 48"):
        fused_logprobs(hidden, weight, targets, block_v=48)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, vocab_size\)"):
        fused_logprobs(hidden, weight, torch.tensor([0, 1, 20, 3]))
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, vocab_size\)"):
        fused_logprobs(hidden, weight, torch.tensor([0, -1, 2, 3]))


def test_missing_triton_is_a_runtime_error(monkeypatch):
    monkeypatch.setattr(logprob_mod, "triton", None)
    hidden, weight, targets, _, _ = make_inputs(62, torch.float32, n=4, v=20)
    with pytest.raises(RuntimeError, match="pip install triton"):
        fused_logprobs(hidden, weight, targets)
    # The torch reference keeps working without Triton.
    lp, _ = logprobs_and_entropy(hidden, weight, targets, backend="torch")
    assert lp.shape == (4,)
