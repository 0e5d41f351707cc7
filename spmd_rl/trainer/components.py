"""Build every component of an RL run from its config sections, in one place."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from spmd_rl.config import Config
from spmd_rl.data.rl_dataset import PromptSample, RLDataset
from spmd_rl.data.sampler import PromptSampler
from spmd_rl.data.tokenizer import load_tokenizer
from spmd_rl.distributed.parallelize import apply_fsdp
from spmd_rl.models import build_model
from spmd_rl.observability.logger import MetricsLogger
from spmd_rl.rewards import compute_score
from spmd_rl.rewards.custom import load_custom_reward_function
from spmd_rl.rewards.scorer import RewardScorer
from spmd_rl.rollout.engine import RolloutEngine, build_engine
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.checkpoint import Checkpointer
from spmd_rl.trainer.hf_export import export_model
from spmd_rl.trainer.optim import build_lr_scheduler, build_optimizer
from spmd_rl.trainer.policy import PolicyModel


@dataclass
class RunComponents:
    """What one rank holds during a run."""

    rank: int
    dp_size: int
    dp_group: object
    device: torch.device
    tokenizer: object
    dataset: RLDataset
    val_dataset: RLDataset | None
    sampler: PromptSampler
    policy: PolicyModel  # FSDP-sharded over dp
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: RolloutEngine
    scorer: RewardScorer
    logger: MetricsLogger
    checkpointer: Checkpointer
    total_steps: int
    stop_token_ids: list[int]
    seed: int
    log: Callable[[str], None]

    def next_prompts(self) -> list[PromptSample]:
        return [self.dataset[i] for i in self.sampler.next_indices()]

    def rollout_seeds(self, step: int, prompts: list[PromptSample]) -> list[int]:
        """A sampling seed per prompt from (run seed, step, prompt index): resumable and
        independent of how prompts are spread over ranks."""
        return [(self.seed * 1_000_003 + step * 100_003 + p.index) % 2**31 for p in prompts]

    def score(self, batch: RolloutBatch, prompts: list[PromptSample]) -> dict[str, float]:
        """Fill ``batch.scores`` and return reward metrics."""
        n = len(batch) // len(prompts)
        owners = [prompts[i // n] for i in range(len(batch))]
        texts = self.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        result = self.scorer.score([p.data_source for p in owners], texts, [p.ground_truth for p in owners],
                                   [p.extra_info for p in owners])
        batch.scores = torch.tensor(result.scores, dtype=torch.float32)
        return {
            "critic/score/mean": batch.scores.mean().item(),
            "critic/score/max": batch.scores.max().item(),
            "critic/score/min": batch.scores.min().item(),
            "reward/num_errors": float(self.scorer.num_errors),
        }

    def export_hf(self, out_dir: Path) -> None:
        export_model(self.policy.decoder, self.tokenizer, out_dir, self.rank)


def build_components(cfg: Config, dims, mesh, device: torch.device) -> RunComponents:
    rank = dist.get_rank()
    log = _rank0_print(rank)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code,
                               chat_template=cfg.data.chat_template or None)
    data = cfg.data
    dataset = RLDataset(data.train_files, tokenizer, prompt_key=data.prompt_key,
                        max_prompt_length=data.max_prompt_length,
                        filter_overlong_prompts=data.filter_overlong_prompts)
    val_dataset = None
    if data.val_files:
        val_dataset = RLDataset(data.val_files, tokenizer, prompt_key=data.prompt_key,
                                max_prompt_length=data.max_prompt_length,
                                filter_overlong_prompts=data.filter_overlong_prompts)
    dp_rank = mesh["dp"].get_local_rank()
    sampler = PromptSampler(len(dataset), batch_size=data.train_batch_size, dp_rank=dp_rank,
                            dp_size=dims.dp_size, seed=data.seed, shuffle=data.shuffle)
    total_steps = cfg.trainer.total_steps or cfg.trainer.total_epochs * sampler.steps_per_epoch

    decoder = build_model(cfg.model.path, device=device, dtype=torch.float32,
                          prefer_native=cfg.model.implementation != "generic", seed=cfg.trainer.seed)
    engine_dtype = torch.bfloat16 if device.type == "cuda" and cfg.model.dtype != "float32" else torch.float32
    engine_model = copy.deepcopy(decoder).to(engine_dtype).eval()
    engine = build_engine(cfg.rollout.engine, engine_model, max_num_seqs=cfg.rollout.max_num_seqs,
                          max_seq_len=data.max_prompt_length + data.max_response_length, device=device)
    policy = PolicyModel(decoder)
    param_dtype = torch.bfloat16 if device.type == "cuda" and cfg.model.dtype != "float32" else None
    apply_fsdp(policy, mesh["dp"], param_dtype=param_dtype)

    # Optimizer steps: one per mini-batch per PPO epoch.
    updates_per_step = cfg.actor.ppo_epochs * (data.train_batch_size // cfg.actor.ppo_mini_batch_size)
    optimizer = build_optimizer(policy, cfg.actor.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.actor.optim, total_steps * updates_per_step)
    reward_fn = compute_score
    if cfg.reward.custom_function.path:
        reward_fn = load_custom_reward_function(cfg.reward.custom_function.path, cfg.reward.custom_function.name)
    log(f"{len(dataset)} training prompts, {sampler.steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"dp={dims.dp_size}, device={device}")
    return RunComponents(
        rank=rank, dp_size=dims.dp_size, dp_group=mesh["dp"].get_group(), device=device, tokenizer=tokenizer,
        dataset=dataset, val_dataset=val_dataset, sampler=sampler, policy=policy, optimizer=optimizer,
        scheduler=scheduler, engine=engine, scorer=RewardScorer(reward_fn),
        logger=MetricsLogger(cfg.trainer.run_dir, cfg.logging.backends, enabled=rank == 0),
        checkpointer=Checkpointer(cfg.trainer.run_dir, rank), total_steps=total_steps,
        stop_token_ids=_stop_token_ids(tokenizer, decoder), seed=cfg.trainer.seed, log=log,
    )


def _stop_token_ids(tokenizer, decoder) -> list[int]:
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(getattr(decoder, "args", None), "eos_token_id", None)
    ids.update(model_eos if isinstance(model_eos, list) else [model_eos])
    return sorted(i for i in ids if i is not None)


def _rank0_print(rank: int) -> Callable[[str], None]:
    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)
    return log
