"""Tensor-parallel generation on 2 gloo ranks equals the single-process engine: same tokens
(greedy and seeded sampling, n > 1 with prefix sharing), logprobs within 1e-5, and
``update_weights`` of full tensors lands in each rank's shard."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from spmd_rl.models import ModelArgs, build_model
from spmd_rl.rollout.native.engine import NativeEngine
from spmd_rl.rollout.types import SamplingParams
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

# vocab 61 splits unevenly (31 + 30); 4 query / 2 kv heads -> 2 / 1 per rank
ARGS = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=61, hidden_size=32,
                 intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 tie_word_embeddings=False, attention_bias=True)
# Mixtral: 3 experts (top-2) in both layers, each split over tp like the dense MLP
MIXTRAL = ModelArgs(architecture="MixtralForCausalLM", model_type="mixtral", vocab_size=61, hidden_size=32,
                    intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=3,
                    num_experts_per_tok=2, moe_intermediate_size=32, moe_layers=(0, 1))
MODELS = {"qwen2": ARGS, "mixtral": MIXTRAL}
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [7], [9, 9, 9, 9, 9]]
CASES = {
    "greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=12),
    "sampled": SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7),
}


def generate_all(engine):
    return {name: engine.generate(PROMPTS, params) for name, params in CASES.items()}


def updated_weights(args: ModelArgs = ARGS):
    """Full tensors of a different model (seed 1), as the trainer would stream them."""
    return list(build_model(None, args=args, seed=1).named_parameters())


def _worker(rank, world_size, out_path, model="qwen2"):
    args = MODELS[model]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    engine = NativeEngine(build_model(None, args=args, seed=0), max_num_seqs=4, max_seq_len=40,
                          num_blocks=24, block_size=4, max_num_batched_tokens=16, tp_mesh=mesh)
    before = generate_all(engine)
    engine.update_weights(iter(updated_weights(args)))
    after = generate_all(engine)
    # Built on the meta device: each rank allocates only its shards, then takes the streamed weights.
    from spmd_rl.models.decoder import Transformer

    with torch.device("meta"):
        weightless = Transformer(args)
    lazy = NativeEngine(weightless, device="cpu", max_num_seqs=4, max_seq_len=40, num_blocks=24, block_size=4,
                        max_num_batched_tokens=16, tp_mesh=mesh)
    q_proj = lazy.model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.to_local().shape == (args.num_heads * args.head_dim // world_size, args.hidden_size)
    lazy.update_weights(iter(updated_weights(args)))
    assert flatten(generate_all(lazy)) == flatten(after), "a meta-built engine generates as the built one"
    outputs = [None] * world_size
    dist.all_gather_object(outputs, (before, after))
    if rank == 0:
        torch.save({"ranks": outputs, "kv_heads_per_rank": engine.kv_cache.k[0].shape[2]}, out_path)


def flatten(results):
    return {name: [(c.token_ids, c.logprobs, c.finish_reason) for samples in out for c in samples]
            for name, out in results.items()}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_tp2_generation_equals_single_process(tmp_path, model):
    args = MODELS[model]
    run_on_ranks(_worker, 2, str(tmp_path / "tp.pt"), model)
    got = torch.load(tmp_path / "tp.pt", weights_only=False)
    assert got["kv_heads_per_rank"] == 1  # each rank caches its own kv head only
    reference = NativeEngine(build_model(None, args=args, seed=0), max_num_seqs=4, max_seq_len=40,
                             num_blocks=24, block_size=4, max_num_batched_tokens=16)
    ref_before = flatten(generate_all(reference))
    reference.update_weights(iter(updated_weights(args)))
    ref_after = flatten(generate_all(reference))
    for before, after in got["ranks"]:
        for ref, out in ((ref_before, flatten(before)), (ref_after, flatten(after))):
            for name in CASES:
                for (ref_ids, ref_lp, ref_reason), (ids, lp, reason) in zip(ref[name], out[name], strict=True):
                    assert ids == ref_ids and reason == ref_reason, name
                    assert max(abs(a - b) for a, b in zip(lp, ref_lp)) < 1e-5, name
    assert ref_before["greedy"] != ref_after["greedy"]  # the weight update changed the outputs


def _pool_worker(rank, world_size, out_path):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    # Each rank could afford a different pool (on GPU: its own free memory); the group must agree,
    # or the ranks would schedule different steps and their collectives would not pair up.
    budget_gb = [2e-5, 1e-5][rank]
    engine = NativeEngine(build_model(None, args=ARGS, seed=0), max_num_seqs=4, max_seq_len=40, block_size=4,
                          kv_cache_gb=budget_gb, max_num_batched_tokens=16, tp_mesh=mesh)
    out = engine.generate(PROMPTS, CASES["sampled"])
    sizes = [None] * world_size
    dist.all_gather_object(sizes, (engine.kv_cache.num_blocks, engine.last_stats["num_steps"], flatten({"s": out})))
    if rank == 0:
        torch.save(sizes, out_path)


def test_tp_ranks_agree_on_the_pool_size(tmp_path):
    run_on_ranks(_pool_worker, 2, str(tmp_path / "pool.pt"))
    (blocks0, steps0, out0), (blocks1, steps1, out1) = torch.load(tmp_path / "pool.pt", weights_only=False)
    # 512 bytes per block (4 slots x 2 layers x 2 (k, v) x 1 kv head x 8 x 4 bytes): rank 0 could take
    # 40 (its 41 capped at 4 seqs x 10 blocks), rank 1 only 1e-5 GiB // 512 = 20; both take 20.
    assert blocks0 == blocks1 == int(1e-5 * 1024**3) // 512 == 20
    assert steps0 == steps1 and out0 == out1
