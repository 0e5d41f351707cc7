"""Supervised fine-tuning: ``torchrun -m spmd_rl.sft --config x.yaml key=value ...``.

Packed (padding-free) next-token loss on the response tokens only, FSDP2 over dp, and an HF
folder (config.json + safetensors + tokenizer) written at the end for the RL run to start from."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spmd_rl.config import SFTConfig, load_config, parse_cli, rule_errors, save_config
from spmd_rl.data.sampler import PromptSampler
from spmd_rl.data.sft_dataset import SFTDataset, SFTExample
from spmd_rl.data.tokenizer import load_tokenizer
from spmd_rl.distributed.collectives import all_reduce_sum
from spmd_rl.distributed.compile import wrap_decoder_blocks
from spmd_rl.distributed.init import destroy_distributed, exit_worker, init_parallel, resolve_device
from spmd_rl.distributed.parallel_dims import ParallelDims
from spmd_rl.distributed.parallelize import apply_fsdp, apply_model_parallel
from spmd_rl.errors import exit_on_user_error
from spmd_rl.models import build_model, native_args
from spmd_rl.observability.logger import build_metrics_logger
from spmd_rl.observability.progress import progress_bar
from spmd_rl.trainer.hf_export import export_model
from spmd_rl.trainer.optim import build_lr_scheduler, build_optimizer, optimizer_step
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs


def compute_sft_loss(policy: PolicyModel, examples: list[SFTExample], global_tokens: float, device) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the response tokens divided by the global token count.

    The loss mask of an example covers a contiguous tail (response + EOS), so the example splits
    into a prompt and a "response" exactly like an RL sequence."""
    prompts, responses = [], []
    for ex in examples:
        start = ex.loss_mask.index(1)
        prompts.append(ex.input_ids[:start])
        responses.append(ex.input_ids[start:])
    logprobs, _ = policy(build_scoring_inputs(prompts, responses, device))
    return -logprobs.sum() / global_tokens, logprobs.numel()


def train_sft(cfg: SFTConfig, dims: ParallelDims, mesh, device: torch.device) -> dict[str, float]:
    rank, dp_size = dist.get_rank(), dims.dp_size
    rule_errors([(cfg.data.train_batch_size % (dp_size * cfg.data.micro_batch_size_per_gpu) == 0,
                  "data.train_batch_size", f"{cfg.data.train_batch_size} must be divisible by dp ({dp_size}) x "
                  f"data.micro_batch_size_per_gpu ({cfg.data.micro_batch_size_per_gpu})")])
    tokenizer = load_tokenizer(cfg.model.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code,
                               chat_template=cfg.data.chat_template or None)
    dataset = SFTDataset(cfg.data.train_files, tokenizer, prompt_key=cfg.data.prompt_key,
                         response_key=cfg.data.response_key, max_length=cfg.data.max_length)
    sampler = PromptSampler(len(dataset), batch_size=cfg.data.train_batch_size, dp_rank=mesh["dp"].get_local_rank(),
                            dp_size=dp_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    total_steps = cfg.trainer.total_steps or cfg.trainer.total_epochs * sampler.steps_per_epoch
    if cfg.model.random_init:
        args = native_args(cfg.model.path, cfg.model.implementation)
        decoder = build_model(None, args=args, device=device, seed=cfg.trainer.seed)
    else:
        decoder = build_model(cfg.model.path, device=device, prefer_native=cfg.model.implementation != "generic")
    sp_group = apply_model_parallel(decoder, dims, mesh)
    wrap_decoder_blocks(decoder, compile=cfg.model.compile, activation_checkpointing=False)
    policy = PolicyModel(decoder, sp_group=sp_group)
    bf16 = cfg.model.uses_bf16(device.type)
    apply_fsdp(policy, dims.fsdp_mesh(mesh), param_dtype=torch.bfloat16 if bf16 else None)
    optimizer = build_optimizer(policy, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps)
    logger = build_metrics_logger(cfg.trainer.output_dir, cfg, rank)
    if rank == 0:
        save_config(cfg, Path(cfg.trainer.output_dir) / "config.yaml")
        print(f"SFT on {len(dataset)} examples, {total_steps} steps, dp={dp_size}", flush=True)
    bar = progress_bar(total_steps, 0, "sft", rank == 0 and cfg.logging.progress_bar)
    metrics: dict[str, float] = {}
    for step in range(1, total_steps + 1):
        examples = [dataset[i] for i in sampler.next_indices()]
        local_tokens = sum(sum(ex.loss_mask) for ex in examples)
        global_tokens = all_reduce_sum(local_tokens, mesh["dp"].get_group())
        loss_sum = 0.0
        micro = cfg.data.micro_batch_size_per_gpu
        for start in range(0, len(examples), micro):
            loss, _ = compute_sft_loss(policy, examples[start:start + micro], global_tokens, device)
            (loss * dp_size).backward()  # FSDP averages gradients over dp
            loss_sum += loss.item()
        grad_norm = optimizer_step(policy, optimizer, scheduler, cfg.optim.grad_clip)
        bar.update()
        if step % cfg.trainer.log_freq == 0 or step == total_steps:
            loss_total = all_reduce_sum(loss_sum, mesh["dp"].get_group())
            metrics = {"train/loss": loss_total, "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0]}
            logger.log(step, metrics)
    bar.close()
    logger.close()
    export_model(policy.decoder, tokenizer, Path(cfg.trainer.output_dir) / "model", rank,
                 source_dir=cfg.model.path)
    return metrics


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, float]:
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(SFTConfig, path, overrides)
    device = resolve_device(cfg.trainer.device)
    try:
        dims, mesh = init_parallel(cfg.parallel, device)
        torch.manual_seed(cfg.trainer.seed)
        return train_sft(cfg, dims, mesh, device)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
    exit_worker(0)
