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


def test_cuda_graph_decode_equals_eager():
    """Decode steps replayed from CUDA graphs give the eager engine's tokens, also after the
    pool is freed and re-allocated (graphs re-captured) and after an in-place weight update."""
    import copy

    from spmd_rl.rollout.weight_sync import iter_full_tensors

    model = build_model(None, args=ARGS, seed=0, device="cuda")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    options = dict(max_num_seqs=8, max_seq_len=64, device=torch.device("cuda"), kernels="triton")
    eager = NativeEngine(copy.deepcopy(model), decode_graphs="off", **options)
    graphed = NativeEngine(copy.deepcopy(model), **options)
    assert graphed.decode_graphs == "graph"

    def agree(reference):
        for params in (SamplingParams(temperature=0.0, max_new_tokens=12),
                       SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3)):
            want = [c for g in reference.generate(prompts, params) for c in g]
            got = [c for g in graphed.generate(prompts, params) for c in g]
            assert [c.token_ids for c in got] == [c.token_ids for c in want]
            diff = max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x.logprobs, y.logprobs))
            assert diff < 1e-4
            assert graphed.last_stats["graph_steps"] > 0

    agree(eager)
    assert graphed._graphs.num_captured > 0
    graphed.sleep()
    assert graphed._graphs is None
    agree(eager)
    other = build_model(None, args=ARGS, seed=1, device="cuda")
    graphed.update_weights(iter_full_tensors(other))  # in place: the captured graphs stay valid
    captured = graphed._graphs.num_captured
    agree(NativeEngine(copy.deepcopy(other), decode_graphs="off", **options))
    assert graphed._graphs.num_captured == captured


def test_cuda_moe_engine_logprobs_match_trainer_and_skip_graphs():
    """A Qwen3-MoE model on CUDA: the engine stays eager (the experts' token gathers have
    data-dependent shapes) and its logprobs equal the trainer's; the forward equals the CPU's."""
    moe = ModelArgs(architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", vocab_size=97, hidden_size=64,
                    intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_layers=(0, 1))
    cpu = build_model(None, args=moe, seed=0)
    model = build_model(None, args=moe, seed=0, device="cuda")
    ids, pos = torch.randint(0, 97, (1, 16)), torch.arange(16)[None]
    assert (model(ids.cuda(), pos.cuda()).cpu() - cpu(ids, pos)).abs().max().item() < 1e-4
    engine = NativeEngine(model, max_num_seqs=8, max_seq_len=64, device=torch.device("cuda"), kernels="triton")
    assert engine.decode_graphs is None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8), seeds=[0, 1])
    flat_prompts = [p for p, samples in zip(prompts, out) for _ in samples]
    with torch.no_grad():
        lp, _ = PolicyModel(model)(build_scoring_inputs(flat_prompts, [c.token_ids for s in out for c in s], "cuda"))
    engine_lp = torch.tensor([x for samples in out for c in samples for x in c.logprobs])
    assert (lp.cpu() - engine_lp).abs().max().item() < 1e-4
