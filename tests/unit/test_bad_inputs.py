"""Bad user input and what the user sees: one ``UserError`` line that names the fix, or (for a
reward function that misbehaves on one sample) a score of 0 that is counted instead of a crash.

Each case here is one row of the bad-input table; rows already covered elsewhere (tests/unit/
test_config.py, test_data.py, test_models.py, test_rewards.py, test_failures.py, test_export.py,
test_rollout.py, test_trackers.py) are not repeated. The entry-point contract (exit code 2 and
exactly one ``error:`` line on stderr, no traceback) is checked on three rows in subprocesses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from spmd_rl.config import Config, check_world_size, load_config, parse_cli
from spmd_rl.data.parquet_io import write_rows
from spmd_rl.data.rl_dataset import RLDataset
from spmd_rl.data.sampler import PromptSampler
from spmd_rl.data.tokenizer import build_char_tokenizer, load_tokenizer
from spmd_rl.distributed.init import resolve_device
from spmd_rl.distributed.parallel_dims import ParallelDims
from spmd_rl.distributed.parallelize import apply_model_parallel
from spmd_rl.distributed.tensor_parallel import check_tp_divisible
from spmd_rl.distributed.ulysses import check_heads_divisible
from spmd_rl.errors import UserError
from spmd_rl.models import ModelArgs, build_model, load_state_dict, native_args, read_hf_config
from spmd_rl.rewards.custom import load_custom_reward_function
from spmd_rl.rewards.scorer import RewardScorer
from spmd_rl.rollout.engine import build_engine
from spmd_rl.trainer.checkpoint import Checkpointer
from spmd_rl.trainer.components import _engine_model, engine_options

torch.set_num_threads(1)

REQUIRED = ["model.path=/m", "data.train_files=[t.parquet]"]
SECTIONS = "model, data, rollout, algorithm, actor, critic, ref, reward, trainer, parallel, logging, profiler"
MIXTRAL = {"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1}
LLAMA = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2}


def addition_row(a: int, b: int) -> dict:
    """One prompt in verl's schema, as spmd_rl.data.prepare.addition writes it."""
    return {"data_source": "synthetic/addition", "prompt": [{"role": "user", "content": f"{a}+{b}="}],
            "ability": "arithmetic", "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": "train", "index": a}}


@pytest.fixture(scope="module")
def char_tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chartok")
    build_char_tokenizer(str(out))
    return out


# ------------------------------------------------------------------------------ triggers
# Each takes (tmp_path, char tokenizer folder) and must raise a UserError.


def config(*overrides: str) -> Callable[[Path, Path], object]:
    return lambda tmp, tok: load_config(Config, None, [*REQUIRED, *overrides])


def config_file(text: str) -> Callable[[Path, Path], object]:
    def trigger(tmp: Path, tok: Path):
        (tmp / "c.yaml").write_text(text)
        return load_config(Config, str(tmp / "c.yaml"), [])
    return trigger


def world_size_rule(tmp: Path, tok: Path):
    cfg = load_config(Config, None, [*REQUIRED, "data.train_batch_size=8", "actor.ppo_mini_batch_size=4"])
    check_world_size(cfg, 8)  # ppo_mini_batch_size 4 cannot split over 8 ranks; the batch of 8 can


def memory_plan_over_budget(tmp: Path, tok: Path):
    from spmd_rl.models import build_model
    from spmd_rl.trainer.memory_plan import report_memory_plan

    cfg = load_config(Config, None, [*REQUIRED, "trainer.memory_limit_gb=0.000001"])
    args = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=64, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    report_memory_plan(cfg, build_model(None, args=args, seed=0), ParallelDims(1, 1, 1, 1, 1, 1),
                       torch.device("cpu"), lambda line: None)


