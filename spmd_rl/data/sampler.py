"""Prompt sampler: one global batch per step, each data-parallel rank taking its own slice.

Every rank draws the same per-epoch permutation (seeded by ``seed + epoch``) and cuts the same
global batch from it, so no communication is needed to agree on the batch, the ranks' shards
are disjoint and together cover it, and a run resumed with a different dp size continues with
exactly the same global batches.
"""

from __future__ import annotations

import numpy as np

from spmd_rl.errors import UserError


def rank_share(num_items: int, mini_batch_size: int, dp_rank: int, dp_size: int) -> list[int]:
    """Positions ``[0, num_items)`` that rank ``dp_rank`` holds: its slice of every mini-batch.

    Each rank cuts its rows into mini-batches locally, so for mini-batch k to be the same set of
    prompts at any dp size, rank r must hold the r-th slice of every global mini-batch (not one
    contiguous slice of the whole batch). Every chunk's size must be a multiple of ``dp_size``."""
    share = []
    for start in range(0, num_items, mini_batch_size):
        size = min(mini_batch_size, num_items - start)
        if size % dp_size:
            raise ValueError(f"a mini-batch of {size} prompts does not split over {dp_size} ranks")
        per_rank = size // dp_size
        share.extend(range(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank))
    return share


class PromptSampler:
    """Stateful, seedable sampler sharded by dp rank.

    Every step, one global batch of ``batch_size`` prompt indices is drawn from a per-epoch
    permutation (seed + epoch); rank r takes its slice of every ``mini_batch_size`` chunk of it
    (:func:`rank_share`), so ranks are disjoint, cover the global batch, and each PPO mini-batch
    holds the same prompts whatever the dp size. The last partial batch of an epoch is dropped.
    """

    def __init__(
        self, num_items: int, *, batch_size: int, dp_rank: int, dp_size: int, seed: int = 0, shuffle: bool = True,
        mini_batch_size: int | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if batch_size < dp_size:
            raise UserError(
                f"data.train_batch_size={batch_size} is smaller than the data-parallel size {dp_size}: "
                "every rank needs at least one prompt per step"
            )
        self.steps_per_epoch = num_items // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"data.train_batch_size={batch_size} exceeds the {num_items} prompts in the dataset: "
                "lower data.train_batch_size or add data"
            )
        self.num_items, self.batch_size = num_items, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.mini_batch_size = mini_batch_size or batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.position = 0  # step within the epoch, i.e. the next global batch to hand out
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        """This epoch's order of all items, cached until the epoch changes."""
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                self._perm = np.random.default_rng(self.seed + self.epoch).permutation(self.num_items)
            else:
                self._perm = np.arange(self.num_items)
            self._perm_epoch = self.epoch
        return self._perm

    def global_indices(self) -> list[int]:
        """All ranks' indices for the next step, without advancing."""
        start = self.position * self.batch_size
        return self._permutation()[start : start + self.batch_size].tolist()

    def next_indices(self) -> list[int]:
        """This rank's indices for the next step; rolls into the next epoch automatically."""
        batch = self.global_indices()
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return [batch[i] for i in rank_share(self.batch_size, self.mini_batch_size, self.dp_rank, self.dp_size)]

    def state_dict(self) -> dict:
        """Position plus the settings that must match on resume for the order to be the same."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where ``state`` was taken; the dp layout may differ from the saved run."""
        saved = {k: state[k] for k in ("num_items", "batch_size", "seed", "shuffle")}
        current = {k: getattr(self, k) for k in saved}
        if saved != current:
            diff = ", ".join(f"{k}: checkpoint {saved[k]} vs now {current[k]}" for k in saved if saved[k] != current[k])
            raise UserError(
                f"cannot resume the prompt sampler ({diff}): use the same data files, "
                "data.train_batch_size, data.seed and data.shuffle as the checkpointed run"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
