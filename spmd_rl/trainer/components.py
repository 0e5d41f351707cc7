"""Build every component of an RL run from its config sections, in one place."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from spmd_rl.algorithms.kl import build_kl_controller
from spmd_rl.config import Config, MegatronOptions, OptimConfig
from spmd_rl.data.rl_dataset import PromptSample, RLDataset
from spmd_rl.data.sampler import PromptSampler
from spmd_rl.data.tokenizer import load_tokenizer
from spmd_rl.distributed.compile import wrap_decoder_blocks
from spmd_rl.distributed.parallelize import apply_fsdp, apply_model_parallel
from spmd_rl.errors import UserError
from spmd_rl.kernels.backend import resolve_kernel_backend
from spmd_rl.models import NATIVE_MODEL_TYPES, GenericCausalLM, ModelArgs, build_model, native_args, read_hf_config
from spmd_rl.models.decoder import Transformer
from spmd_rl.models.megatron.critic import MegatronValueModel, build_megatron_critic
from spmd_rl.models.megatron.memory_plan import report_megatron_memory_plan
from spmd_rl.models.megatron.pipeline_engine import FirstStageEngine
from spmd_rl.models.megatron.trainer_policy import MegatronPolicy, build_megatron_policy, check_megatron_run
from spmd_rl.models.sharded_load import is_on_meta, materialise_from_hf
from spmd_rl.observability.logger import MetricsLogger, build_metrics_logger
from spmd_rl.rewards.overlong import overlong_penalty
from spmd_rl.rewards.scorer import RewardScorer, build_scorer
from spmd_rl.rollout.engine import RolloutEngine, build_engine
from spmd_rl.rollout.weight_sync import sync_weights
from spmd_rl.trainer.actor import compute_logprobs, update_policy
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.checkpoint import Checkpointer, Trained
from spmd_rl.trainer.critic import ValueModel, compute_values, update_critic
from spmd_rl.trainer.hf_export import export_model, write_hf_folder
from spmd_rl.trainer.memory_plan import report_memory_plan
from spmd_rl.trainer.minibatch import layout_mini_batch_size
from spmd_rl.trainer.optim import build_lr_scheduler, build_optimizer
from spmd_rl.trainer.policy import PolicyModel
from spmd_rl.trainer.rng import sampling_seed


@dataclass
class RunComponents:
    """What one rank holds during a run."""

    rank: int
    dp_rank: int
    dp_size: int
    dp_group: object
    device: torch.device
    tokenizer: object
    dataset: RLDataset
    val_dataset: RLDataset | None
    sampler: PromptSampler
    policy: PolicyModel | MegatronPolicy  # FSDP-sharded over dp, or this rank's megatron stage
    optimizer: torch.optim.Optimizer
    scheduler: object
    ref: PolicyModel | MegatronPolicy | None  # frozen reference policy, when a KL term needs it
    critic: ValueModel | MegatronValueModel | None  # value model (PPO with GAE), the actor's backend
    critic_optimizer: torch.optim.Optimizer | None
    critic_scheduler: object | None
    kl_ctrl: object | None  # in-reward KL coefficient controller
    engine: RolloutEngine
    scorer: RewardScorer
    logger: MetricsLogger
    checkpointer: Checkpointer
    total_steps: int
    cfg: Config
    stop_token_ids: list[int]
    seed: int
    log: Callable[[str], None]

    def next_prompts(self) -> list[PromptSample]:
        return [self.dataset[i] for i in self.sampler.next_indices()]

    def rollout_seeds(self, step: int, prompts: list[PromptSample], generation: int = 1) -> list[int]:
        """A sampling seed per prompt from (run seed, step, generation batch of the step, prompt
        index) (:func:`~spmd_rl.trainer.rng.sampling_seed`): resumable and independent of how
        prompts are spread over ranks."""
        return [sampling_seed(self.seed, step, generation, p.index) for p in prompts]

    def score_texts(self, owners: list[PromptSample], response_ids: list[list[int]]) -> list[float]:
        """Reward of each response; ``owners[i]`` is the prompt of ``response_ids[i]``."""
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        result = self.scorer.score([p.data_source for p in owners], texts, [p.ground_truth for p in owners],
                                   [p.extra_info for p in owners])
        return result.scores

    def shaped_scores(self, owners: list[PromptSample], response_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, raw_scores)`` ``[B]``: the reward function's score, then with DAPO's overlong
        penalty added when configured (raw = before the penalty, what dynamic sampling filters on)."""
        raw = torch.tensor(self.score_texts(owners, response_ids), dtype=torch.float32)
        buffer = self.cfg.reward.overlong_buffer
        if not buffer.enable:
            return raw, raw
        lengths = torch.tensor([len(r) for r in response_ids])
        return raw + overlong_penalty(lengths, max_response_length=self.cfg.data.max_response_length,
                                      buffer_len=buffer.len, penalty_factor=buffer.penalty_factor), raw

    def score(self, batch: RolloutBatch, prompts: list[PromptSample]) -> None:
        """Fill ``batch.scores`` and ``batch.raw_scores``."""
        n = len(batch) // len(prompts)
        batch.scores, batch.raw_scores = self.shaped_scores([prompts[i // n] for i in range(len(batch))],
                                                            batch.response_ids)

    def sync_engine(self) -> None:
        """Push the policy's current weights into the engine (every rank: gathers are collectives)."""
        if isinstance(self.policy, MegatronPolicy):
            self.engine.update_weights(self.policy.hf_weights())
        else:
            sync_weights(self.policy.decoder, self.engine)

    def logprobs(self, model: PolicyModel | MegatronPolicy, batch: RolloutBatch) -> torch.Tensor:
        """``[B, T]`` response logprobs of ``model`` (the policy: old logprobs; or the reference)."""
        cfg, actor = self.cfg, self.cfg.actor
        if isinstance(model, MegatronPolicy):
            return model.logprobs(batch, cfg.rollout.temperature, actor.micro_batch_size_per_device,
                                  max_tokens=actor.max_tokens_per_micro_batch)
        return compute_logprobs(model, batch, cfg.rollout.temperature, actor.micro_batch_size_per_device, self.device,
                                max_tokens=actor.max_tokens_per_micro_batch, packed=actor.use_remove_padding,
                                dp_group=self.dp_group)

    def update_actor(self, batch: RolloutBatch, generator: torch.Generator) -> dict[str, float]:
        """PPO epochs of the policy over this rank's share of the batch; per-rank metrics."""
        cfg = self.cfg
        common = dict(temperature=cfg.rollout.temperature, generator=generator,
                      mini_batch_size=cfg.actor.ppo_mini_batch_size * cfg.rollout.n // self.dp_size,
                      scale_factor=cfg.data.max_response_length)
        if isinstance(self.policy, MegatronPolicy):
            return self.policy.update(self.optimizer, self.scheduler, batch, cfg.actor, **common)
        return update_policy(self.policy, self.optimizer, self.scheduler, batch, cfg.actor, dp_group=self.dp_group,
                             dp_size=self.dp_size, device=self.device, **common)

    def values(self, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
        """``[B, T]`` critic values of the response tokens (before the critic update)."""
        max_tokens = self.cfg.critic.max_tokens_per_micro_batch
        if isinstance(self.critic, MegatronValueModel):
            return self.critic.values(batch, micro_batch_size, max_tokens=max_tokens)
        return compute_values(self.critic, batch, micro_batch_size, self.device, max_tokens=max_tokens,
                              packed=self.cfg.actor.use_remove_padding, dp_group=self.dp_group)

    def update_critic(self, batch: RolloutBatch, *, mini_batch_size: int, micro_batch_size: int) -> dict[str, float]:
        """The critic's epochs over this rank's share of the batch; per-rank metrics."""
        cfg = self.cfg
        common = dict(mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size,
                      scale_factor=cfg.data.max_response_length)
        if isinstance(self.critic, MegatronValueModel):
            return self.critic.update(self.critic_optimizer, self.critic_scheduler, batch, cfg.critic, **common)
        return update_critic(self.critic, self.critic_optimizer, self.critic_scheduler, batch, cfg.critic,
                             dp_group=self.dp_group, dp_size=self.dp_size, device=self.device,
                             packed=cfg.actor.use_remove_padding, **common)

    def policy_args(self):
        """The policy's ``ModelArgs`` (None for a generic transformers model)."""
        if isinstance(self.policy, MegatronPolicy):
            return self.policy.args
        return getattr(self.policy.decoder, "args", None)

    def critic_args(self):
        """The value model trunk's ``ModelArgs`` (None without a critic or for a generic trunk)."""
        if isinstance(self.critic, MegatronValueModel):
            return self.critic.trunk.args
        return getattr(self.critic.decoder, "args", None) if self.critic is not None else None

    def trained(self) -> Trained:
        """The models a checkpoint holds, with their optimizers."""
        # A megatron shard's keys (param groups included) differ from the other shards': a name each.
        actor = f"actor/{self.policy.shard_name}" if isinstance(self.policy, MegatronPolicy) else "actor"
        trained = {actor: (self.policy, self.optimizer)}
        if self.critic is not None:
            critic = f"critic/{self.critic.shard_name}" if isinstance(self.critic, MegatronValueModel) else "critic"
            trained[critic] = (self.critic, self.critic_optimizer)
        return trained

    def export_hf(self, out_dir: Path) -> None:
        if isinstance(self.policy, MegatronPolicy):
            write_hf_folder(self.policy.hf_weights(), self.policy.args, self.tokenizer, out_dir, self.rank,
                            source_dir=self.cfg.model.path)
        else:
            export_model(self.policy.decoder, self.tokenizer, out_dir, self.rank, source_dir=self.cfg.model.path)


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
                            mini_batch_size=layout_mini_batch_size(
                                cfg.actor.ppo_mini_batch_size, cfg.critic.ppo_mini_batch_size if cfg.critic.enable else 0),
                            dp_size=dims.dp_size, seed=data.seed, shuffle=data.shuffle)
    total_steps = cfg.trainer.total_steps or cfg.trainer.total_epochs * sampler.steps_per_epoch

    kernels = kernel_backend(cfg.model.kernels, device)
    if cfg.actor.strategy == "megatron":
        policy, ref, engine, decoder = _megatron_policy(cfg, dims, mesh, device, tokenizer, kernels, log)
    else:
        policy, ref, engine, decoder = _fsdp_policy(cfg, dims, mesh, device, tokenizer, kernels, log)
    # Optimizer steps per RL step: one per mini-batch per PPO epoch.
    updates_per_step = cfg.actor.ppo_epochs * (data.train_batch_size // cfg.actor.ppo_mini_batch_size)
    optimizer = _optimizer(policy, cfg.actor.optim, cfg.actor.megatron, mesh)
    scheduler = build_lr_scheduler(optimizer, cfg.actor.optim, total_steps * updates_per_step)
    param_dtype = compute_dtype(cfg, device, default=None)
    fsdp_mesh = dims.fsdp_mesh(mesh)

    critic = critic_optimizer = critic_scheduler = None
    if cfg.critic.enable and cfg.actor.strategy == "megatron":
        critic = build_megatron_critic(cfg, cfg.critic.model_path or cfg.model.path, dims, compute_dtype=param_dtype)
    elif cfg.critic.enable:
        critic_path = cfg.critic.model_path or cfg.model.path
        trunk = _load_decoder(cfg, critic_path, device)
        critic = ValueModel(trunk, _hidden_size(trunk), apply_model_parallel(trunk, dims, mesh))
        wrap_decoder_blocks(trunk, compile=cfg.model.compile, activation_checkpointing=cfg.critic.activation_checkpointing)
        critic = apply_fsdp(critic, fsdp_mesh, param_dtype=param_dtype)
        _materialise(cfg, critic, trunk, critic_path, device)
        critic.zero_head()  # a head allocated with the trunk holds no values yet
    if cfg.critic.enable:
        critic_mini = cfg.critic.ppo_mini_batch_size or cfg.actor.ppo_mini_batch_size
        critic_optimizer = _optimizer(critic, cfg.critic.optim, cfg.critic.megatron, mesh)
        critic_scheduler = build_lr_scheduler(critic_optimizer, cfg.critic.optim,
                                              total_steps * cfg.critic.ppo_epochs * (data.train_batch_size // critic_mini))
    kl_ctrl = None
    if cfg.algorithm.use_kl_in_reward:
        k = cfg.algorithm.kl_ctrl
        kl_ctrl = build_kl_controller(k.type, kl_coef=k.kl_coef, target_kl=k.target_kl, horizon=k.horizon)

    log(f"{len(dataset)} training prompts, {sampler.steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"dp={dims.dp_size}{_model_parallel_note(dims)}, device={device}, kernels={kernels}")
    return RunComponents(
        rank=rank, dp_rank=dp_rank, dp_size=dims.dp_size, dp_group=mesh["dp"].get_group(), device=device, tokenizer=tokenizer,
        dataset=dataset, val_dataset=val_dataset, sampler=sampler, policy=policy, optimizer=optimizer,
        scheduler=scheduler, ref=ref, critic=critic, critic_optimizer=critic_optimizer,
        critic_scheduler=critic_scheduler, kl_ctrl=kl_ctrl, engine=engine, scorer=build_scorer(cfg.reward),
        logger=build_metrics_logger(cfg.trainer.run_dir, cfg, rank),
        checkpointer=Checkpointer(cfg.trainer.run_dir, rank, keep_last_k=cfg.trainer.keep_last_k,
                                  async_save=cfg.trainer.async_save, timeout_s=cfg.trainer.checkpoint_timeout_s),
        total_steps=total_steps, cfg=cfg,
        stop_token_ids=stop_token_ids(tokenizer, decoder), seed=cfg.trainer.seed, log=log,
    )


def _fsdp_policy(cfg: Config, dims, mesh, device: torch.device, tokenizer, kernels: str, log):
    """``(policy, reference or None, engine, decoder)``: the native (or generic) decoder under
    TP/SP and FSDP2, and an engine that shares its parameters or holds a copy."""
    decoder = _load_decoder(cfg, cfg.model.path, device)
    engine_dtype = compute_dtype(cfg, device)
    # A generic (transformers) decoder takes the copy path, where the native engine refuses it in one line.
    share = isinstance(decoder, Transformer) and engine_can_share_weights(cfg, dims, engine_dtype,
                                                                          next(decoder.parameters()).dtype)
    report_memory_plan(cfg, decoder, dims, device, log, engine_shares_weights=share)  # UserError if it cannot fit
    if not share:
        engine = build_engine(cfg.rollout.engine, _engine_model(cfg, decoder, device, engine_dtype), device=device,
                              dtype=engine_dtype, **engine_options(cfg, tokenizer, dims, mesh))
    param_dtype = compute_dtype(cfg, device, default=None)
    fsdp_mesh = dims.fsdp_mesh(mesh)
    sp_group = apply_model_parallel(decoder, dims, mesh)  # TP/SP shard the decoder before FSDP
    wrap_decoder_blocks(decoder, compile=cfg.model.compile, activation_checkpointing=cfg.actor.activation_checkpointing)
    policy = apply_fsdp(PolicyModel(decoder, kernels, sp_group), fsdp_mesh, param_dtype=param_dtype)
    _materialise(cfg, policy, decoder, cfg.model.path, device)
    if share:  # after fully_shard, which moves the parameters into FSDP's own storage
        engine = build_engine("native", weightless_decoder(decoder), device=device, share_weights_with=policy.decoder,
                              **engine_options(cfg, tokenizer, dims, mesh))
        log("rollout engine: generates from the trainer's own parameters (zero-copy, no per-step weight copy; "
            "rollout.share_weights=false copies them instead)")
    ref = None
    if cfg.needs_reference:
        ref_decoder = _load_decoder(cfg, cfg.ref.path or cfg.model.path, device)
        ref = PolicyModel(ref_decoder, kernels, apply_model_parallel(ref_decoder, dims, mesh))
        wrap_decoder_blocks(ref_decoder, compile=cfg.model.compile, activation_checkpointing=False)  # frozen: no backward
        ref = ref.requires_grad_(False).eval()
        offload = cfg.ref.offload and device.type == "cuda"
        ref = apply_fsdp(ref, fsdp_mesh, param_dtype=param_dtype, offload_to_cpu=offload)
        # offloaded shards live in host memory
        _materialise(cfg, ref, ref_decoder, cfg.ref.path or cfg.model.path, torch.device("cpu") if offload else device)
    return policy, ref, engine, decoder


def _materialise(cfg: Config, model: torch.nn.Module, decoder: torch.nn.Module, path: str, device: torch.device) -> None:
    """Allocate the shards of ``model`` (sharded on the meta device) and fill ``decoder`` in it: from
    the HF folder ``path``, or with ``model.random_init`` the seeded init, which gives every
    rank's slice of the same full tensors (``Transformer.init_weights``). A loaded model is kept."""
    if not is_on_meta(decoder):
        return
    if cfg.model.random_init:
        model.to_empty(device=device)
        decoder.init_weights(seed=cfg.trainer.seed)
    else:
        materialise_from_hf(model, decoder, path, device)


def _engine_model(cfg: Config, decoder: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """The engine's own copy of the policy. For a decoder still on the meta device: a meta copy the
    native engine allocates itself (its tp shard; the weights come with the sync before the first
    rollout), or, for the other engines, which need weights to start, the checkpoint loaded. The hf
    engine generates with transformers' ``generate``: for a native decoder it gets the same
    architecture as a transformers model, which takes the native (HF-named) weights at every sync."""
    if cfg.rollout.engine == "hf" and isinstance(decoder, Transformer):
        if decoder.args.num_experts:  # transformers 5 fuses the experts the native decoder keeps apart
            raise UserError(f"rollout.engine=hf cannot take the native {decoder.args.model_type} decoder's per-expert "
                            "weights (transformers fuses them): use rollout.engine=native, or "
                            "model.implementation=generic to train the transformers model itself")
        return _transformers_model(cfg, device, dtype)
    if not is_on_meta(decoder):
        return copy.deepcopy(decoder).to(dtype).eval()
    if cfg.rollout.engine == "native":
        return copy.deepcopy(decoder)
    if cfg.model.random_init:
        return build_model(None, args=decoder.args, device=device, dtype=dtype, seed=cfg.trainer.seed).eval()
    return build_model(cfg.model.path, device=device, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code).eval()


def _transformers_model(cfg: Config, device: torch.device, dtype: torch.dtype) -> GenericCausalLM:
    """``model.path``'s architecture as a transformers model: its weights, or with
    ``model.random_init`` (a folder without weights) a placeholder init the first sync replaces."""
    if cfg.model.random_init:
        return GenericCausalLM.from_config(cfg.model.path, dtype=dtype, device=device,
                                           trust_remote_code=cfg.model.trust_remote_code).eval()
    return build_model(cfg.model.path, device=device, dtype=dtype, prefer_native=False,
                       trust_remote_code=cfg.model.trust_remote_code).eval()


def _optimizer(model, optim: OptimConfig, megatron: MegatronOptions, mesh) -> torch.optim.Optimizer:
    """AdamW of a trained model: over the whole model, or, for megatron stages with the
    distributed optimizer, over this dp rank's range of it (ZeRO-1)."""
    if isinstance(model, MegatronPolicy | MegatronValueModel) and megatron.use_distributed_optimizer:
        return model.sharded_optimizer(optim, mesh["dp"])
    return build_optimizer(model, optim)


def _megatron_policy(cfg: Config, dims, mesh, device: torch.device, tokenizer, kernels: str, log):
    """``(policy, reference or None, engine, engine model)`` for ``actor.strategy=megatron``:
    GPTModel stages over tp x pp, and on the first stage a native engine tensor-parallel over tp
    (each rank keeps its slice of the stages' weights, gathered to HF tensors one at a time
    before each rollout), whose completions the other stages receive."""
    check_megatron_run(cfg, dims)
    report_megatron_memory_plan(cfg, _megatron_args(cfg.model.path), dims, device, log,
                                critic_args=_megatron_args(cfg.critic.model_path) if cfg.critic.enable
                                and cfg.critic.model_path else None)  # UserError if it cannot fit
    mixed = compute_dtype(cfg, device, default=None)  # bf16 autocast on CUDA, as FSDP's mixed precision
    policy = build_megatron_policy(cfg, cfg.model.path, dims, mesh, kernels=kernels, compute_dtype=mixed)
    ref = None
    if cfg.needs_reference:
        ref = build_megatron_policy(cfg, cfg.ref.path or cfg.model.path, dims, mesh, kernels=kernels, trainable=False,
                                    compute_dtype=mixed)
        if cfg.ref.offload:  # on the device for its logprob pass only (on CPU: copies aside, no saving)
            ref.wait_in_host_memory(device)
    with torch.device("meta"):  # the engine allocates its own tp shard; the stages' weights fill it
        engine_model = Transformer(policy.args)
    stage = policy.actor.pp_rank
    engine = None
    if stage == 0:  # the first stage generates for its pipeline (pipeline_engine.py)
        # tensor-parallel over the trainer's tp ranks (megatron's TP group): each holds 1/tp of the engine
        engine = build_engine("native", engine_model, device=device, dtype=compute_dtype(cfg, device),
                              **engine_options(cfg, tokenizer, dims, mesh))
        engine_tp = dist.get_world_size(engine.tp_group) if engine.tp_group is not None else 1
        experts = f" ep={dims.ep} ({policy.args.num_experts // dims.ep} experts per rank)" if policy.args.is_moe else ""
        log(f"actor: megatron-core GPTModel, tp={dims.tp} pp={dims.pp} dp={dims.dp_size}{experts}; the first pipeline stage "
            f"generates each dp share, tensor-parallel over {engine_tp} rank(s)")
    if dims.pp > 1:
        engine = FirstStageEngine(engine, policy.actor.pp_group, stage)
    return policy, ref, engine, engine_model


def _megatron_args(path: str) -> ModelArgs:
    """The native decoder's ``ModelArgs`` of the HF folder at ``path``: the megatron backend
    builds the same architectures."""
    return native_args(path, why="actor.strategy=megatron", fix="use actor.strategy=fsdp for this model")


def compute_dtype(cfg: Config, device: torch.device, default: torch.dtype | None = torch.float32):
    """bf16 where ``model.dtype`` asks for it (auto: on CUDA); else ``default`` (None: no mixed precision)."""
    return torch.bfloat16 if cfg.model.uses_bf16(device.type) else default


def engine_can_share_weights(cfg: Config, dims, engine_dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    """Whether the native engine can generate from the trainer's parameters in place: switched
    on (``rollout.share_weights``), and the trainer's layout is the engine's: each FSDP shard
    holds whole tensors (``dp_shard * sp == 1``; ``dp_replicate`` copies are whole too), no
    tensor parallelism, the engine's dtype is the trainer's parameter dtype (the fp32 master
    weights FSDP keeps), and the parameters never move to host memory (``actor.offload.params``
    re-points their storage every step)."""
    return (cfg.rollout.share_weights and cfg.rollout.engine == "native" and dims.dp_shard * dims.sp == 1
            and dims.tp == 1 and engine_dtype == param_dtype and not cfg.actor.offload.params)


def weightless_decoder(decoder: torch.nn.Module) -> torch.nn.Module:
    """The trainer's decoder architecture on the meta device, for an engine that then takes the
    trainer's parameters. The native decoder has no buffers (RoPE tables are computed per call),
    so nothing is left on the meta device."""
    with torch.device("meta"):
        return Transformer(decoder.args)


def _load_decoder(cfg: Config, path: str, device: torch.device) -> torch.nn.Module:
    """The native decoder of ``path`` on the meta device, to be sharded and then filled shard by
    shard (:func:`~spmd_rl.models.sharded_load.materialise_from_hf`), or a generic transformers
    model loaded whole on ``device``."""
    config = read_hf_config(path)
    if cfg.model.random_init or (cfg.model.implementation != "generic"
                                 and config.get("model_type") in NATIVE_MODEL_TYPES):
        with torch.device("meta"):
            decoder = Transformer(native_args(path, cfg.model.implementation))
    else:
        decoder = build_model(path, device=device, dtype=torch.float32, prefer_native=False, seed=cfg.trainer.seed,
                              trust_remote_code=cfg.model.trust_remote_code)
    if hasattr(decoder, "set_kernels"):  # the native decoder; generic models keep transformers' attention
        decoder.set_kernels(kernel_backend(cfg.model.kernels, device))
    return decoder


def kernel_backend(choice: str, device: torch.device) -> str:
    """``model.kernels`` resolved for this device (:mod:`spmd_rl.kernels.backend`)."""
    try:
        return resolve_kernel_backend(choice, device)
    except ValueError as e:
        raise UserError(str(e)) from None


def engine_options(cfg: Config, tokenizer, dims=None, mesh=None) -> dict:
    """Constructor keywords of the configured engine, from the ``rollout`` section.

    The native engine generates tensor-parallel over the trainer's ``tp`` ranks; HF generates
    with the full model on each rank; vLLM/SGLang get their own TP size and memory fraction."""
    r, data = cfg.rollout, cfg.data
    options = dict(max_num_seqs=r.max_num_seqs, max_seq_len=data.max_prompt_length + data.max_response_length)
    tp = dims.tp if dims is not None else 1
    if r.engine == "native":
        from spmd_rl.rollout.native.engine import native_engine_options

        options.update(native_engine_options(r, cfg.model.kernels), tokenizer=tokenizer,
                       tp_mesh=mesh["tp"] if tp > 1 else None)
    elif r.engine == "hf":
        options["tokenizer"] = tokenizer
    elif r.engine == "vllm":
        options.update(tensor_parallel_size=tp, gpu_memory_utilization=r.gpu_memory_utilization,
                       update_weights_bucket_mb=r.update_weights_bucket_mb, seed=cfg.trainer.seed,
                       tokenizer=cfg.model.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    elif r.engine == "sglang":
        if tp > 1:
            raise UserError(f"rollout.engine=sglang with parallel.tp={tp} is not supported: SGLang runs one engine "
                            "per tensor-parallel group; use rollout.engine=native or vllm, or parallel.tp=1")
        options.update(tp_size=tp, mem_fraction_static=r.gpu_memory_utilization,
                       update_weights_bucket_mb=r.update_weights_bucket_mb, seed=cfg.trainer.seed,
                       tokenizer=cfg.model.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    return options


def _model_parallel_note(dims) -> str:
    """``", tp=2, sp=2"``-style suffix naming the model-parallel degrees in use."""
    return "".join(f", {name}={getattr(dims, name)}" for name in ("dp_replicate", "sp", "tp", "pp") if getattr(dims, name) > 1)


def _hidden_size(decoder: torch.nn.Module) -> int:
    args = getattr(decoder, "args", None)
    return args.hidden_size if args is not None else decoder.hf_model.config.hidden_size


def stop_token_ids(tokenizer, decoder) -> list[int]:
    ids = {tokenizer.eos_token_id}
    # the native decoder's args, or a transformers model's config (GenericCausalLM)
    config = getattr(decoder, "args", None) or getattr(getattr(decoder, "hf_model", decoder), "config", None)
    model_eos = getattr(config, "eos_token_id", None)
    ids.update(model_eos if isinstance(model_eos, list) else [model_eos])
    return sorted(i for i in ids if i is not None)


def _rank0_print(rank: int) -> Callable[[str], None]:
    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)
    return log
