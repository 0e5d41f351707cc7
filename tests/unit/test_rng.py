"""RNG state capture/restore: every global generator continues exactly after a restore."""

import random

import numpy as np
import torch

from spmd_rl.trainer.rng import capture_rng_state, restore_rng_state

torch.set_num_threads(1)


def draws():
    return torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)]


def test_restore_continues_every_generator_through_a_weights_only_file(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    draws()  # move away from the seeded start
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = draws()
    draws()  # diverge further
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = draws()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
