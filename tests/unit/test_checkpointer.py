"""Checkpointer bookkeeping on one gloo rank: pruning, re-saving a step, the ``latest`` fallback,
crash debris, async commit, and the one-line message for a checkpoint that does not fit the run."""

import os

import pytest
import torch

from spmd_rl.errors import UserError
from spmd_rl.trainer.checkpoint import Checkpointer

torch.set_num_threads(1)


def trained(value: float):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return {"actor": (model, optimizer)}


def names(ckpt: Checkpointer) -> list[str]:
    return [p.name for p in ckpt.complete()]


def loaded_value(ckpt: Checkpointer, path) -> float:
    target = trained(-1.0)
    ckpt.load(path, target)
    return target["actor"][0].weight[0, 0].item()


def test_keep_last_k_prunes_only_after_the_new_one_is_complete(process_group, tmp_path):
    ckpt = Checkpointer(tmp_path, 0, keep_last_k=2)
    for step in range(1, 6):
        ckpt.save(step, trained(step), {"step": step})
    assert names(ckpt) == ["step_000004", "step_000005"]
    assert (ckpt.root / "latest").read_text() == "step_000005"
    assert loaded_value(ckpt, ckpt.latest()) == 5.0


def test_keep_all_by_default(process_group, tmp_path):
    ckpt = Checkpointer(tmp_path, 0)
    for step in range(1, 4):
        ckpt.save(step, trained(step), {"step": step})
    assert names(ckpt) == ["step_000001", "step_000002", "step_000003"]


def test_resaving_a_step_replaces_it(process_group, tmp_path):
    """Resumed from an older checkpoint, the run saves step 2 again: the new state wins."""
    ckpt = Checkpointer(tmp_path, 0)
    ckpt.save(2, trained(2.0), {"step": 2})
    ckpt.save(2, trained(7.0), {"step": 2})
    assert names(ckpt) == ["step_000002"]
    assert not (ckpt.root / "step_000002.old").exists()
    assert loaded_value(ckpt, ckpt.latest()) == 7.0


def test_latest_falls_back_to_the_newest_complete_checkpoint(process_group, tmp_path):
    ckpt = Checkpointer(tmp_path, 0)
    ckpt.save(1, trained(1.0), {"step": 1})
    ckpt.save(2, trained(2.0), {"step": 2})
    # A crash between the two renames of a re-save of step 2: the old copy is aside, latest names step 2.
    os.replace(ckpt.root / "step_000002", ckpt.root / "step_000002.old")
    assert ckpt.latest() == ckpt.root / "step_000002.old"
    assert loaded_value(ckpt, ckpt.latest()) == 2.0
    (ckpt.root / "latest").unlink()
    assert ckpt.latest() == ckpt.root / "step_000002.old"


def test_crash_debris_is_ignored_then_removed(process_group, tmp_path):
    ckpt = Checkpointer(tmp_path, 0)
    ckpt.save(1, trained(1.0), {"step": 1})
    debris = ckpt.root / "step_000002.tmp"
    debris.mkdir()
    (debris / "trainer_state.pt").write_bytes(b"half")
    assert ckpt.latest() == ckpt.root / "step_000001"
    assert not ckpt.has(2)
    ckpt.save(3, trained(3.0), {"step": 3})
    assert not debris.exists()


def test_async_save_is_committed_by_wait_and_holds_the_state_at_save_time(process_group, tmp_path):
    ckpt = Checkpointer(tmp_path, 0, async_save=True)
    state = trained(1.0)
    ckpt.save(1, state, {"step": 1})
    with torch.no_grad():  # training goes on while the thread writes
        state["actor"][0].weight.fill_(99.0)
    ckpt.wait()
    assert ckpt.has(1) and (ckpt.root / "latest").read_text() == "step_000001"
    assert loaded_value(ckpt, ckpt.latest()) == 1.0
    ckpt.save(2, trained(2.0), {"step": 2})
    ckpt.save(3, trained(3.0), {"step": 3})  # waits for step 2 first
    assert ckpt.has(2) and not ckpt.has(3)
    ckpt.wait()
    assert names(ckpt) == ["step_000001", "step_000002", "step_000003"]


def test_checkpoint_of_other_models_is_one_line(process_group, tmp_path):
    ckpt = Checkpointer(tmp_path, 0)
    ckpt.save(1, trained(1.0), {"step": 1})
    with_critic = {**trained(0.0), "critic": trained(0.0)["actor"]}
    with pytest.raises(UserError) as info:
        ckpt.load(ckpt.latest(), with_critic)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {ckpt.root / 'step_000001'} does not match this run's models ['actor', 'critic']")
    assert "Missing key in checkpoint state_dict: critic/" in message
