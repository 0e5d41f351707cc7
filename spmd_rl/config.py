"""The typed config tree of an RL run: one dataclass per YAML section.

Each field's docstring-comment is its documentation. Sections get only their own object
(``build_engine(cfg.rollout, ...)``), never the whole tree. Rules that involve one section live
in its ``__post_init__``; rules across sections in :class:`Config`'s; rules that need the world
size in :func:`check_world_size`. Every message names the key that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spmd_rl.config_loader import ConfigError, load_config, parse_cli, rule_errors, save_config

# Estimators that compare the responses of one prompt with each other.
GROUP_ESTIMATORS = ("grpo", "rloo", "grpo_passk")


@dataclass
class ModelConfig:
    path: str = ""
    """HF folder (config.json + safetensors) of the policy; for SFT with random_init, the
    config.json alone."""
    tokenizer_path: str = ""
    """Tokenizer folder; empty = model.path."""
    random_init: bool = False
    """Ignore weights in model.path and initialise randomly (seeded by trainer.seed) from its
    config.json: SFT from scratch, or an RL run of a random policy (native decoder, FSDP actor)."""
    implementation: Literal["auto", "native", "generic"] = "auto"
    """auto = the native decoder for Llama/Qwen2/Qwen3/Mistral, transformers' model otherwise."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of training and generation: bfloat16 = bf16 mixed precision (fp32 master
    parameters) and a bf16 engine; auto = bfloat16 on GPU, float32 on CPU."""
    trust_remote_code: bool = False
    """Allow custom model/tokenizer code from model.path (off by default)."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Fused logprob/entropy and packed attention: auto = the Triton kernels on CUDA, the torch
    references elsewhere; triton on CPU needs TRITON_INTERPRET=1 (tests only, slow)."""
    compile: bool = False
    """torch.compile each decoder block of the policy, reference and critic (per block, before
    FSDP); the rollout engine's copy stays eager. Needs a C++ compiler on CPU (gcc)."""

    def __post_init__(self):
        if not self.tokenizer_path:
            self.tokenizer_path = self.path

    def uses_bf16(self, device_type: str) -> bool:
        """Whether training computes (and the engine generates) in bf16 on ``device_type``."""
        return self.dtype == "bfloat16" or (self.dtype == "auto" and device_type == "cuda")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet files in verl's schema (data_source, prompt, ability, reward_model, extra_info)."""
    val_files: list[str] = field(default_factory=list)
    """Validation parquet files (same schema); empty = no validation."""
    prompt_key: str = "prompt"
    """Column with the chat messages of the prompt."""
    chat_template: str = ""
    """Jinja chat template (or a path to a .jinja file) for tokenizers that have none; empty = the tokenizer's."""
    max_prompt_length: int = 512
    """Prompts longer than this (in tokens, after the chat template) are filtered out."""
    max_response_length: int = 512
    """Maximum generated tokens per response."""
    train_batch_size: int = 8
    """Prompts per step over all ranks (each gets rollout.n responses)."""
    filter_overlong_prompts: bool = True
    """Drop (and count) prompts over max_prompt_length; False = fail on the first one."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by data.seed)."""
    seed: int = 0
    """Seed of the prompt order."""

    def __post_init__(self):
        rule_errors([
            (self.train_batch_size > 0, "train_batch_size", "must be > 0"),
            (self.max_prompt_length > 0, "max_prompt_length", "must be > 0"),
            (self.max_response_length > 0, "max_response_length", "must be > 0"),
        ])


