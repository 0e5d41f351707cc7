"""The RL loop of DESIGN.md: every rank runs :meth:`PPOTrainer.train_step` on its own prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from spmd_rl.algorithms.advantages import get_advantage_estimator
from spmd_rl.config import Config, save_config
from spmd_rl.distributed.collectives import all_reduce_sum, reduce_metrics
from spmd_rl.observability.progress import progress_bar
from spmd_rl.observability.timing import PhaseTimer
from spmd_rl.rollout.types import SamplingParams
from spmd_rl.rollout.weight_sync import sync_weights
from spmd_rl.trainer.actor import compute_logprobs, update_policy
from spmd_rl.trainer.batch import RolloutBatch, build_rollout_batch
from spmd_rl.trainer.components import RunComponents, build_components
from spmd_rl.trainer.rollout_metrics import compute_rollout_metrics
from spmd_rl.trainer.validation import run_validation


class PPOTrainer:
    """Owns the components of a run and steps them; ``fit()`` is the whole run."""

    def __init__(self, cfg: Config, components: RunComponents):
        self.cfg = cfg
        self.c = components
        self.step = 0
        self.timer = PhaseTimer(components.device)
        self.estimator = get_advantage_estimator(cfg.algorithm.adv_estimator)

    @classmethod
    def build(cls, cfg: Config, dims, mesh, device) -> "PPOTrainer":
        trainer = cls(cfg, build_components(cfg, dims, mesh, device))
        if trainer.c.rank == 0:
            save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml")
        trainer.maybe_resume()
        return trainer

    def fit(self) -> dict[str, float]:
        cfg, c = self.cfg, self.c
        last: dict[str, float] = {}
        if cfg.trainer.val_before_train and c.val_dataset is not None and self.step == 0:
            c.logger.log(0, self.validate())
        if self.step >= c.total_steps:
            c.log(f"already at step {self.step} of trainer.total_steps={c.total_steps}: nothing to train "
                  "(raise trainer.total_steps or use trainer.resume=never)")
        bar = progress_bar(c.total_steps, self.step, "train", c.rank == 0 and cfg.logging.progress_bar)
        while self.step < c.total_steps:
            self.step += 1
            with self.timer("step"):
                metrics = self.train_step()
                if self._due(cfg.trainer.save_freq) or (self.step == c.total_steps and cfg.trainer.save_at_end):
                    with self.timer("save_checkpoint"):
                        self.save()
            if c.val_dataset is not None and (self._due(cfg.trainer.test_freq) or
                                              (self.step == c.total_steps and cfg.trainer.val_at_end)):
                with self.timer("testing"):
                    metrics.update(self.validate())
            metrics.update(self.timer.pop())
            metrics["perf/throughput"] = metrics.pop("_tokens") / metrics["timing_s/step"]
            c.logger.log(self.step, metrics)
            bar.update()
            last = metrics
        bar.close()
        if cfg.trainer.save_hf_at_end:
            c.export_hf(Path(cfg.trainer.run_dir) / "hf")
        return last

    def train_step(self) -> dict[str, float]:
        """One RL step: generate, score, old logprobs, advantages, PPO update; dp-reduced metrics."""
        cfg, c, timer = self.cfg, self.c, self.timer
        prompts = c.next_prompts()  # this rank's share of the global prompt batch
        with timer("update_weights"):
            c.engine.wake_up()
            sync_weights(c.policy.decoder, c.engine)
        with timer("gen"):
            completions = c.engine.generate([p.prompt_ids for p in prompts], self.sampling(),
                                            seeds=c.rollout_seeds(self.step, prompts))
            c.engine.sleep()  # free generation memory before training
        batch = build_rollout_batch([p.prompt_ids for p in prompts], completions)
        with timer("reward"):
            reward_metrics = c.score(batch, prompts)
        with timer("old_log_prob"):
            batch.old_logprobs = compute_logprobs(c.policy, batch, cfg.rollout.temperature,
                                                  cfg.actor.ppo_micro_batch_size_per_gpu, c.device)
        with timer("adv"):
            batch.advantages, batch.returns = self.compute_advantages(batch)
        with timer("update_actor"):
            actor_metrics = update_policy(
                c.policy, c.optimizer, c.scheduler, batch, cfg.actor, temperature=cfg.rollout.temperature,
                mini_batch_size=cfg.actor.ppo_mini_batch_size * cfg.rollout.n // c.dp_size,
                dp_group=c.dp_group, dp_size=c.dp_size, device=c.device)
        metrics = {**reward_metrics, **actor_metrics, **compute_rollout_metrics(batch)}
        metrics = reduce_metrics(metrics, c.dp_group)
        metrics["_tokens"] = all_reduce_sum(self._num_tokens(batch), c.dp_group) / c.dp_size
        return metrics

    def compute_advantages(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        alg = self.cfg.algorithm
        return self.estimator(batch.token_rewards(), batch.response_mask, group_index=batch.group_index,
                              gamma=alg.gamma, lam=alg.lam, norm_by_std=alg.norm_adv_by_std_in_grpo,
                              dp_group=self.c.dp_group)

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=self.cfg.data.max_response_length,
                              stop_token_ids=self.c.stop_token_ids)

    def validate(self) -> dict[str, float]:
        return run_validation(self.cfg, self.c)

    def save(self) -> None:
        state = {"step": self.step, "sampler": self.c.sampler.state_dict(),
                 "scheduler": self.c.scheduler.state_dict()}
        self.c.checkpointer.save(self.step, self.c.policy, self.c.optimizer, state)

    def maybe_resume(self) -> None:
        path = self.c.checkpointer.resolve(self.cfg.trainer.resume)
        if path is None:
            return
        state = self.c.checkpointer.load(path, self.c.policy, self.c.optimizer)
        self.step = state["step"]
        self.c.sampler.load_state_dict(state["sampler"])
        self.c.scheduler.load_state_dict(state["scheduler"])
        self.c.log(f"resumed from {path} at step {self.step}")

    def _due(self, freq: int) -> bool:
        return freq > 0 and self.step % freq == 0

    @staticmethod
    def _num_tokens(batch: RolloutBatch) -> int:
        return sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))

