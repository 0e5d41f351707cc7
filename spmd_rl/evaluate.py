"""Evaluate a model on held-out prompts: ``torchrun -m spmd_rl.evaluate --config x.yaml model.path=DIR``.

Reads the same YAML as training (``Config``), so a training config plus an exported HF folder is
enough; ``data.val_files`` is required and ``data.train_files`` is not. Every rank loads the plain
decoder into a generation engine (no optimizer, critic, reference, checkpoint or FSDP), samples
``rollout.val_n`` responses at ``rollout.val_temperature`` for its share of the prompts and scores
them with the run's reward; rank 0 writes

- ``<trainer.run_dir>/eval/generations.jsonl``: one object per response (index, data_source,
  prompt, response, score, answer, response_length), by prompt index;
- ``<trainer.run_dir>/eval/metrics.json``: ``mean@N``, ``maj@N``, ``best@N`` per data_source and
  overall (:mod:`spmd_rl.trainer.eval_metrics`), with the settings that produced them;
- ``<trainer.run_dir>/eval/config.yaml``: the resolved config;

and prints a table of the metrics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spmd_rl.config import Config, ConfigError, load_config, parse_cli, save_config
from spmd_rl.data.rl_dataset import RLDataset
from spmd_rl.data.tokenizer import load_tokenizer
from spmd_rl.distributed.collectives import all_reduce_sum
from spmd_rl.distributed.init import destroy_distributed, exit_worker, init_distributed, resolve_device
from spmd_rl.durable_files import write_text_atomic
from spmd_rl.errors import exit_on_user_error
from spmd_rl.models import build_model
from spmd_rl.rewards import build_scorer
from spmd_rl.rollout.engine import build_engine
from spmd_rl.trainer.components import engine_options, stop_token_ids
from spmd_rl.trainer.validation import ResponseRecord, generate_and_score, shard_prompts, summarize, validation_sampling


@dataclass
class EvalConfig(Config):
    """A training config read for evaluation: every rule of :class:`Config` except that
    ``data.train_files`` may be empty, plus ``data.val_files`` being required."""

    def __post_init__(self):
        problems = [] if self.data.val_files else ["data.val_files: is required: the parquet files to evaluate on"]
        try:
            super().__post_init__()
        except ConfigError as e:
            # Training's rules stay in force; only the one about training data does not apply.
            problems += [p for p in e.problems if not p.startswith("data.train_files:")]
        if problems:
            raise ConfigError(problems)


def evaluate(cfg: Config, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    """Generate, score and summarise on every rank; rank 0 writes the files. Returns the metrics."""
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code,
                               chat_template=cfg.data.chat_template or None)
    data = cfg.data
    dataset = RLDataset(data.val_files, tokenizer, prompt_key=data.prompt_key, max_prompt_length=data.max_prompt_length,
                        filter_overlong_prompts=data.filter_overlong_prompts)
    # The engine's dtype of training (model.dtype; auto: bf16 on GPU), loaded directly in it.
    dtype = torch.bfloat16 if cfg.model.uses_bf16(device.type) else torch.float32
    # the hf engine generates with transformers' generate: a transformers model for every architecture
    native = cfg.model.implementation != "generic" and cfg.rollout.engine != "hf"
    model = build_model(cfg.model.path, device=device, dtype=dtype, prefer_native=native,
                        seed=cfg.trainer.seed, trust_remote_code=cfg.model.trust_remote_code)
    model.requires_grad_(False).eval()
    engine = build_engine(cfg.rollout.engine, model, device=device, **engine_options(cfg, tokenizer))
    scorer = build_scorer(cfg.reward)
    params = validation_sampling(cfg, stop_token_ids(tokenizer, model))
    if rank == 0:
        print(f"evaluating {cfg.model.path} on {len(dataset)} prompts x {params.n} samples "
              f"(temperature {params.temperature}), {world_size} rank(s), device={device}", flush=True)

    records = generate_and_score(engine, tokenizer, scorer, shard_prompts(dataset, rank, world_size), params,
                                 cfg.trainer.seed)
    metrics, all_records = summarize(records, params.n, keep_records=True)
    metrics["reward/errors"] = all_reduce_sum(scorer.num_errors)
    metrics["reward/timeouts"] = all_reduce_sum(scorer.num_timeouts)
    if rank == 0:
        out = Path(cfg.trainer.run_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "generations.jsonl",
                      "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in all_records))
        summary = {"model": cfg.model.path, "val_files": list(data.val_files), "n": params.n,
                   "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                   "max_response_length": data.max_response_length, "seed": cfg.trainer.seed,
                   "num_prompts": len(dataset), "num_responses": len(all_records), "metrics": metrics}
        write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        save_config(cfg, out / "config.yaml")
        print(format_table(metrics, all_records, params.n), flush=True)
        print(f"wrote {out / 'generations.jsonl'} and {out / 'metrics.json'}", flush=True)
    return metrics


def format_table(metrics: dict[str, float], records: list[ResponseRecord], n: int) -> str:
    """One row per data_source and one for all of them: prompts, mean@N, maj@N, best@N."""
    prompts: dict[str, set[int]] = {}
    for r in records:
        prompts.setdefault(r.data_source, set()).add(r.index)
    rows = [(src, len(idx), *(metrics[f"val-core/{src}/acc/{m}@{n}"] for m in ("mean", "maj", "best")))
            for src, idx in sorted(prompts.items())]
    rows.append(("all", sum(len(i) for i in prompts.values()), metrics["val-core/acc"], metrics[f"val/acc/maj@{n}"],
                 metrics[f"val/acc/best@{n}"]))
    header = ("data_source", "prompts", f"mean@{n}", f"maj@{n}", f"best@{n}")
    width = max(len(header[0]), *(len(r[0]) for r in rows))
    lines = [f"{header[0]:<{width}}  {header[1]:>7}  " + "  ".join(f"{h:>8}" for h in header[2:])]
    lines += [f"{src:<{width}}  {k:>7}  " + "  ".join(f"{v:>8.4f}" for v in values) for src, k, *values in rows]
    lines.append(f"mean response length {metrics['val/response_length/mean']:.1f} tokens; "
                 f"reward errors {metrics['reward/errors']:.0f}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, float]:
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(EvalConfig, path, overrides)
    device = resolve_device(cfg.trainer.device)
    try:
        rank, world_size = init_distributed(device)
        if device.type == "cpu":  # the ranks of one machine share its cores
            torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        return evaluate(cfg, rank, world_size, device)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
    exit_worker(0)