@dataclass
class RolloutConfig:
    engine: Literal["native", "hf", "vllm", "sglang"] = "native"
    """Generation engine; native is the in-process default (CPU and GPU)."""
    n: int = 4
    """Responses sampled per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores logprobs at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    min_p: float = 0.0
    """Min-p sampling: drop tokens below min_p x the top token's probability (0 = off)."""
    repetition_penalty: float = 1.0
    """Seen tokens' logits (prompt + output) divided by it if > 0, else multiplied (1 = off). Penalties
    are not in the trainer's logprobs: the rollout becomes off-policy by their effect."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of each token already in the output (0 = off)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per occurrence in the output (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a response ends at the token that completes one (kept in the response)."""
    max_num_seqs: int = 64
    """Sequences decoded together per engine batch."""
    max_num_batched_tokens: int = 4096
    """Native engine: most tokens per forward step (one per decoding sequence + prompt chunks);
    longer prompts are prefilled in chunks."""
    block_size: int = 16
    """Native engine: token slots per paged KV-cache block (a power of two)."""
    kv_cache_gb: float = 1.0
    """Native engine on CPU: GiB of KV cache (capped at what max_num_seqs full-length sequences use)."""
    gpu_memory_utilization: float = 0.5
    """Native engine on GPU: KV cache size as a fraction of the device memory free when it is
    allocated (after the weights and what training still holds)."""
    enable_prefix_sharing: bool = True
    """Native engine: prefill each prompt once for its n samples, which share its KV blocks."""
    enforce_eager: bool = False
    """Native engine on GPU: run decode steps eagerly instead of replaying them as CUDA graphs
    (captured per batch size 1, 2, 4, 8, 16, ... max_num_seqs on first use; needs the Triton
    decode kernel, i.e. model.kernels auto|triton, and parallel.tp=1)."""
    update_weights_bucket_mb: int = 512
    """Weight sync: tensors are pushed into the engine (native copies, vLLM/SGLang pushes) in
    buckets of at most this many MiB."""
    share_weights: bool = True
    """Native engine: generate from the trainer's own parameters (no copy, no per-step sync) when the layouts
    match: one FSDP shard holding whole tensors (dp_shard*sp == 1), tp == 1, engine dtype == the trainer's
    parameter dtype (fp32: model.dtype=float32, or auto on CPU), no actor offload (actor.offload.params).
    Otherwise weights are copied in buckets each step."""
    val_n: int = 1
    """Samples per prompt at validation."""
    val_temperature: float = 0.0
    """Validation temperature (0 = greedy)."""

    def __post_init__(self):
        rule_errors([
            (self.n >= 1, "n", "must be >= 1"),
            (self.temperature > 0, "temperature", "must be > 0: training scores logprobs at this temperature "
             "(greedy decoding is for validation: val_temperature=0)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k == -1 or self.top_k > 0, "top_k", "must be -1 (off) or > 0"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1] (0 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2] (0 = off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2] (0 = off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be a list of non-empty strings"),
            (self.max_num_seqs > 0, "max_num_seqs", "must be > 0"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0 (tokens per engine step)"),
            (self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size",
             "must be a power of two (1, 2, 4, 8, 16, 32, ...)"),
            (self.kv_cache_gb > 0, "kv_cache_gb", "must be > 0 (GiB of KV cache on CPU)"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]"),
            (self.update_weights_bucket_mb > 0, "update_weights_bucket_mb", "must be > 0 (MiB per weight bucket)"),
            (self.val_n >= 1, "val_n", "must be >= 1"),
            (self.val_temperature >= 0, "val_temperature", "must be >= 0 (0 = greedy)"),
        ])


@dataclass
class KLControlConfig:
    type: Literal["fixed", "adaptive"] = "fixed"
    """fixed = constant coefficient; adaptive = Ziegler et al. 2019 controller toward target_kl."""
    kl_coef: float = 0.001
    """KL coefficient (the initial one when adaptive)."""
    target_kl: float = 0.1
    """Adaptive controller's target KL per token."""
    horizon: int = 10000
    """Adaptive controller's horizon in samples."""

    def __post_init__(self):
        rule_errors([
            (self.kl_coef >= 0, "kl_coef", "must be >= 0"),
            (self.horizon > 0, "horizon", "must be > 0"),
            (self.target_kl > 0, "target_kl", "must be > 0"),
        ])


@dataclass
class FilterGroupsConfig:
    enable: bool = False
    """DAPO dynamic sampling: drop groups whose n rewards are all equal (no learning signal) and
    generate more batches until data.train_batch_size groups are kept."""
    max_num_gen_batches: int = 10
    """Stop generating after this many batches in one step and train on the kept groups (0 = no limit)."""
    metric: Literal["acc", "score"] = "acc"
    """What must differ within a group: acc = the reward function's score (DAPO's choice), score =
    with the overlong penalty (a group then survives on length differences alone)."""


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    """Advantage estimator (see spmd_rl.algorithms.advantages.ADVANTAGE_ESTIMATORS); gae needs critic.enable."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide GRPO advantages by the group std (False = Dr.GRPO)."""
    gamma: float = 1.0
    """Discount factor (GAE / REINFORCE++)."""
    lam: float = 1.0
    """GAE lambda."""
    use_kl_in_reward: bool = False
    """Subtract kl_ctrl.kl_coef x KL(policy || reference) from the token rewards."""
    kl_penalty: str = "kl"
    """KL estimator for the in-reward penalty: kl/k1, abs, mse/k2, low_var_kl/k3 (+ suffix = k2 gradient)."""
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    """Coefficient of the in-reward KL penalty."""
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    """DAPO dynamic sampling."""

    def __post_init__(self):
        from spmd_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS
        from spmd_rl.algorithms.kl import KL_KINDS, KL_PENALTIES

        rule_errors([
            (self.adv_estimator in ADVANTAGE_ESTIMATORS, "adv_estimator",
             f"unknown {self.adv_estimator!r}; choose from {sorted(ADVANTAGE_ESTIMATORS)}"),
            (self.kl_penalty in KL_KINDS, "kl_penalty",
             f"unknown {self.kl_penalty!r}; choose from {list(KL_PENALTIES)} (optionally with a + suffix)"),
            (0 <= self.gamma <= 1, "gamma", "must be in [0, 1]"),
            (0 <= self.lam <= 1, "lam", "must be in [0, 1]"),
        ])


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (not RL steps: an RL step takes one per
    mini-batch and PPO epoch); step i uses lr * (i + 1) / warmup_steps. verl's lr_warmup_steps
    counts RL steps and starts at 0."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Schedule after warmup."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Max global gradient norm (<= 0 = no clipping, norm still logged)."""

    def __post_init__(self):
        rule_errors([
            (self.lr > 0, "lr", "must be > 0"),
            (len(self.betas) == 2, "betas", "must be two numbers, e.g. [0.9, 0.999]"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
        ])


@dataclass
class PolicyLossOptions:
    clip_cov_ratio: float = 0.0002
    """clip_cov: fraction of tokens whose gradient is detached."""
    clip_cov_lb: float = 1.0
    """clip_cov: lower covariance bound of the candidates."""
    clip_cov_ub: float = 5.0
    """clip_cov: upper covariance bound of the candidates."""
    kl_cov_ratio: float = 0.0002
    """kl_cov: fraction of tokens that get the KL term."""
    ppo_kl_coef: float = 1.0
    """kl_cov: coefficient of that KL term."""

    def __post_init__(self):
        rule_errors([
            (self.clip_cov_ratio > 0, "clip_cov_ratio", "must be > 0"),
            (self.kl_cov_ratio > 0, "kl_cov_ratio", "must be > 0"),
            (self.clip_cov_lb < self.clip_cov_ub, "clip_cov_lb", f"must be < clip_cov_ub={self.clip_cov_ub}"),
        ])


@dataclass
class OffloadConfig:
    params: bool = False
    """Move the model's parameter shards to (pinned) host memory while the rollout engine
    generates, back before the next logprob pass: frees their device memory for the KV cache."""
    optimizer: bool = False
    """The same for the AdamW state (exp_avg, exp_avg_sq): 2 fp32 tensors per parameter shard.
    On CPU both flags only copy the state aside (it already lives in host memory): no saving."""


@dataclass
class MegatronOptions:
    use_distributed_optimizer: bool = True
    """actor.strategy=megatron: shard the AdamW state over data parallel (ZeRO-1, as megatron-core's
    distributed optimizer): gradients are reduce-scattered, each dp rank steps 1/dp of the flat
    parameters and the ranks all-gather the result; the same update, 8/dp instead of 8 bytes of
    optimizer state per parameter. false = every dp rank keeps the whole state. (FSDP2 shards
    the optimizer state with the parameters already.)"""


@dataclass
class ActorConfig:
    strategy: Literal["fsdp", "megatron"] = "fsdp"
    """Training backend of the policy: fsdp = the native decoder under FSDP2 (+ TP/SP); megatron =
    megatron-core's GPTModel over parallel.tp x parallel.pp (pip install -e '.[megatron]'); runs on
    CPU/gloo too. Not combined with sequence parallelism, an external engine or mixture-of-experts models."""
    megatron: MegatronOptions = field(default_factory=MegatronOptions)
    """Options of actor.strategy=megatron."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule of the policy."""
    ppo_mini_batch_size: int = 8
    """Prompts per optimizer step over all ranks (data.train_batch_size / this = steps per rollout)."""
    micro_batch_size_per_device: int = 8
    """Sequences per forward/backward on one rank (gradient accumulation inside a mini-batch)."""
    max_tokens_per_micro_batch: int = 0
    """Dynamic batch size: > 0 = micro-batches of at most this many prompt+response tokens
    (packed by length) instead of micro_batch_size_per_device sequences; a longer sequence
    goes alone. Also used for the old/reference logprobs. 0 = off."""
    use_remove_padding: bool = True
    """Padding-free training: sequences packed into one row with varlen attention. false =
    right-padded [B, T] micro-batches (same results, more compute; the policy, the reference
    and the critic alike)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    policy_loss: str = "vanilla"
    """Policy loss (see spmd_rl.algorithms.losses.POLICY_LOSSES)."""
    policy_loss_options: PolicyLossOptions = field(default_factory=PolicyLossOptions)
    """Options of the clip_cov / kl_cov losses."""
    clip_ratio_low: float = 0.2
    """PPO lower clip epsilon."""
    clip_ratio_high: float = 0.2
    """PPO upper clip epsilon (DAPO clip-higher when > clip_ratio_low)."""
    clip_ratio_c: float = 3.0
    """Dual-clip constant for negative advantages (Ye et al. 2020)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How token losses are reduced to a scalar (seq-mean-token-sum-norm divides by data.max_response_length)."""
    entropy_coeff: float = 0.0
    """Entropy bonus: loss -= entropy_coeff x aggregated entropy."""
    use_kl_loss: bool = False
    """Add kl_loss_coef x KL(policy || reference) to the loss (GRPO-style; needs the reference model)."""
    kl_loss_coef: float = 0.001
    """Coefficient of the KL loss."""
    kl_loss_type: str = "low_var_kl"
    """KL estimator of the KL loss: kl/k1, abs, mse/k2, low_var_kl/k3 (+ suffix = k2 gradient)."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward instead of storing them
    (checkpoint_wrapper, non-reentrant): per layer only the block input stays, for ~1/3 more compute."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    """Host-memory offload of the policy's parameters / optimizer state during generation."""

    def __post_init__(self):
        from spmd_rl.algorithms.kl import KL_KINDS, KL_PENALTIES
        from spmd_rl.algorithms.losses import POLICY_LOSSES

        rule_errors([
            (self.ppo_mini_batch_size > 0, "ppo_mini_batch_size", "must be > 0"),
            (self.micro_batch_size_per_device > 0, "micro_batch_size_per_device", "must be > 0"),
            (self.max_tokens_per_micro_batch >= 0, "max_tokens_per_micro_batch",
             "must be >= 0 (0 = off: micro_batch_size_per_device sequences per micro-batch)"),
            (self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1"),
            (self.policy_loss in POLICY_LOSSES, "policy_loss",
             f"unknown {self.policy_loss!r}; choose from {sorted(POLICY_LOSSES)}"),
            (self.clip_ratio_low >= 0 and self.clip_ratio_high >= 0, "clip_ratio_low", "clip ratios must be >= 0"),
            (self.clip_ratio_c > 1, "clip_ratio_c", "must be > 1 (dual-clip lower bound)"),
            (self.kl_loss_type in KL_KINDS, "kl_loss_type",
             f"unknown {self.kl_loss_type!r}; choose from {list(KL_PENALTIES)} (optionally with a + suffix)"),
            (self.kl_loss_coef >= 0, "kl_loss_coef", "must be >= 0"),
        ])


@dataclass
class RefConfig:
    path: str = ""
    """Reference policy weights; empty = model.path (the initial policy). Loaded when
    actor.use_kl_loss or algorithm.use_kl_in_reward is on."""
    offload: bool = False
    """Keep the reference's shards in host memory between uses. FSDP: its CPU offload, GPU only (on
    CPU they already are); megatron: the stage waits in host buffers outside its logprob pass."""


@dataclass
class CriticConfig:
    enable: bool = False
    """Train a value model (required by algorithm.adv_estimator=gae)."""
    model_path: str = ""
    """HF folder the value model's trunk is initialised from; empty = model.path. The scalar head starts at 0."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """Optimizer of the critic."""
    warmup_steps: int = 0
    """Train only the critic for the first this-many steps; the actor starts at step warmup_steps + 1
    (verl's trainer.critic_warmup=N starts it at step N: use N - 1 here for the same run)."""
    cliprange_value: float = 0.5
    """Value clipping around the rollout-time values."""
    ppo_epochs: int = 1
    """Passes of the critic over each rollout batch."""
    ppo_mini_batch_size: int = 0
    """Prompts per critic optimizer step over all ranks; 0 = actor.ppo_mini_batch_size."""
    micro_batch_size_per_device: int = 0
    """Sequences per critic forward/backward on one rank; 0 = actor.micro_batch_size_per_device."""
    max_tokens_per_micro_batch: int = 0
    """Dynamic batch size of the critic (values and update): > 0 = micro-batches of at most this
    many prompt+response tokens instead of a fixed number of sequences. 0 = off."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """Aggregation of the value loss."""
    activation_checkpointing: bool = False
    """Recompute each block of the value model's trunk in the backward (see actor.activation_checkpointing)."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    """Host-memory offload of the critic's parameters / optimizer state during generation."""
    megatron: MegatronOptions = field(default_factory=MegatronOptions)
    """Options of the critic under actor.strategy=megatron."""

    def __post_init__(self):
        rule_errors([
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.cliprange_value > 0, "cliprange_value", "must be > 0"),
            (self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1"),
            (self.ppo_mini_batch_size >= 0, "ppo_mini_batch_size", "must be >= 0 (0 = the actor's)"),
            (self.micro_batch_size_per_device >= 0, "micro_batch_size_per_device", "must be >= 0 (0 = the actor's)"),
            (self.max_tokens_per_micro_batch >= 0, "max_tokens_per_micro_batch",
             "must be >= 0 (0 = off: micro_batch_size_per_device sequences per micro-batch)"),
        ])


@dataclass
class CustomRewardConfig:
    path: str = ""
    """Python file holding a verl-style compute_score(data_source, solution_str, ground_truth, extra_info)."""
    name: str = "compute_score"
    """Function name inside that file."""


@dataclass
class OverlongBufferConfig:
    enable: bool = False
    """DAPO overlong reward shaping: responses longer than max_response_length - len lose reward linearly."""
    len: int = 0
    """Length of the soft-penalty zone at the end of data.max_response_length."""
    penalty_factor: float = 1.0
    """Penalty at max_response_length (reaching it costs this much reward)."""

    def __post_init__(self):
        rule_errors([
            (not self.enable or self.len > 0, "len", "must be > 0 when reward.overlong_buffer.enable"),
            (self.penalty_factor >= 0, "penalty_factor", "must be >= 0"),
        ])


@dataclass
class RewardConfig:
    custom_function: CustomRewardConfig = field(default_factory=CustomRewardConfig)
    """A user reward function replacing the built-in dispatch by data_source."""
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    """DAPO overlong reward shaping."""
    timeout_s: float = 10.0
    """Per-call limit of the reward function; a call that runs longer scores 0 and is counted
    (reward/timeouts). 0 = no limit."""

    def __post_init__(self):
        rule_errors([(self.timeout_s >= 0, "timeout_s", "must be >= 0 (0 = no limit)")])


@dataclass
class TrainerConfig:
    total_epochs: int = 1
    """Epochs over data.train_files (used when total_steps is 0)."""
    total_steps: int = 0
    """Training steps; 0 = total_epochs x steps per epoch."""
    run_dir: str = "runs/default"
    """Where metrics.jsonl, the resolved config and checkpoints go."""
    save_freq: int = 0
    """Checkpoint every this many steps (0 = only at the end when save_at_end)."""
    save_at_end: bool = True
    """Write a checkpoint after the last step."""
    save_hf_at_end: bool = True
    """Also write an HF folder (config.json + safetensors + tokenizer) of the final policy."""
    resume: str = "auto"
    """auto = continue from run_dir's latest checkpoint if any; never; or a checkpoint path."""
    test_freq: int = 0
    """Validate every this many steps (0 = never during training)."""
    val_before_train: bool = False
    """Validate once before the first step."""
    val_at_end: bool = True
    """Validate after the last step (when data.val_files is set)."""
    seed: int = 0
    """Seed of model init and sampling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when available, else CPU."""
    max_nonfinite_steps: int = 3
    """Optimizer steps with a NaN/Inf gradient norm are skipped (actor/nonfinite_skips); stop after
    this many RL steps in a row had one."""
    keep_last_k: int = 0
    """Keep only the newest k checkpoints (older ones are deleted after a new one is complete);
    0 = keep all."""
    async_save: bool = False
    """Write checkpoint files in a background thread so training goes on while storage works
    (the state is copied to CPU first; the next save waits for the previous one)."""
    save_hf_every: int = 0
    """Also export an HF folder (run_dir/hf_steps/step_XXXXXX) every this many steps; 0 = only the
    final one (save_hf_at_end, run_dir/hf)."""
    collective_timeout_s: int = 1800
    """Timeout of a collective inside a step: a rank that died or hangs makes the others fail after
    this long instead of hanging forever. Must cover the slowest rank's generation."""
    checkpoint_timeout_s: int = 3600
    """Timeout of the collectives around a checkpoint save/load (slow shared storage)."""
    balance_batch: bool = False
    """Move whole prompt groups between dp ranks so each rank trains on about the same number of
    prompt+response tokens (within each PPO mini-batch, so the update is unchanged); logs
    perf/balance_ratio_before/after (max / mean tokens per rank)."""
    memory_limit_gb: float = 0.0
    """Per-rank memory budget the startup memory plan is checked against (GiB); 0 = the GPU's
    total memory on CUDA, unchecked on CPU."""

    def __post_init__(self):
        rule_errors([
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1"),
            (self.total_epochs >= 1, "total_epochs", "must be >= 1"),
            (self.total_steps >= 0, "total_steps", "must be >= 0 (0 = derive from total_epochs)"),
            (self.save_freq >= 0, "save_freq", "must be >= 0"),
            (self.test_freq >= 0, "test_freq", "must be >= 0"),
            (self.keep_last_k >= 0, "keep_last_k", "must be >= 0 (0 = keep every checkpoint)"),
            (self.save_hf_every >= 0, "save_hf_every", "must be >= 0 (0 = only save_hf_at_end)"),
            (self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0 seconds"),
            (self.checkpoint_timeout_s > 0, "checkpoint_timeout_s", "must be > 0 seconds"),
            (self.memory_limit_gb >= 0, "memory_limit_gb", "must be >= 0 GiB (0 = the device's memory; unchecked on CPU)"),
        ])


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Replicated data-parallel degree (HSDP outer dimension)."""
    dp_shard: int = -1
    """FSDP sharding degree; -1 = whatever is left of the world size."""
    sp: int = 1
    """Ulysses sequence-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree (Megatron backend)."""
    ep: int = 1
    """Expert-parallel degree (Megatron backend, mixture-of-experts models): each data-parallel
    group's ranks hold 1/ep of the experts; must divide the dp size and the number of experts."""


@dataclass
class LoggingConfig:
    backends: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    """Metric sinks: console, jsonl, tensorboard, wandb, mlflow, swanlab; jsonl
    (run_dir/metrics.jsonl) is always on. Each tracker needs its extra: pip install -e '.[wandb]'."""
    progress_bar: bool = True
    """A tqdm bar on rank 0."""
    project: str = "spmd-rl"
    """Project name for wandb/swanlab, experiment name for mlflow."""
    experiment: str = ""
    """Run name in the trackers; empty = the run directory's name."""
    mlflow_tracking_uri: str = ""
    """MLflow store (a file: or sqlite: URI, or a server); empty = file:<run_dir>/mlruns."""

    def __post_init__(self):
        valid = ("console", "jsonl", "tensorboard", "wandb", "mlflow", "swanlab")
        bad = [b for b in self.backends if b not in valid]
        rule_errors([(not bad, "backends", f"unknown {bad} (choose from {list(valid)})")])


@dataclass
class ProfilerConfig:
    enable: bool = False
    """Capture torch.profiler Chrome traces of profiler.steps (trace_step<N>_rank<R>.json per rank)."""
    steps: list[int] = field(default_factory=lambda: [2])
    """Training steps to capture, counted from 1 like metrics.jsonl (step 1 carries one-time warm-up)."""
    out_dir: str = ""
    """Folder of the traces; empty = <trainer.run_dir>/profile."""
    with_stack: bool = False
    """Record the Python stack of every op (larger traces, slower steps)."""
    record_shapes: bool = False
    """Record the input shapes of every op."""

    def __post_init__(self):
        rule_errors([(all(s >= 1 for s in self.steps), "steps", f"{self.steps}: steps are counted from 1")])


@dataclass
class Config:
    """An RL run (``python -m spmd_rl.train``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)

    @property
    def needs_reference(self) -> bool:
        """A frozen reference policy is loaded only when some KL term uses it."""
        return self.actor.use_kl_loss or self.algorithm.use_kl_in_reward

    def __post_init__(self):
        data, actor, alg = self.data, self.actor, self.algorithm
        rule_errors([
            (bool(self.model.path), "model.path", "is required: an HF model folder (config.json + safetensors)"),
            (bool(data.train_files), "data.train_files", "is required: a list of parquet files"),
            (actor.ppo_mini_batch_size > data.train_batch_size or data.train_batch_size % actor.ppo_mini_batch_size == 0,
             "actor.ppo_mini_batch_size",
             f"{actor.ppo_mini_batch_size} must divide data.train_batch_size={data.train_batch_size}"),
            (actor.ppo_mini_batch_size <= data.train_batch_size, "actor.ppo_mini_batch_size",
             f"{actor.ppo_mini_batch_size} exceeds data.train_batch_size={data.train_batch_size}"),
            (alg.adv_estimator not in GROUP_ESTIMATORS or self.rollout.n >= 2, "rollout.n",
             f"algorithm.adv_estimator={alg.adv_estimator} compares the n responses of a prompt: set rollout.n >= 2"),
            (not alg.filter_groups.enable or self.rollout.n >= 2, "rollout.n",
             "algorithm.filter_groups drops groups whose rewards are all equal: set rollout.n >= 2"),
            (alg.adv_estimator != "gae" or self.critic.enable, "critic.enable",
             "algorithm.adv_estimator=gae needs a value model: set critic.enable=true"),
            (alg.adv_estimator == "gae" or not self.critic.enable, "critic.enable",
             f"only algorithm.adv_estimator=gae uses the critic's values; with {alg.adv_estimator} set critic.enable=false"),
            (self.critic.enable or self.critic.warmup_steps == 0, "critic.warmup_steps",
             "only applies with critic.enable=true"),
            (self.reward.overlong_buffer.len < data.max_response_length, "reward.overlong_buffer.len",
             f"{self.reward.overlong_buffer.len} must be < data.max_response_length={data.max_response_length}"),
            (actor.use_remove_padding or self.parallel.sp == 1, "actor.use_remove_padding",
             f"false (right-padded batches) needs parallel.sp=1, got {self.parallel.sp}: sequence parallelism "
             "splits packed rows; set actor.use_remove_padding=true"),
            (self.parallel.pp == 1 or actor.strategy == "megatron", "parallel.pp",
             f"{self.parallel.pp}: pipeline parallelism belongs to the Megatron backend; set actor.strategy=megatron "
             "(pip install -e '.[megatron]') or parallel.pp=1 (tp, sp and dp_shard scale the FSDP backend)"),
            (self.parallel.ep == 1 or actor.strategy == "megatron", "parallel.ep",
             f"{self.parallel.ep}: expert parallelism belongs to the Megatron backend; set actor.strategy=megatron "
             "or parallel.ep=1 (under FSDP the experts are sharded with the rest of the model)"),
            (self.critic.ppo_mini_batch_size == 0 or data.train_batch_size % self.critic.ppo_mini_batch_size == 0,
             "critic.ppo_mini_batch_size", f"{self.critic.ppo_mini_batch_size} must divide data.train_batch_size={data.train_batch_size}"),
        ])


@dataclass
class SFTDataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet files with a prompt column (chat messages or text) and a response column."""
    prompt_key: str = "prompt"
    """Prompt column."""
    response_key: str = "response"
    """Response column (the loss is computed on these tokens and the EOS only)."""
    chat_template: str = ""
    """Jinja chat template (or a path to a .jinja file) for tokenizers that have none; empty = the tokenizer's."""
    max_length: int = 1024
    """Longer prompt+response examples are dropped (and counted)."""
    train_batch_size: int = 64
    """Examples per optimizer step over all ranks."""
    micro_batch_size_per_gpu: int = 16
    """Examples per forward/backward on one rank."""
    shuffle: bool = True
    """Shuffle each epoch."""
    seed: int = 0
    """Seed of the example order."""


@dataclass
class SFTTrainerConfig:
    total_epochs: int = 1
    """Epochs over the data (used when total_steps is 0)."""
    total_steps: int = 0
    """Optimizer steps; 0 = total_epochs x steps per epoch."""
    output_dir: str = "runs/sft"
    """Run folder: metrics.jsonl, config.yaml, and the HF-format model in <output_dir>/model."""
    log_freq: int = 10
    """Log metrics every this many steps."""
    seed: int = 0
    """Seed of model init."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when available, else CPU."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning (``python -m spmd_rl.sft``): next-token loss on the response."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        rule_errors([
            (bool(self.model.path), "model.path", "is required: an HF folder (config.json, plus weights unless model.random_init=true)"),
            (bool(self.data.train_files), "data.train_files", "is required: a list of parquet files"),
            (self.parallel.pp == 1, "parallel.pp", f"{self.parallel.pp}: SFT trains the FSDP backend; use parallel.pp=1"),
        ])


def check_world_size(cfg: Config, dp_size: int) -> None:
    """Rules that need the data-parallel size; one line per broken rule."""
    data, actor = cfg.data, cfg.actor
    rule_errors([
        (data.train_batch_size % dp_size == 0, "data.train_batch_size",
         f"{data.train_batch_size} must be divisible by the data-parallel size {dp_size} (WORLD_SIZE / tp / sp / pp)"),
        (actor.ppo_mini_batch_size % dp_size == 0, "actor.ppo_mini_batch_size",
         f"{actor.ppo_mini_batch_size} must be divisible by the data-parallel size {dp_size}"),
        (cfg.critic.ppo_mini_batch_size % dp_size == 0, "critic.ppo_mini_batch_size",
         f"{cfg.critic.ppo_mini_batch_size} must be divisible by the data-parallel size {dp_size}"),
    ])


__all__ = [
    "ActorConfig", "AlgorithmConfig", "Config", "ConfigError", "CriticConfig", "CustomRewardConfig",
    "FilterGroupsConfig", "KLControlConfig", "OffloadConfig", "OverlongBufferConfig", "PolicyLossOptions", "RefConfig",
    "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RewardConfig",
    "RolloutConfig", "SFTConfig", "TrainerConfig", "check_world_size", "load_config", "parse_cli", "save_config",
]
