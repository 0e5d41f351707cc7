"""Host offload of parameters and optimizer state: bit-exact round trips, device copies released,
host buffers reused, FSDP2's flat shard and DTensor view kept together.

On this CPU-only machine the compute device and the host are both the CPU: ``HostOffload`` still
copies into separate host buffers, so the whole path runs; "released" is checked on the storages
themselves (a weak reference to each original storage expires).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from spmd_rl.trainer.offload import HostOffload

torch.set_num_threads(1)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))  # 6 + 2 + 2 + 1 = 11 parameters


def adam_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_tensors(optimizer):
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def snapshot(model, optimizer):
    return [p.detach().clone() for p in model.parameters()] + [t.clone() for t in state_tensors(optimizer)]


def assert_bit_exact(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def weak_refs(tensors):
    return [StorageWeakRef(t.untyped_storage()) for t in tensors]


def test_plain_model_and_adam_state_round_trip_bit_exact_and_release_device_copies():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    model = tiny_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    adam_step(model, optimizer, x)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
    ref_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # own copies: load_state_dict would alias
    before = snapshot(model, optimizer)
    params = list(model.parameters())
    device_refs = weak_refs(params + state_tensors(optimizer))

    offload = HostOffload([model], [optimizer], device="cpu", host_device="cpu")
    moved = offload.offload()
    # 11 fp32 parameters (44 B) + exp_avg and exp_avg_sq (88 B) + 4 step counters on the CPU (16 B)
    assert moved == 44 + 88 + 16
    assert offload.offloaded and offload.host_bytes() == 148
    gc.collect()
    assert all(r.expired() for r in device_refs), "a device copy is still alive after offload()"
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * 4  # same Parameter objects
    assert_bit_exact(snapshot(model, optimizer), before)  # the model now reads the host buffers
    host_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + state_tensors(optimizer)}

    assert offload.reload() == 148
    assert not offload.offloaded
    reloaded_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + state_tensors(optimizer)}
    assert not reloaded_ptrs & host_ptrs  # fresh device tensors, not the host buffers
    assert_bit_exact(snapshot(model, optimizer), before)
    assert offload.host_bytes() == 148  # host buffers kept for the next step

    # The next offload writes into the same host buffers.
    offload.offload()
    assert {t.untyped_storage().data_ptr() for t in list(model.parameters()) + state_tensors(optimizer)} == host_ptrs
    offload.reload()

    # Training continues exactly as without the round trips.
    adam_step(model, optimizer, x)
    adam_step(reference, ref_opt, x)
    assert_bit_exact(snapshot(model, optimizer), snapshot(reference, ref_opt))


def test_frozen_model_is_copied_to_the_host_once():
    model = tiny_mlp().requires_grad_(False)  # a reference model: its values never change
    before = [p.clone() for p in model.parameters()]
    offload = HostOffload([model], device="cpu", frozen=True)
    assert offload.offload() == 44  # the first time, the host buffers are filled
    for _ in range(2):
        assert offload.reload() == 44
        assert offload.offload() == 0  # then only the device copies are dropped
        assert_bit_exact(list(model.parameters()), before)


def test_params_only_or_optimizer_only():
    model = tiny_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    adam_step(model, optimizer, torch.ones(2, 3))
    assert HostOffload([model], [], device="cpu").offload() == 44
    assert HostOffload([], [optimizer], device="cpu").offload() == 88 + 16
    assert not HostOffload([], [], device="cpu").active


def test_fsdp2_flat_shard_and_dtensor_view_move_together(process_group):
    from spmd_rl.distributed.parallelize import apply_fsdp
    from spmd_rl.models import ModelArgs, build_model
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs
    from torch.distributed.device_mesh import init_device_mesh

    args = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=37, hidden_size=16,
                     intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                     attention_bias=True)
    inputs = build_scoring_inputs([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], "cpu")
    mesh = init_device_mesh("cpu", (1,))

    def build():
        policy = apply_fsdp(PolicyModel(build_model(None, args=args, seed=0)), mesh)
        return policy, torch.optim.AdamW(policy.parameters(), lr=1e-2)

    def step(policy, optimizer):
        logprobs, _ = policy(inputs)
        (-logprobs.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fsdp_params(policy):
        from spmd_rl.trainer.offload import _fsdp_params
        return _fsdp_params(policy)

    policy, optimizer = build()
    reference, ref_opt = build()
    # Offload before the first forward (FSDP not lazily initialised yet) and after a step.
    offload = HostOffload([policy], [optimizer], device="cpu")
    offload.offload()
    offload.reload()
    step(policy, optimizer)
    step(reference, ref_opt)
    before = snapshot(policy, optimizer)
    records = fsdp_params(policy)
    assert len(records) == sum(1 for _ in policy.parameters())  # every parameter is FSDP-managed
    flat_refs = weak_refs([r._sharded_param_data for r in records] + [p._local_tensor for p in policy.parameters()])
    state_refs = weak_refs([t._local_tensor for t in state_tensors(optimizer) if hasattr(t, "_local_tensor")])
    assert state_refs  # exp_avg / exp_avg_sq are DTensors

    moved = offload.offload()
    n = sum(p.numel() for p in policy.parameters())
    assert moved == 4 * n + 8 * n + 4 * len(records)  # fp32 shards, two moments, step counters
    gc.collect()
    assert all(r.expired() for r in flat_refs + state_refs)
    for record in records:  # FSDP all-gathers from _sharded_param_data: the DTensor must view the same storage
        assert record.sharded_param._local_tensor.untyped_storage().data_ptr() == \
            record._sharded_param_data.untyped_storage().data_ptr()
    offload.reload()
    for record in records:
        assert record.sharded_param._local_tensor.untyped_storage().data_ptr() == \
            record._sharded_param_data.untyped_storage().data_ptr()
    assert_bit_exact(snapshot(policy, optimizer), before)

    step(policy, optimizer)  # gathers from the reloaded shards
    step(reference, ref_opt)
    assert_bit_exact(snapshot(policy, optimizer), snapshot(reference, ref_opt))


def test_bad_calls_raise_one_line_errors():
    model = tiny_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"host_device must be a CPU device \(host memory\), got meta; valid: cpu"):
        HostOffload([model], device="cpu", host_device="meta")
    offload = HostOffload([model], [optimizer], device="cpu")
    with pytest.raises(ValueError, match=r"reload\(\) called without offload\(\)"):
        offload.reload()
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"still has a gradient: offload after optimizer.zero_grad\(set_to_none=True\)"):
        offload.offload()
    optimizer.zero_grad(set_to_none=True)
    offload.offload()
    with pytest.raises(ValueError, match=r"offload\(\) called twice"):
        offload.offload()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_frees_device_memory_into_pinned_buffers():
    model = nn.Linear(1024, 1024, bias=False).cuda()  # 4 MiB of fp32 weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    adam_step(model, optimizer, torch.ones(2, 1024, device="cuda"))
    before = snapshot(model, optimizer)
    offload = HostOffload([model], [optimizer], device="cuda")
    allocated = torch.cuda.memory_allocated()
    offload.offload()
    assert allocated - torch.cuda.memory_allocated() >= 3 * 4 * 1024 * 1024  # weights + two moments
    assert all(b.is_pinned() for b in offload._buffers.values())
    offload.reload()
    assert_bit_exact(snapshot(model, optimizer), before)