def cuda_without_gpu(tmp: Path, tok: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        resolve_device("cuda")


def dataset(tmp: Path, tok: Path, **kwargs):
    path = write_rows([addition_row(a, 2 * a) for a in range(4)], tmp / "train.parquet")
    return RLDataset(str(path), load_tokenizer(str(tok)), **kwargs)


def sampler_resume_mismatch(tmp: Path, tok: Path):
    saved = PromptSampler(16, batch_size=4, dp_rank=0, dp_size=1, seed=0).state_dict()
    PromptSampler(16, batch_size=8, dp_rank=0, dp_size=1, seed=1).load_state_dict(saved)


def model_folder(config_text: str | None = None, files: tuple[str, ...] = ()) -> Callable[[Path, Path], object]:
    """A model folder holding ``config.json`` (when given) and empty ``files``; loads its weights."""
    def trigger(tmp: Path, tok: Path):
        folder = tmp / "model"
        folder.mkdir()
        if config_text is not None:
            (folder / "config.json").write_text(config_text)
        for name in files:
            (folder / name).write_text("{\"weight_map\": {\"lm_head.weight\": \"model-00002-of-00002.safetensors\"}}"
                                       if name.endswith(".json") else "")
        read_hf_config(folder)
        return load_state_dict(folder)
    return trigger


def checkpoint_folder(tmp: Path) -> Path:
    """A folder shaped like a DCP training checkpoint (its .metadata file)."""
    folder = tmp / "step_000002"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    return folder


def config_only_folder(tmp: Path, model_type: str) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def resume_not_a_checkpoint(tmp: Path, tok: Path):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    checkpointer = Checkpointer.__new__(Checkpointer)  # resolve() needs no process group
    checkpointer.root = tmp / "run" / "checkpoints"
    checkpointer.resolve(str(tmp / "run"))


def prompt_cell_not_messages(tmp: Path, tok: Path):
    rows = [{**addition_row(a, a), "prompt": a} for a in range(2)]
    RLDataset(str(write_rows(rows, tmp / "train.parquet")), load_tokenizer(str(tok)))


def unknown_architecture(tmp: Path, tok: Path):
    from spmd_rl.models.generic import GenericCausalLM

    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    GenericCausalLM.from_pretrained(tmp / "model")


def no_tokenizer_files(tmp: Path, tok: Path):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps({**LLAMA, "model_type": "qwen2"}))
    load_tokenizer(str(tmp / "model"))


def reward_file_not_python(tmp: Path, tok: Path):
    (tmp / "reward.txt").write_text("def compute_score(*a):\n    return 1.0\n")
    load_custom_reward_function(str(tmp / "reward.txt"))


