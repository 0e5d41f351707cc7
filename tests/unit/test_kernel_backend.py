"""``model.kernels`` selection, and the policy's logprobs through the fused Triton kernel equal to
the torch path on a tiny decoder (Triton's interpreter on CPU)."""

import pytest
import torch

from spmd_rl.kernels.backend import resolve_kernel_backend
from spmd_rl.models import ModelArgs, build_model
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs

torch.set_num_threads(1)

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu_and_torch_is_always_torch():
    assert resolve_kernel_backend("auto", CPU) == "torch"
    assert resolve_kernel_backend("torch", CPU) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^model.kernels=triton needs a CUDA device \(this rank runs on cpu\)"):
        resolve_kernel_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel_backend("triton", CPU) == "triton"


def test_unknown_choice_lists_the_valid_ones():
    with pytest.raises(ValueError, match="^model.kernels='cuda': choose one of auto, triton, torch$"):
        resolve_kernel_backend("cuda", CPU)


def test_policy_logprobs_and_grads_match_between_backends(monkeypatch):
    """Packed attention and lm-head logprobs through Triton = the torch path, values and grads."""
    pytest.importorskip("triton")
    args = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=70, hidden_size=32,
                     intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
    inputs = build_scoring_inputs([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], "cpu")
    results = {}
    for backend in ("torch", "triton"):
        model = build_model(None, args=args, seed=3)
        model.set_kernels(backend)  # packed attention too
        lp, ent = PolicyModel(model, backend)(inputs, temperature=0.7, with_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        results[backend] = (lp.detach(), ent.detach(), model.lm_head_weight().grad.clone(),
                            model.model.embed_tokens.weight.grad.clone(),
                            model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    for a, b in zip(results["torch"], results["triton"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_a_source_checkout_imports_kernels_as_spmd_rl_kernels():
    # Without an install (no editable finder: `python -S` skips the .pth files), the repository on
    # sys.path still gives spmd_rl.kernels from the top-level kernels/ folder, as perf/gpu_suite.sh runs it.
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = (f"import sys; sys.path[:0] = [{str(repo)!r}, *{site!r}]; "
            "import spmd_rl.kernels.logprob as m, spmd_rl.kernels.backend; print(m.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == repo / "kernels" / "logprob.py"
