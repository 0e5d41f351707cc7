"""CUDA checks of the native decoder and engine (skipped without a GPU)."""

import pytest
import torch

from spmd_rl.models import ModelArgs, build_model
from spmd_rl.rollout.native.engine import NativeEngine
from spmd_rl.rollout.types import SamplingParams
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
torch.set_num_threads(1)

ARGS = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=97, hidden_size=64,
                 intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 tie_word_embeddings=True, attention_bias=True)


def test_cuda_forward_matches_cpu_fp32():
    cpu = build_model(None, args=ARGS, seed=0)
    gpu = build_model(None, args=ARGS, seed=0, device="cuda")
    ids = torch.randint(0, 97, (1, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    ref = cpu(ids, pos, cu_seqlens=cu)
    out = gpu(ids.cuda(), pos.cuda(), cu_seqlens=cu.cuda()).cpu()
    assert (out - ref).abs().max().item() < 1e-4


def test_cuda_engine_logprobs_match_trainer():
    model = build_model(None, args=ARGS, seed=0, device="cuda")
    engine = NativeEngine(model, max_num_seqs=8, max_seq_len=64, device=torch.device("cuda"))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8), seeds=[0, 1])
    flat_prompts = [p for p, samples in zip(prompts, out) for _ in samples]
    responses = [c.token_ids for samples in out for c in samples]
    with torch.no_grad():
        lp, _ = PolicyModel(model)(build_scoring_inputs(flat_prompts, responses, "cuda"))
    engine_lp = torch.tensor([x for samples in out for c in samples for x in c.logprobs])
    assert (lp.cpu() - engine_lp).abs().max().item() < 1e-4


def test_offloaded_fsdp_reference_keeps_shards_on_cpu_and_matches():
    """ref.offload: shards live in pinned host memory, the forward equals the resident model's."""
    from spmd_rl.distributed.init import destroy_distributed, init_distributed
    from spmd_rl.distributed.parallelize import apply_fsdp
    from torch.distributed.device_mesh import init_device_mesh

    init_distributed(torch.device("cuda"))
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("dp",))
        resident = apply_fsdp(PolicyModel(build_model(None, args=ARGS, seed=0, device="cuda")), mesh["dp"])
        offloaded = apply_fsdp(PolicyModel(build_model(None, args=ARGS, seed=0, device="cuda")), mesh["dp"],
                               offload_to_cpu=True)
        assert all(p.to_local().device.type == "cpu" for p in offloaded.parameters())
        inputs = build_scoring_inputs([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], "cuda")
        with torch.no_grad():
            a, _ = resident(inputs)
            b, _ = offloaded(inputs)
        assert (a - b).abs().max().item() < 1e-5
        from spmd_rl.trainer.actor import reshard

        reshard(offloaded)  # what compute_logprobs does after a no-grad pass: back to host shards
        assert all(p.to_local().device.type == "cpu" for p in offloaded.parameters())
    finally:
        destroy_distributed()
