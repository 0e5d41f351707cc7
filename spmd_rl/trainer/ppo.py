"""The RL loop of DESIGN.md: every rank runs :meth:`PPOTrainer.train_step` on its own prompts.

One step = rollout (generate, score, optional DAPO filtering and ReMax baselines) then
:meth:`PPOTrainer.learn` (old/ref logprobs, values, rewards with KL, advantages, critic and
actor updates). ``learn`` takes any scored batch, which is what the invariance tests drive.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from spmd_rl.algorithms.advantages import get_advantage_estimator
from spmd_rl.algorithms.kl import apply_kl_penalty
from spmd_rl.algorithms.masked import masked_mean, masked_var
from spmd_rl.config import Config, save_config
from spmd_rl.config_loader import config_to_dict
from spmd_rl.data.sampler import rank_share
from spmd_rl.distributed.collectives import all_reduce_sum, reduce_metrics
from spmd_rl.durable_files import write_text_atomic
from spmd_rl.errors import UserError
from spmd_rl.export import checkpoint_state_names
from spmd_rl.models.megatron.checkpoint import check_optimizer_layout, check_resume_layout
from spmd_rl.observability.memory import memory_metrics
from spmd_rl.observability.profiler import StepProfiler
from spmd_rl.observability.progress import progress_bar
from spmd_rl.observability.timing import PhaseTimer
from spmd_rl.preemption import PREEMPTED_FILE_ENV
from spmd_rl.rollout.types import SamplingParams
from spmd_rl.trainer.batch import RolloutBatch, build_rollout_batch, concat_batches
from spmd_rl.trainer.components import RunComponents, build_components
from spmd_rl.trainer.dynamic_sampling import informative_groups, take_global_groups
from spmd_rl.trainer.minibatch import balance_groups
from spmd_rl.trainer.offload import HostOffload, build_host_offload
from spmd_rl.trainer.perf_metrics import mfu_metrics, step_flops
from spmd_rl.trainer.rollout_metrics import compute_rollout_metrics
from spmd_rl.trainer.validation import run_validation, shared_sampling_options


class PPOTrainer:
    """Owns the components of a run and steps them; ``fit()`` is the whole run."""

    def __init__(self, cfg: Config, components: RunComponents):
        self.cfg = cfg
        self.c = components
        self.step = 0
        self.timer = PhaseTimer(components.device)
        self.profiler = StepProfiler(cfg.profiler, cfg.trainer.run_dir, components.rank, components.device)
        self.estimator = get_advantage_estimator(cfg.algorithm.adv_estimator)
        self.stop_requested = False  # set by SIGTERM (e.g. Slurm preemption)
        self.stop_requested_anywhere = False
        self.nonfinite_streak = 0  # consecutive RL steps with a skipped (NaN/Inf) optimizer step
        # Reward failures counted before a resume (global): the scorers count from 0 in this process.
        self.reward_counts_before = {"reward/errors": 0.0, "reward/timeouts": 0.0}

    @classmethod
    def build(cls, cfg: Config, dims, mesh, device) -> "PPOTrainer":
        trainer = cls(cfg, build_components(cfg, dims, mesh, device))
        if trainer.c.rank == 0:
            save_config(cfg, Path(cfg.trainer.run_dir) / "config.yaml")
        trainer.maybe_resume()
        return trainer

    def fit(self) -> dict[str, float]:
        try:
            return self._fit()
        finally:  # a crash still finishes the tracker runs and an open profiler capture
            self.profiler.close()
            self.c.logger.close()

    def _fit(self) -> dict[str, float]:
        cfg, c = self.cfg, self.c
        last: dict[str, float] = {}
        if cfg.trainer.val_before_train and c.val_dataset is not None and self.step == 0:
            c.logger.log(0, self.validate())
        if self.step >= c.total_steps:
            c.log(f"already at step {self.step} of trainer.total_steps={c.total_steps}: nothing to train "
                  "(raise trainer.total_steps or use trainer.resume=never)")
        bar = progress_bar(c.total_steps, self.step, "train", c.rank == 0 and cfg.logging.progress_bar)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        while self.step < c.total_steps:
            self.step += 1
            with self.profiler.step(self.step), self.timer("step"):
                metrics = self.train_step()
                self._count_nonfinite(metrics)  # before the save: its checkpoint carries this step's streak
                if self._due(cfg.trainer.save_freq) or (self.step == c.total_steps and cfg.trainer.save_at_end):
                    with self.timer("save_checkpoint"):
                        self.save()
                if self._due(cfg.trainer.save_hf_every) and not (self.step == c.total_steps and cfg.trainer.save_hf_at_end):
                    with self.timer("save_hf"):
                        c.export_hf(Path(cfg.trainer.run_dir) / "hf_steps" / f"step_{self.step:06d}")
            if c.val_dataset is not None and (self._due(cfg.trainer.test_freq) or
                                              (self.step == c.total_steps and cfg.trainer.val_at_end)):
                with self.timer("testing"):
                    metrics.update(self.validate())
            metrics.update(self.timer.pop())
            metrics["perf/throughput"] = metrics.pop("_tokens") / metrics["timing_s/step"]
            metrics.update(mfu_metrics(metrics, c.device))
            metrics.update(memory_metrics(c.device))
            c.logger.log(self.step, metrics)
            bar.update()
            last = metrics
            self._stop_if_nonfinite()
            if self._preempted():
                break
        bar.close()
        c.checkpointer.wait()  # an async save in flight is committed before the run ends
        if self.stop_requested_anywhere:
            return last
        if cfg.trainer.save_hf_at_end:
            c.export_hf(Path(cfg.trainer.run_dir) / "hf")
        return last

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout, then learn; dp-reduced metrics."""
        c, offload = self.c, self.host_offload
        with self.timer("update_weights"):
            if not offload.active:  # with offload the KV cache is allocated after it, below
                c.engine.wake_up()
            c.sync_engine()
        if offload.active:  # actor/critic.offload: the training state waits in host memory while generating
            with self.timer("offload"):
                moved = offload.offload()
            c.engine.wake_up()
        batch, rollout_metrics = self.rollout()
        rollout_metrics.update(engine_metrics(c.engine, c.dp_group))
        c.engine.sleep()  # free generation memory before training
        if offload.active:
            with self.timer("reload"):
                offload.reload()  # back on the device before the old logprobs
            rollout_metrics["perf/offloaded_gb"] = moved / 1024**3
        metrics = {**rollout_metrics, **self.learn(batch), **self.reward_counts()}
        # Per device: tp/sp ranks of a dp group process the same tokens, so divide by all ranks.
        metrics["_tokens"] = all_reduce_sum(self._num_tokens(batch), c.dp_group) / dist.get_world_size()
        metrics.update(step_flops(self.cfg, c, batch, actor_updated=self.actor_updates_now))
        return metrics

    @property
    def host_offload(self) -> HostOffload:
        """The actor's/critic's host-memory offload (``actor.offload``, ``critic.offload``), built on first use."""
        if getattr(self, "_host_offload", None) is None:
            self._host_offload = build_host_offload(self.cfg, self.c)
        return self._host_offload

    def rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        """Generate and score this rank's share of the batch.

        With ``algorithm.filter_groups`` (DAPO), groups with identical rewards are dropped and more
        prompts are generated until ``data.train_batch_size`` groups are kept over all ranks or
        ``max_num_gen_batches`` batches were generated."""
        cfg, c, timer = self.cfg, self.c, self.timer
        dynamic = cfg.algorithm.filter_groups
        target = cfg.data.train_batch_size
        kept: list[RolloutBatch] = []
        kept_order: list[tuple[int, int]] = []  # (generation batch, position in its global batch) per kept group
        positions = rank_share(c.sampler.batch_size, c.sampler.mini_batch_size, c.dp_rank, c.dp_size)
        num_gen, num_generated_groups, num_kept = 0, 0.0, 0.0
        while True:
            num_gen += 1
            batch = self.generate_and_score(c.next_prompts(), generation=num_gen)
            if not dynamic.enable:
                return batch, {}
            metric = batch.raw_scores if dynamic.metric == "acc" else batch.scores
            keep = informative_groups(metric, batch.group_index)
            kept.append(batch.select(keep.nonzero().squeeze(-1).tolist()))
            kept_order += [(num_gen, positions[g]) for g in torch.unique_consecutive(kept[-1].group_index).tolist()]
            num_generated_groups += all_reduce_sum(batch.num_groups, c.dp_group)
            num_kept += all_reduce_sum(kept[-1].num_groups if len(kept[-1]) else 0, c.dp_group)
            if num_kept >= target or 0 < dynamic.max_num_gen_batches <= num_gen:
                break
        usable = min(target, int(num_kept) // c.dp_size * c.dp_size)
        if usable == 0:
            raise UserError(f"dynamic sampling kept no group with differing rewards in {num_gen} generation "
                            "batches: every group was all-correct or all-wrong. Raise rollout.n or "
                            "algorithm.filter_groups.max_num_gen_batches, or use easier/harder data")
        if usable < target:
            c.log(f"step {self.step}: only {int(num_kept)} informative groups after {num_gen} generation batches; "
                  f"training on {usable} (raise algorithm.filter_groups.max_num_gen_batches to fill the batch)")
        batch = take_global_groups(concat_batches([b for b in kept if len(b)] or kept[:1]), usable,
                                   c.sampler.mini_batch_size, c.dp_group, c.dp_rank, c.dp_size, order=kept_order)
        return batch, {"train/num_gen_batches": float(num_gen), "train/num_groups": float(usable),
                       "train/kept_group_frac": num_kept / max(num_generated_groups, 1.0)}

    def generate_and_score(self, prompts, generation: int = 1) -> RolloutBatch:
        c, timer = self.c, self.timer
        with timer("gen"):
            completions = c.engine.generate([p.prompt_ids for p in prompts], self.sampling(),
                                            seeds=c.rollout_seeds(self.step, prompts, generation))
        batch = build_rollout_batch([p.prompt_ids for p in prompts], completions)
        with timer("reward"):
            c.score(batch, prompts)
        if self.cfg.algorithm.adv_estimator == "remax":
            with timer("gen_baseline"):
                batch.reward_baselines = self.greedy_baselines(prompts, len(batch) // len(prompts))
        return batch

    def greedy_baselines(self, prompts, n: int) -> torch.Tensor:
        """ReMax (Li et al. 2023, arXiv:2310.10505): the reward of each prompt's greedy response,
        repeated for its n sampled responses."""
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.cfg.data.max_response_length,
                                stop_token_ids=self.c.stop_token_ids, **shared_sampling_options(self.cfg.rollout))
        greedy = self.c.engine.generate([p.prompt_ids for p in prompts], params)
        scores, _ = self.c.shaped_scores(prompts, [g[0].token_ids for g in greedy])  # shaped like the samples
        return scores.repeat_interleave(n)

    def learn(self, batch: RolloutBatch) -> dict[str, float]:
        """Everything after scoring: logprobs, values, advantages, critic and actor updates."""
        cfg, c, timer = self.cfg, self.c, self.timer
        balance = {}
        if cfg.trainer.balance_batch:  # whole groups move within each mini-batch: the update is unchanged
            with timer("balance"):
                rows = c.sampler.mini_batch_size * cfg.rollout.n // c.dp_size  # one layout chunk
                batch, balance = balance_groups(batch, rows, c.dp_group, c.dp_rank, c.dp_size)
        with timer("old_log_prob"):
            batch.old_logprobs = c.logprobs(c.policy, batch)
        if c.ref is not None:
            with timer("ref"):
                batch.ref_logprobs = c.logprobs(c.ref, batch)
        if c.critic is not None:
            with timer("values"):
                batch.values = c.values(batch, self.critic_micro)
        with timer("adv"):
            batch.token_rewards, metrics = self.token_rewards(batch)
            metrics.update(balance)
            batch.advantages, batch.returns = self.compute_advantages(batch)
        if c.critic is not None:
            with timer("update_critic"):
                metrics.update(c.update_critic(batch, mini_batch_size=self.critic_mini * cfg.rollout.n // c.dp_size,
                                               micro_batch_size=self.critic_micro))
        if self.actor_updates_now:
            with timer("update_actor"):
                metrics.update(c.update_actor(batch, torch.Generator().manual_seed(c.seed * 1_000_003 + self.step)))
        metrics.update(compute_rollout_metrics(batch, c.dp_group))
        metrics = reduce_metrics(metrics, c.dp_group)
        if c.critic is not None:
            metrics.update(self.critic_metrics(batch))
        return metrics

    def token_rewards(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scores on the last token, minus ``beta * KL(old || ref)`` per token when
        ``algorithm.use_kl_in_reward`` (verl's apply_kl_penalty; the controller sees the global KL)."""
        scores = batch.token_scores()
        if self.c.kl_ctrl is None:
            return scores, {}
        alg, c = self.cfg.algorithm, self.c
        beta = c.kl_ctrl.value
        rewards, mean_kl = apply_kl_penalty(scores, batch.old_logprobs, batch.ref_logprobs, batch.response_mask,
                                            beta, alg.kl_penalty)
        global_rows = all_reduce_sum(len(batch), c.dp_group)
        current_kl = all_reduce_sum(float(mean_kl) * len(batch), c.dp_group) / global_rows
        c.kl_ctrl.update(current_kl, int(global_rows))
        return rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}

    def compute_advantages(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        alg = self.cfg.algorithm
        return self.estimator(batch.token_rewards, batch.response_mask, values=batch.values,
                              group_index=batch.group_index, reward_baselines=batch.reward_baselines,
                              gamma=alg.gamma, lam=alg.lam, norm_by_std=alg.norm_adv_by_std_in_grpo,
                              dp_group=self.c.dp_group)

    def critic_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Global (all-rank) value statistics; explained variance 1 - Var(R - V) / Var(R)."""
        mask, group = batch.response_mask, self.c.dp_group
        values, returns = batch.values, batch.returns
        explained = 1 - masked_var(returns - values, mask, dp_group=group) / (masked_var(returns, mask, dp_group=group) + 1e-8)
        return {"critic/vf_explained_var": explained.item(),
                "critic/values/mean": masked_mean(values, mask, dp_group=group).item(),
                "critic/returns/mean": masked_mean(returns, mask, dp_group=group).item()}

    @property
    def actor_updates_now(self) -> bool:
        """False during critic warmup."""
        return self.c.critic is None or self.step > self.cfg.critic.warmup_steps

    @property
    def critic_mini(self) -> int:
        return self.cfg.critic.ppo_mini_batch_size or self.cfg.actor.ppo_mini_batch_size

    @property
    def critic_micro(self) -> int:
        return self.cfg.critic.micro_batch_size_per_device or self.cfg.actor.micro_batch_size_per_device

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, temperature=r.temperature, max_new_tokens=self.cfg.data.max_response_length,
                              stop_token_ids=self.c.stop_token_ids, **shared_sampling_options(r))

    def validate(self) -> dict[str, float]:
        return run_validation(self.cfg, self.c)

    def reward_counts(self) -> dict[str, float]:
        """Cumulative reward failures of the whole run, all ranks (a collective)."""
        c, before = self.c, self.reward_counts_before
        return {"reward/errors": before["reward/errors"] + all_reduce_sum(c.scorer.num_errors, c.dp_group),
                "reward/timeouts": before["reward/timeouts"] + all_reduce_sum(c.scorer.num_timeouts, c.dp_group)}

    def save(self) -> None:
        c = self.c
        state = {"step": self.step, "sampler": c.sampler.state_dict(), "scheduler": c.scheduler.state_dict(),
                 "config": config_to_dict(self.cfg),  # the resolved config that produced this state
                 "reward_counts": self.reward_counts(), "nonfinite_streak": self.nonfinite_streak}
        if c.critic_scheduler is not None:
            state["critic_scheduler"] = c.critic_scheduler.state_dict()
        if c.kl_ctrl is not None:
            state["kl_ctrl"] = c.kl_ctrl.state_dict()
        c.checkpointer.save(self.step, c.trained(), state)

    def maybe_resume(self) -> None:
        c = self.c
        path = c.checkpointer.resolve(self.cfg.trainer.resume)
        if path is None:
            c.logger.start_at(0)
            return
        cfg, saved = self.cfg, checkpoint_state_names(path)
        check_resume_layout(saved, str(path), strategy=cfg.actor.strategy, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                            ep=cfg.parallel.ep)
        if cfg.actor.strategy == "megatron":
            sharded = {"actor": cfg.actor.megatron.use_distributed_optimizer}
            if cfg.critic.enable:
                sharded["critic"] = cfg.critic.megatron.use_distributed_optimizer
            check_optimizer_layout(saved, str(path), sharded=sharded)
        state = c.checkpointer.load(path, c.trained())
        self.step = state["step"]
        c.sampler.load_state_dict(state["sampler"])
        c.scheduler.load_state_dict(state["scheduler"])
        if c.critic_scheduler is not None:
            c.critic_scheduler.load_state_dict(state["critic_scheduler"])
        if c.kl_ctrl is not None and "kl_ctrl" in state:
            c.kl_ctrl.load_state_dict(state["kl_ctrl"])
        self.reward_counts_before = dict(state.get("reward_counts", self.reward_counts_before))
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        c.logger.start_at(self.step)
        c.log(f"resumed from {path} at step {self.step}")

    def _count_nonfinite(self, metrics: dict[str, float]) -> None:
        """RL steps in a row whose update skipped a NaN/Inf gradient (the metrics are global, so
        every rank counts the same)."""
        skipped = metrics.get("actor/nonfinite_skips", 0.0) + metrics.get("critic/nonfinite_skips", 0.0)
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0

    def _stop_if_nonfinite(self) -> None:
        """Stop after trainer.max_nonfinite_steps such steps in a row (every rank at the same step)."""
        if self.nonfinite_streak >= self.cfg.trainer.max_nonfinite_steps:
            latest = self.c.checkpointer.latest()
            raise UserError(f"{self.nonfinite_streak} steps in a row had NaN/Inf gradients (up to step {self.step}); "
                            f"last checkpoint: {latest or 'none'}. Lower actor.optim.lr, check the reward for "
                            "NaN/huge values, or raise trainer.max_nonfinite_steps")

    def _on_sigterm(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then all ranks agree to stop and save together.
        self.stop_requested = True

    def _preempted(self) -> bool:
        """True on every rank once any rank got SIGTERM (one tiny all-reduce per step); the
        current step is then saved so that ``trainer.resume=auto`` continues from it."""
        self.stop_requested_anywhere = all_reduce_sum(float(self.stop_requested), None) > 0
        if self.stop_requested_anywhere:
            self.c.checkpointer.wait()
            if not self.c.checkpointer.has(self.step):
                self.save()
                self.c.checkpointer.wait()  # committed before we say so
            self.c.log(f"SIGTERM: saved step {self.step} to {self.c.checkpointer.root}; exiting "
                       "(rerun with trainer.resume=auto to continue)")
            marker = os.environ.get(PREEMPTED_FILE_ENV)
            if marker and self.c.rank == 0:  # tells `python -m spmd_rl.preemption` the save is complete
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(marker, f"saved step {self.step} to {self.c.checkpointer.root}\n")
        return self.stop_requested_anywhere

    def _due(self, freq: int) -> bool:
        return freq > 0 and self.step % freq == 0

    @staticmethod
    def _num_tokens(batch: RolloutBatch) -> int:
        return sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))


def engine_metrics(engine, dp_group) -> dict[str, float]:
    """``rollout/*`` counters of the engine's last generate (native engine): per-rank numbers, averaged over dp."""
    stats = getattr(engine, "last_stats", None) or {}
    keys = ("num_preemptions", "prefix_hit_blocks", "peak_blocks_used", "generated_tokens", "num_steps", "graph_steps")
    return reduce_metrics({f"rollout/{k}": float(stats[k]) for k in keys if k in stats}, dp_group)
