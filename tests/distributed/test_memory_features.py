"""Memory features do not change the math: host offload and activation checkpointing leave an RL
update as it was, wrapped blocks keep their parameter names for checkpoints, weight sync and the
HF export, and a compiled block computes what the eager one does.

The update test follows ``test_update_invariance.py``: the same synthetic scored batch goes
through :meth:`PPOTrainer.learn` on 2 gloo ranks, twice (so the second offload carries AdamW
state), then one full :meth:`PPOTrainer.train_step` (generation included) runs the offload wiring.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spmd_rl.errors import UserError
from tests.distributed.launcher import run_on_ranks
from tests.distributed.test_update_invariance import GRPO, PPO_GAE, overrides, rows_of_rank, synthetic_batch
from tests.distributed.tiny_setup import make_tiny_setup

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # multi-process runs and torch.compile

# Activation checkpointing recomputes the same ops on the same inputs: the update is bit-identical
# on CPU; allow fp32 rounding in case a backend reorders a reduction in the recomputation.
AC_ATOL = 1e-7


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("memory"))


def fsdp_bytes(trainer) -> tuple[int, int]:
    """(bytes of the actor's+critic's flat FSDP shards, bytes of their AdamW state incl. step counters)."""
    from spmd_rl.trainer.offload import _fsdp_params

    models = [(trainer.c.policy, trainer.c.optimizer), (trainer.c.critic, trainer.c.critic_optimizer)]
    flat = state = 0
    for model, optimizer in models:
        if model is None:
            continue
        flat += sum(4 * r._sharded_param_data.numel() for r in _fsdp_params(model))
        state += sum(v._local_tensor.numel() * 4 if hasattr(v, "_local_tensor") else v.numel() * 4
                     for s in optimizer.state.values() for v in s.values())
    return flat, state


def learn_then_step(rank: int, world_size: int, root: Path, cases: dict[str, list[str]], out: Path) -> None:
    from spmd_rl.config import Config, load_config
    from spmd_rl.distributed.init import init_parallel
    from spmd_rl.trainer.components import build_components
    from spmd_rl.trainer.ppo import PPOTrainer

    results = {}
    for name, extra in cases.items():
        cfg = load_config(Config, None, overrides(root, f"trainer.run_dir={root / 'runs' / name}", *extra))
        dims, mesh = init_parallel(cfg.parallel, torch.device("cpu"))
        trainer = PPOTrainer(cfg, build_components(cfg, dims, mesh, torch.device("cpu")))
        full = synthetic_batch(vocab=len(trainer.c.tokenizer))
        offload, moved, expected = trainer.host_offload, [], []
        for step in (1, 2):
            trainer.step = step
            if offload.active:  # what train_step does around generation
                expected.append(sum(fsdp_bytes(trainer)))
                moved.append(offload.offload())
                offload.reload()
            trainer.learn(full.select(rows_of_rank(rank, world_size, mini_groups=4)))
        params = {f"actor.{k}": p.full_tensor() for k, p in trainer.c.policy.named_parameters()}
        trainer.step = 3
        metrics = trainer.train_step()  # generate (offloaded), score, learn
        after_step = {f"actor.{k}": p.full_tensor() for k, p in trainer.c.policy.named_parameters()}
        if trainer.c.critic is not None:
            params.update({f"critic.{k}": p.full_tensor() for k, p in trainer.c.critic.named_parameters()})
        results[name] = {"params": params, "after_step": after_step, "moved": moved, "expected": expected,
                         "offloaded_gb": metrics.get("perf/offloaded_gb")}
    if rank == 0:
        torch.save(results, out)


def clean(params: dict) -> dict:
    from spmd_rl.rollout.weight_sync import clean_param_name

    return {clean_param_name(k): v for k, v in params.items()}


def max_diff(a: dict, b: dict) -> float:
    a, b = clean(a), clean(b)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_offload_and_activation_checkpointing_leave_the_update_unchanged(workdir):
    offload = ["actor.offload.params=true", "actor.offload.optimizer=true"]
    cases = {
        "grpo": GRPO,
        "grpo_offload": GRPO + offload,
        "grpo_ac": GRPO + ["actor.activation_checkpointing=true"],
        "gae": PPO_GAE,
        "gae_offload_ac": PPO_GAE + ["critic.offload.params=true", "critic.offload.optimizer=true",
                                     "critic.activation_checkpointing=true", "actor.offload.optimizer=true"],
    }
    out = workdir / "memory_ws2.pt"
    run_on_ranks(learn_then_step, 2, workdir, cases, out)
    r = torch.load(out, weights_only=False)

    # Offload is a pair of plain copies: bit-exact, after two updates and after a full step.
    assert max_diff(r["grpo"]["params"], r["grpo_offload"]["params"]) == 0.0
    assert max_diff(r["grpo"]["after_step"], r["grpo_offload"]["after_step"]) == 0.0
    assert max_diff(r["gae"]["params"], r["gae_offload_ac"]["params"]) <= AC_ATOL
    assert max_diff(r["gae"]["after_step"], r["gae_offload_ac"]["after_step"]) <= AC_ATOL
    # Checkpointed blocks: same update; parameter names differ only by the wrapper.
    assert max_diff(r["grpo"]["params"], r["grpo_ac"]["params"]) <= AC_ATOL
    assert any("_checkpoint_wrapped_module." in k for k in r["grpo_ac"]["params"])
    # Bytes moved = the flat fp32 shards, plus the AdamW state once it exists (second offload).
    moved, expected = r["grpo_offload"]["moved"], r["grpo_offload"]["expected"]
    assert moved == expected and moved[1] > moved[0] > 0
    assert r["grpo_offload"]["offloaded_gb"] == pytest.approx(moved[1] / 1024**3)
    assert r["grpo"]["offloaded_gb"] is None
    # and the update did something
    assert max_diff(r["grpo"]["params"], r["grpo"]["after_step"]) > 1e-6


def test_checkpoints_weight_sync_and_export_ignore_the_wrappers(process_group, tmp_path):
    """A checkpoint saved without activation checkpointing loads into a checkpointed policy (and
    its AdamW state), whose weight sync and HF export use plain HF names."""
    from safetensors.torch import load_file

    from spmd_rl.distributed.activation_checkpoint import apply_ac
    from spmd_rl.distributed.compile import wrap_decoder_blocks
    from spmd_rl.distributed.parallelize import apply_fsdp
    from spmd_rl.models import ModelArgs, build_model
    from spmd_rl.rollout.weight_sync import iter_full_tensors
    from spmd_rl.trainer.checkpoint import Checkpointer
    from spmd_rl.trainer.hf_export import export_model
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    root = tmp_path
    args = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=40, hidden_size=16,
                     intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, attention_bias=True)
    mesh = init_device_mesh("cpu", (1,))
    inputs = build_scoring_inputs([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], "cpu")

    def policy(seed: int, ac: bool):
        model = PolicyModel(build_model(None, args=args, seed=seed))
        apply_ac(model, "full" if ac else "none")
        model = apply_fsdp(model, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        (-model(inputs)[0].sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return model, optimizer

    def full(model):
        return {k: v.full_tensor() for k, v in get_model_state_dict(model).items()}

    plain, plain_opt = policy(seed=0, ac=False)
    ckpt = Checkpointer(root / "ckpt_run", 0)
    path = ckpt.save(1, {"actor": (plain, plain_opt)}, {"step": 1})
    wrapped, wrapped_opt = policy(seed=1, ac=True)  # different weights, names with the wrapper
    assert any("_checkpoint_wrapped_module." in k for k, _ in wrapped.named_parameters())
    ckpt.load(path, {"actor": (wrapped, wrapped_opt)})
    a, b = full(plain), full(wrapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # DCP names carry no wrapper
    moments = [(plain_opt.state[p]["exp_avg"].full_tensor(), wrapped_opt.state[q]["exp_avg"].full_tensor())
               for p, q in zip(plain.parameters(), wrapped.parameters())]
    assert all(torch.equal(x, y) for x, y in moments)

    # Weight sync yields HF names whatever the wrappers.
    synced = dict(iter_full_tensors(wrapped.decoder))
    assert synced.keys() == dict(build_model(None, args=args, seed=0).named_parameters()).keys()
    # Blocks compile in place: no name changes at all (nothing compiles until a forward runs).
    compiled = PolicyModel(build_model(None, args=args, seed=0))
    wrap_decoder_blocks(compiled, compile=True, activation_checkpointing=True)
    assert not any("_orig_mod" in k for k, _ in compiled.named_parameters())
    assert get_model_state_dict(compiled).keys() == get_model_state_dict(PolicyModel(build_model(None, args=args))).keys()

    # The HF export of the checkpointed policy is a plain HF folder with the loaded weights.
    class NoTokenizer:
        eos_token_id, bos_token_id, pad_token_id = 2, None, None

        def save_pretrained(self, path):
            pass

    export_model(wrapped.decoder, NoTokenizer(), root / "hf_ac", 0)
    exported = {}
    for file in sorted((root / "hf_ac").glob("*.safetensors")):
        exported.update(load_file(file))
    decoder_state = {k.removeprefix("decoder."): v for k, v in a.items()}
    assert exported and all(torch.equal(exported[k], decoder_state[k]) for k in exported)  # HF names only
    reloaded = dict(build_model(str(root / "hf_ac")).named_parameters())
    assert reloaded.keys() == synced.keys()
    assert all(torch.equal(p, decoder_state[k]) for k, p in reloaded.items())


def _have_cxx() -> bool:
    return shutil.which("gcc") is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile's CPU backend (inductor) needs a C++ compiler: no gcc/c++ found")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager_forward_and_backward(checkpointing):
    """Padded rows ([B, T], one graph per block) keep the compile short; the packed path differs
    only in the attention call, which graph-breaks and runs eagerly."""
    import copy

    from spmd_rl.distributed.compile import wrap_decoder_blocks
    from spmd_rl.models import ModelArgs, build_model

    args = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=40, hidden_size=16,
                     intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, attention_bias=True)
    eager = build_model(None, args=args, seed=0)
    compiled = wrap_decoder_blocks(copy.deepcopy(eager), compile=True, activation_checkpointing=checkpointing)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(2, 7)
    weight = torch.linspace(-1, 1, 16)
    outs = []
    for model in (eager, compiled):
        hidden = model(ids, pos)
        (hidden * weight).sum().backward()
        outs.append(hidden.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:  # lm_head takes no part in the hidden states
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # it really compiled


def _compiled_tp_worker(rank: int, world_size: int, model: str, dp: int, out: str) -> None:
    import torch.distributed as dist

    from spmd_rl.distributed.compile import wrap_decoder_blocks
    from spmd_rl.distributed.parallel_dims import ParallelDims
    from spmd_rl.distributed.parallelize import apply_fsdp, apply_model_parallel
    from spmd_rl.models import build_model
    from spmd_rl.trainer.policy import PolicyModel
    from tests.distributed.test_model_parallel import MODELS, full

    dims = ParallelDims(1, dp, 1, world_size // dp, 1, world_size)
    mesh = dims.build_mesh("cpu")
    decoder = build_model(None, args=MODELS[model], seed=0)
    apply_model_parallel(decoder, dims, mesh)
    wrap_decoder_blocks(decoder, compile=True, activation_checkpointing=True)
    policy = apply_fsdp(PolicyModel(decoder), dims.fsdp_mesh(mesh))
    logprobs = _score_growing_batches(policy, mesh["dp"].get_local_rank(), dp)
    grads = {k.replace("_checkpoint_wrapped_module.", ""): full(p.grad) for k, p in policy.decoder.named_parameters()}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, logprobs)
    from torch._dynamo.utils import counters

    if rank == 0:  # {global sequence index: its logprobs} per call, from every rank
        merged = [{i: lp for rank_calls in gathered for i, lp in rank_calls[call].items()} for call in range(3)]
        torch.save({"logprobs": merged, "grads": grads, "graphs": counters["stats"]["unique_graphs"]}, out)


def _score_growing_batches(policy, dp_rank: int = 0, dp_size: int = 1) -> list[dict[int, torch.Tensor]]:
    """Three packed forward+backward calls on the first 3, 5 and 8 sequences (every dp rank
    takes its share): the second one recompiles each block with dynamic shapes. Gradients
    accumulate over the three; every response token has a fixed loss weight wherever it is
    scored, and the loss is scaled by dp_size against FSDP's mean over dp ranks. Returns
    ``{global sequence index: response logprobs}`` of each call."""
    from spmd_rl.trainer.policy import build_scoring_inputs
    from tests.distributed.test_model_parallel import global_batch

    prompts, responses = global_batch()
    calls = []
    for n in (3, 5, 8):
        mine = list(range(n))[dp_rank::dp_size]
        lp, _ = policy(build_scoring_inputs([prompts[i] for i in mine], [responses[i] for i in mine], "cpu"))
        weights = torch.cat([torch.tensor([((7 * i + t) % 5 - 2) / 2 for t in range(len(responses[i]))]) for i in mine])
        ((lp * weights).sum() * dp_size).backward()
        calls.append(dict(zip(mine, lp.detach().split([len(responses[i]) for i in mine]))))
    return calls


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile's CPU backend (inductor) needs a C++ compiler: no gcc/c++ found")
@pytest.mark.parametrize("model,dp", [("untied", 1), ("qwen3", 1), ("moe", 1), ("untied", 2)],
                         ids=["tp2-untied", "tp2-qwen3", "tp2-moe", "dp2_tp2-untied"])
def test_compiled_tensor_parallel_blocks_match_one_eager_process(tmp_path, model, dp):
    """tp=2 (and dp_shard=2 x tp=2) with compiled, checkpointed blocks over changing batch shapes
    equals one eager process. With DTensor ops in the blocks, the dynamic-shape recompile of the
    backward recursed forever in torch 2.13, and the embedding's async DTensor output reached the
    first compiled block as a leaf (no embedding gradient): blocks and embedding now compute on
    local shards."""
    from spmd_rl.models import build_model
    from spmd_rl.trainer.policy import PolicyModel
    from tests.distributed.test_model_parallel import MODELS

    out = tmp_path / "out.pt"
    run_on_ranks(_compiled_tp_worker, 2 * dp, model, dp, str(out))
    got = torch.load(out, weights_only=True)
    assert got["graphs"] >= 2  # the blocks really compiled, and recompiled for a new shape
    reference = PolicyModel(build_model(None, args=MODELS[model], seed=0))
    for got_call, ref_call in zip(got["logprobs"], _score_growing_batches(reference), strict=True):
        assert got_call.keys() == ref_call.keys()
        for i, ref_lp in ref_call.items():
            torch.testing.assert_close(got_call[i], ref_lp, rtol=1e-5, atol=3e-6)
    for name, p in reference.decoder.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bad_wrapping_requests():
    from spmd_rl.distributed.activation_checkpoint import apply_ac
    from spmd_rl.distributed.compile import apply_compile

    with pytest.raises(ValueError, match=r"^activation checkpointing mode 'selective' is not one of none, full$"):
        apply_ac(torch.nn.Linear(2, 2), "selective")
    with pytest.raises(UserError, match=r"^Linear has no decoder blocks that spmd-rl can find \(model.layers or "
                       r"_no_split_modules\) to checkpoint: set \*.activation_checkpointing=false for this model$"):
        apply_ac(torch.nn.Linear(2, 2), "full")
    with pytest.raises(UserError, match=r"^Linear has no decoder blocks that spmd-rl can find \(model.layers or "
                       r"_no_split_modules\) to compile: set model.compile=false for this model$"):
        apply_compile(torch.nn.Linear(2, 2))
