"""Every random number generator a rank uses, as a checkpointable dict of tensors and ints.

The loop itself draws sampling seeds from (run seed, step, generation batch, prompt index)
(:func:`sampling_seed`), so a resumed run needs no RNG state to generate the same rollouts; the global generators are saved anyway so that user
code (reward functions, custom losses) that draws from them also continues where it stopped.
Everything is stored as tensors/ints so that ``torch.load(weights_only=True)`` can read it.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def sampling_seed(run_seed: int, step: int, generation: int, prompt_index: int) -> int:
    """A 31-bit seed (what every engine accepts) hashed from the four ints.

    A hash, not a linear mix: with ``seed + step * K + index`` prompt ``i + K`` at one step reused
    prompt ``i``'s seed of the step before. ``generation`` tells apart the batches one step
    generates (DAPO's refills), which can draw the same prompt again after an epoch boundary and
    must not sample the very same responses for it."""
    key = f"{run_seed}/{step}/{generation}/{prompt_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 2**31


def capture_rng_state() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