# id -> (trigger, the one line the user sees; {tmp} is the test's tmp_path, {tok} the tokenizer folder)
CASES: dict[str, tuple[Callable[[Path, Path], object], str]] = {
    # ---- config: keys and types
    "unknown-section-no-close-match": (config("optim.lr=1e-5"), f"optim: unknown key (valid: {SECTIONS})"),
    "list-given-as-string": (config("data.train_files=t.parquet"),
                             "data.train_files: expected list[str], got str ('t.parquet')"),
    "empty-value-for-float": (config("actor.optim.lr="), "actor.optim.lr: expected float, got str ('')"),
    "null-for-int": (config("data.train_batch_size=null"), "data.train_batch_size: expected int, got null (None)"),
    "choice-not-listed": (config("trainer.device=gpu"), "trainer.device: 'gpu' is not one of 'auto', 'cpu', 'cuda'"),
    "override-without-equals": (config("rollout.n"), "override 'rollout.n' is not of the form section.key=value"),
    "config-flag-without-path": (lambda tmp, tok: parse_cli(["--config"]), "--config needs a path: --config configs/x.yaml"),
    "yaml-not-a-mapping": (config_file("- a\n- b\n"), "config file {tmp}/c.yaml must hold a mapping of sections, got list"),
    "yaml-syntax-error": (config_file("model: [unclosed\n"),
                          "config file {tmp}/c.yaml is not valid YAML: while parsing a flow sequence"),
    # ---- config: value ranges and cross-section rules
    "train-batch-size-zero": (config("data.train_batch_size=0"), "data.train_batch_size: must be > 0"),
    "top-k-zero": (config("rollout.top_k=0"), "rollout.top_k: must be -1 (off) or > 0"),
    "betas-not-two-numbers": (config("actor.optim.betas=[0.9]"),
                              "actor.optim.betas: must be two numbers, e.g. [0.9, 0.999]"),
    "gamma-above-one": (config("algorithm.gamma=1.5"), "algorithm.gamma: must be in [0, 1]"),
    "dual-clip-c-not-above-one": (config("actor.clip_ratio_c=1"), "actor.clip_ratio_c: must be > 1 (dual-clip lower bound)"),
    "reward-timeout-negative": (config("reward.timeout_s=-1"), "reward.timeout_s: must be >= 0 (0 = no limit)"),
    "profiler-step-zero": (config("profiler.steps=[0]"), "profiler.steps: [0]: steps are counted from 1"),
    "grpo-passk-with-n-1": (config("algorithm.adv_estimator=grpo_passk", "rollout.n=1"),
                            "rollout.n: algorithm.adv_estimator=grpo_passk compares the n responses of a prompt: "
                            "set rollout.n >= 2"),
    "critic-mini-batch-not-dividing": (config("algorithm.adv_estimator=gae", "critic.enable=true",
                                              "critic.ppo_mini_batch_size=3"),
                                       "critic.ppo_mini_batch_size: 3 must divide data.train_batch_size=8"),
    "mini-batch-not-divisible-by-dp": (world_size_rule,
                                       "actor.ppo_mini_batch_size: 4 must be divisible by the data-parallel size 8"),
    # ---- resources and parallelism
    "cuda-without-gpu": (cuda_without_gpu, "trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu or auto"),
    "dp-shard-not-matching-world": (lambda tmp, tok: ParallelDims(1, 2, 1, 1, 1, world_size=1),
                                    "Invalid parallel dims: dp_replicate(1) * dp_shard(2) * sp(1) * tp(1) * pp(1) != "
                                    "WORLD_SIZE(1): change parallel.* or the number of processes (torchrun --nproc-per-node)"),
    "keep-last-k-negative": (config("trainer.keep_last_k=-1"), "trainer.keep_last_k: must be >= 0 (0 = keep every checkpoint)"),
    "padded-with-sequence-parallel": (config("actor.use_remove_padding=false", "parallel.sp=2"),
                                      "actor.use_remove_padding: false (right-padded batches) needs parallel.sp=1, "
                                      "got 2: sequence parallelism splits packed rows; set actor.use_remove_padding=true"),
    "token-budget-negative": (config("actor.max_tokens_per_micro_batch=-1"),
                              "actor.max_tokens_per_micro_batch: must be >= 0 (0 = off: micro_batch_size_per_device "
                              "sequences per micro-batch)"),
    "memory-plan-cannot-fit": (memory_plan_over_budget,
                               "memory plan: training needs 0.04 GiB per rank > 0.00 GiB (trainer.memory_limit_gb=1e-06); "
                               "biggest item: activations 0.04 GiB per micro-batch: lower actor.micro_batch_size_per_device "
                               "or set actor.activation_checkpointing=true (sized for full-length sequences; "
                               "trainer.memory_limit_gb sets the budget)"),
    "min-p-out-of-range": (config("rollout.min_p=1.5"), "rollout.min_p: must be in [0, 1] (0 = off)"),
    "sglang-with-tensor-parallel": (lambda tmp, tok: engine_options(load_config(Config, None, [*REQUIRED, "rollout.engine=sglang"]),
                                                                    None, SimpleNamespace(tp=2)),
                                    "rollout.engine=sglang with parallel.tp=2 is not supported: SGLang runs one engine "
                                    "per tensor-parallel group; use rollout.engine=native or vllm, or parallel.tp=1"),
    "pipeline-without-megatron": (config("parallel.pp=2"),
                                  "parallel.pp: 2: pipeline parallelism belongs to the Megatron backend; set "
                                  "actor.strategy=megatron (pip install -e '.[megatron]') or parallel.pp=1 (tp, sp and "
                                  "dp_shard scale the FSDP backend)"),
    "experts-without-megatron": (config("parallel.ep=2"),
                                 "parallel.ep: 2: expert parallelism belongs to the Megatron backend; set "
                                 "actor.strategy=megatron or parallel.ep=1 (under FSDP the experts are sharded with "
                                 "the rest of the model)"),
    "ep-not-dividing-dp": (lambda tmp, tok: ParallelDims(1, 3, 1, 2, 1, world_size=6, ep=2),
                           "Invalid parallel dims: ep(2) must divide dp = dp_replicate(1) * dp_shard(3) = 3 (sp=1, "
                           "tp=2, pp=1, WORLD_SIZE=6): experts are split over data-parallel ranks; change parallel.ep"),
    "tp-not-dividing-heads": (lambda tmp, tok: check_tp_divisible(SimpleNamespace(
                                  num_heads=14, num_kv_heads=2, intermediate_size=4864, num_layers=24, moe_layers=()), 4),
                              "parallel.tp=4 must divide the model's attention heads 14, key/value heads 2: "
                              "choose a tp that divides them"),
    "sp-not-dividing-heads": (lambda tmp, tok: check_heads_divisible(14, 2, 4),
                              "parallel.sp=4 must divide the 14 query heads per tensor-parallel rank and divide "
                              "or be a multiple of the 2 key/value heads: choose another parallel.sp"),
    "tp-on-generic-model": (lambda tmp, tok: apply_model_parallel(torch.nn.Linear(2, 2), SimpleNamespace(tp=2, sp=1), None),
                            "parallel.tp=2 / parallel.sp=1 need the native decoder, got Linear: use a "
                            "Llama/Qwen/Mistral model or parallel.tp=1 parallel.sp=1"),
    "native-engine-for-generic-model": (lambda tmp, tok: build_engine("native", torch.nn.Linear(2, 2)),
                                        "rollout engine 'native' needs the native decoder, got Linear; "
                                        "use rollout engine 'hf' for this model"),
    # ---- data
    "prompt-key-not-a-column": (lambda tmp, tok: dataset(tmp, tok, prompt_key="question"),
                                "data file {tmp}/train.parquet lacks required column(s) question; found columns: "
                                "data_source, prompt, ability, reward_model, extra_info (set data.prompt_key / "
                                "data.response_key or rewrite the file in verl's schema)"),
    "batch-larger-than-dataset": (lambda tmp, tok: PromptSampler(16, batch_size=32, dp_rank=0, dp_size=1),
                                  "data.train_batch_size=32 exceeds the 16 prompts in the dataset: "
                                  "lower data.train_batch_size or add data"),
    "batch-smaller-than-dp": (lambda tmp, tok: PromptSampler(16, batch_size=2, dp_rank=0, dp_size=4),
                              "data.train_batch_size=2 is smaller than the data-parallel size 4: "
                              "every rank needs at least one prompt per step"),
    "prompt-cell-not-messages": (prompt_cell_not_messages,
                                 "a prompt cell must be a string or a list of {{'role': ..., 'content': ...}} messages, "
                                 "got int 0: fix the prompt column (data.prompt_key) of the parquet file"),
    "chat-template-file-missing": (lambda tmp, tok: load_tokenizer(str(tok), chat_template="missing.jinja"),
                                   "data.chat_template=missing.jinja is neither a Jinja template nor an existing file"),
    # ---- model folder
    "model-path-is-a-file": (lambda tmp, tok: read_hf_config(tok / "tokenizer.json"),
                             "model folder {tok}/tokenizer.json is not a folder; pass a local HF model folder "
                             "(config.json + *.safetensors)"),
    "config-json-not-json": (model_folder("{oops"),
                             "{tmp}/model/config.json is not valid JSON (Expecting property name enclosed in "
                             "double quotes: line 1 column 2 (char 1)); re-export the model folder"),
    "only-pytorch-bin-weights": (model_folder("{}", files=("pytorch_model.bin",)),
                                 "no weights in {tmp}/model: expected model.safetensors or model.safetensors.index.json "
                                 "(found pytorch_model*.bin: convert it to safetensors)"),
    "index-lists-missing-shard": (model_folder("{}", files=("model.safetensors.index.json",)),
                                  "{tmp}/model/model.safetensors.index.json lists shards that are missing: "
                                  "model-00002-of-00002.safetensors; copy the complete model folder"),
    "unknown-architecture": (unknown_architecture, "transformers cannot load a causal LM from {tmp}/model: The checkpoint "
                             "you are trying to load has model type `not_a_model` but Transformers does not recognize "
                             "this architecture"),
    "no-tokenizer-files": (no_tokenizer_files, "{tmp}/model has no tokenizer files (tokenizer.json / vocab): copy them "
                           "next to the model or set model.tokenizer_path"),
    "unsupported-activation": (lambda tmp, tok: ModelArgs.from_hf_config({**LLAMA, "hidden_act": "gelu"}),
                               "hidden_act 'gelu' is not supported by the native decoder (only 'silu'); use GenericCausalLM"),
    "llama3-rope-missing-keys": (lambda tmp, tok: ModelArgs.from_hf_config(
                                     {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                                 "rope scaling 'llama3' needs ['low_freq_factor', 'high_freq_factor'] in config.json"),
    "model-path-is-a-checkpoint": (lambda tmp, tok: read_hf_config(checkpoint_folder(tmp)),
                                   "{tmp}/step_000002/config.json not found; a model folder must hold an HF config.json "
                                   "({tmp}/step_000002 is a training checkpoint: export it with python -m spmd_rl.export "
                                   "{tmp}/step_000002 OUT_DIR and use OUT_DIR)"),
    "tokenizer-path-is-a-checkpoint": (lambda tmp, tok: load_tokenizer(str(checkpoint_folder(tmp))),
                                       "cannot load a tokenizer from {tmp}/step_000002 ({tmp}/step_000002 is a training "
                                       "checkpoint: export it with python -m spmd_rl.export {tmp}/step_000002 OUT_DIR "
                                       "and use OUT_DIR)"),
    "random-init-of-a-generic-model": (lambda tmp, tok: native_args(str(config_only_folder(tmp, "gpt2"))),
                                       "model.random_init=true needs the native decoder (llama, mistral, mixtral, qwen2, "
                                       "qwen3, qwen3_moe); {tmp}/model is model_type 'gpt2' (model.implementation=auto): "
                                       "load its weights instead (model.random_init=false)"),
    "hf-engine-for-a-native-moe-decoder": (lambda tmp, tok: _engine_model(
                                               SimpleNamespace(rollout=SimpleNamespace(engine="hf")),
                                               build_model(None, args=ModelArgs.from_hf_config(MIXTRAL)), "cpu",
                                               torch.float32),
                                           "rollout.engine=hf cannot take the native mixtral decoder's per-expert "
                                           "weights (transformers fuses them): use rollout.engine=native, or "
                                           "model.implementation=generic to train the transformers model itself"),
    # ---- checkpoint / resume
    "resume-not-a-checkpoint": (resume_not_a_checkpoint,
                                "trainer.resume={tmp}/run is not a checkpoint folder (no trainer_state.pt): "
                                "use auto, never, or a checkpoints/step_XXXXXX folder"),
    "resume-with-other-batch-size": (sampler_resume_mismatch,
                                     "cannot resume the prompt sampler (batch_size: checkpoint 4 vs now 8, seed: "
                                     "checkpoint 0 vs now 1): use the same data files, data.train_batch_size, "
                                     "data.seed and data.shuffle as the checkpointed run"),
    # ---- reward
    "reward-file-not-python": (reward_file_not_python,
                               "reward.custom_function.path: cannot import {tmp}/reward.txt as Python; give a .py file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error(case, tmp_path, char_tok_dir):
    trigger, expected = CASES[case]
    with pytest.raises(UserError) as info:
        trigger(tmp_path, char_tok_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message == expected.format(tmp=tmp_path, tok=char_tok_dir)


def test_reward_that_returns_garbage_scores_zero_and_is_counted(capsys):
    """A string or NaN from the user's function is one bad sample, not a crash of the run."""
    def reward(data_source, solution_str, ground_truth, extra_info=None):
        return {"text": "high", "nan": math.nan}.get(solution_str, 1.0)

    scorer = RewardScorer(reward, timeout_s=0)
    result = scorer.score(["d"] * 3, ["ok", "text", "nan"], ["1"] * 3)
    assert result.scores == [1.0, 0.0, 0.0]
    assert (scorer.num_errors, scorer.num_timeouts) == (2, 0)
    assert capsys.readouterr().err == (
        "warning: reward function failed on a sample of data_source 'd' (ValueError: could not convert string "
        "to float: 'high'); it scores 0.0, and further failures are only counted\n")


# ------------------------------------------------------------------ entry point, in subprocesses


def test_train_entry_point_exits_2_with_one_error_line(tmp_path, char_tok_dir):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    base = [f"model.path={char_tok_dir}", f"data.train_files=[{tmp_path / 'train.parquet'}]", "trainer.device=cpu",
            f"trainer.run_dir={tmp_path / 'run'}"]
    runs = {  # argv -> the stderr the user sees
        ("--config", str(tmp_path / "bad.yaml")):
            f"error: config file {tmp_path / 'bad.yaml'} is not valid YAML: while parsing a flow sequence\n",
        (*base, "parallel.dp_shard=2"):
            "error: Invalid parallel dims: dp_replicate(1) * dp_shard(2) * sp(1) * tp(1) * pp(1) != WORLD_SIZE(1): "
            "change parallel.* or the number of processes (torchrun --nproc-per-node)\n",
        tuple(base):
            f"error: data file {tmp_path / 'train.parquet'} does not exist: check the path "
            f"(relative paths resolve from {tmp_path})\n",
    }
    # All three at once: each pays the import time of torch and transformers.
    procs = {argv: subprocess.Popen([sys.executable, "-m", "spmd_rl.train", *argv], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in runs}
    for argv, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert (proc.returncode, stderr) == (2, runs[argv]), argv
        assert "Traceback" not in stdout
    assert not (tmp_path / "run").exists()  # nothing written before the input was checked
