"""vLLM as an in-process rollout engine (``rollout.engine=vllm``), plus the helpers every external
engine adapter shares (version check, HF weight names, size-bounded weight buckets, a config-only
model folder).

Targets ``vllm`` ``VLLM_VERSIONS`` (V1 engine). vLLM runs inside each training process with
``distributed_executor_backend="external_launcher"``: every torchrun rank builds its own
``vllm.LLM`` and the ``tensor_parallel_size`` consecutive ranks of a group shard one model, so
those ranks must call :meth:`VLLMEngine.generate` with identical prompts (true when the trainer's
``parallel.tp`` equals the engine's TP size). The engine starts from ``load_format="dummy"``
weights and gets the policy's through :meth:`VLLMEngine.update_weights`. vLLM is imported lazily;
without it (or with a version outside the range) the engine raises a one-line ``UserError``.

Logprobs: vLLM reports one logprob per token; it is asked for
``logprobs_mode="processed_logprobs"``, the distribution the token was drawn from (penalties,
temperature, min-p, top-k/top-p, renormalised). That is :attr:`Completion.sampled_logprobs`, and
it also fills :attr:`Completion.logprobs`, which is exact only without penalties and truncation
(otherwise it is the processed value: the trainer recomputes old logprobs itself, so only the
rollout-vs-trainer logprob metric sees the difference). ``raw_logprobs`` is served only where it
equals the processed value (see :func:`check_vllm_logprob_request`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from packaging.specifiers import SpecifierSet

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.generic import HF_MODEL_PREFIX
from spmd_rl.rollout.engine import validate_prompts
from spmd_rl.rollout.sampling import resolve_prompt_seeds, sample_seed
from spmd_rl.rollout.types import Completion, SamplingParams
from spmd_rl.rollout.weight_sync import clean_param_name, iter_full_tensors

VLLM_VERSIONS = ">=0.10.2,<0.33"
VLLM_INSTALL_MESSAGE = "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]'"
SLEEP_TAGS = ("weights", "kv_cache")
_FINISH_REASONS = {"stop": "stop", "length": "length"}


# ---------------------------------------------------------------------------------------------
# Shared by the external engine adapters


def require_package(dist: str, versions: str, install_message: str, key: str, extra: str) -> str:
    """The installed version of ``dist``; one-line UserError when it is missing or outside ``versions``.

    ``key`` is the config setting that asked for it (``rollout.engine=vllm``), ``extra`` the
    pyproject extra that installs a supported version.
    """
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(install_message) from None
    if not SpecifierSet(versions).contains(version, prereleases=True):
        raise UserError(f"{key} supports {dist}{versions}, found {dist} {version}: pip install -e '.[{extra}]'")
    return version


def import_engine_module(name: str, key: str) -> Any:
    """``importlib.import_module(name)`` with an import failure (broken CUDA install, missing
    shared library) turned into a one-line UserError naming ``key``."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"{key}: importing {name} failed: {str(e).strip().splitlines()[0]}") from None


def to_engine_names(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, tie_word_embeddings: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter names as vLLM/SGLang ``load_weights`` expects them.

    The native decoder already uses HF names, and the engines' Llama/Qwen2/Qwen3 models accept HF
    names (they fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` while loading), so
    the mapping only removes wrapper prefixes (torch.compile, FSDP1, checkpointing,
    GenericCausalLM), drops old ``rotary_emb.inv_freq`` buffers and, for tied embeddings, the
    ``lm_head.weight`` alias of the embedding.
    """
    for name, tensor in named_tensors:
        name = clean_param_name(name).removeprefix(HF_MODEL_PREFIX)
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        yield name, tensor


def engine_param_name(hf_name: str) -> str:
    """The parameter of the engine's dense Llama/Qwen model an HF tensor is loaded into (q/k/v
    into ``qkv_proj``, gate/up into ``gate_up_proj``); other names are unchanged. Expert tensors of
    a mixture-of-experts model are not covered: the adapters send HF names, which the engines'
    MoE loaders map themselves."""
    for part, fused in ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."),
                        (".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj.")):
        if part in hf_name:
            return hf_name.replace(part, fused)
    return hf_name


def check_request(prompts: list[list[int]], params: SamplingParams, max_seq_len: int | None,
                  has_tokenizer: bool, engine: str, cls: str) -> None:
    """UserError for what an external engine cannot answer: a bad prompt, or stop strings
    without the tokenizer that matches them."""
    validate_prompts(prompts, max_seq_len)
    if params.stop and not has_tokenizer:
        raise UserError(f"stop strings need a tokenizer in the {engine} engine; pass its tokenizer folder "
                        f"({cls}(tokenizer=...)) or use stop_token_ids")


def expand_requests(prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None,
                    max_seq_len: int | None) -> list[tuple[list[int], int, int]]:
    """One ``(prompt, max new tokens, seed)`` request per sample, in ``[prompt][sample]`` order:
    the external engines get each sample as its own request so sample j of a prompt is seeded
    like the native engine's; greedy prompts are generated once (and copied n times later)."""
    samples = 1 if params.greedy else params.n
    out = []
    for prompt, seed in zip(prompts, resolve_prompt_seeds(len(prompts), params, seeds)):
        max_tokens = params.max_new_tokens if max_seq_len is None else min(params.max_new_tokens,
                                                                            max_seq_len - len(prompt))
        out.extend((prompt, max_tokens, sample_seed(seed, j)) for j in range(samples))
    return out


def bucket_by_size(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs, in order, into lists of at most ``bucket_bytes`` bytes.

    A tensor larger than the budget travels alone in its own bucket. Fewer, larger loads amortise
    the engine's per-call cost; the bound caps the extra memory a bucket holds.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def engine_model_folder(
    model: Any, overrides: dict | None = None
) -> tuple[str, tempfile.TemporaryDirectory | None, torch.nn.Module | None]:
    """``(folder, temporary dir to clean up or None, module whose weights to push or None)``.

    A path is used as is. A native ``Transformer`` (or a transformers model / GenericCausalLM) gets
    a temporary folder holding only its ``config.json`` (with ``overrides`` applied): the engine
    builds its architecture from that with dummy weights, and the module's weights are then pushed
    by ``update_weights``.
    """
    if isinstance(model, (str, os.PathLike)):
        return str(model), None, None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"an external engine takes a model folder path or a torch module, got {type(model).__name__}")
    config = {**hf_config_of(model), **(overrides or {})}
    folder = tempfile.TemporaryDirectory(prefix="spmd_rl_engine_")
    (Path(folder.name) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder.name, folder, model


def hf_config_of(model: torch.nn.Module) -> dict:
    """The HF ``config.json`` dict describing ``model`` (native decoder or transformers model)."""
    args = getattr(model, "args", None)
    if isinstance(args, ModelArgs):
        config = args.to_hf_config()
    else:
        hf_config = getattr(getattr(model, "hf_model", model), "config", None)
        if hf_config is None or not hasattr(hf_config, "to_dict"):
            raise ValueError(f"cannot describe {type(model).__name__} as an HF config.json; pass a model folder path")
        config = hf_config.to_dict()
    first = next(model.parameters(), None)
    if first is not None:
        config["dtype"] = config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    return config


def folder_has_weights(path: str) -> bool:
    """True when an HF folder holds weight files (the engine can load them itself)."""
    folder = Path(path)
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def read_tie_word_embeddings(path: str) -> bool:
    """``tie_word_embeddings`` of an HF folder's config.json (UserError for a missing/bad folder)."""
    from spmd_rl.models.hf_io import read_hf_config

    return bool(read_hf_config(path).get("tie_word_embeddings", False))


def dtype_name(dtype: torch.dtype | str | None) -> str:
    """The engines' spelling of a dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"auto"``."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, str):
        return dtype
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
    if dtype not in names:
        raise ValueError(f"unsupported engine dtype {dtype}; choose one of {sorted(names.values())}")
    return names[dtype]


def check_cuda_device(device: torch.device | str | None, key: str) -> None:
    """UserError when the trainer asks for an external engine on a non-CUDA device."""
    if device is not None and torch.device(device).type != "cuda":
        raise UserError(f"{key} needs a CUDA device (got {device}); use rollout.engine=native on CPU")


def replicate_greedy(group: list[Completion], n: int) -> list[Completion]:
    """``n`` copies of a greedy prompt's single completion (all n samples would be identical)."""
    if len(group) == n:
        return group
    if len(group) != 1:
        raise ValueError(f"expected {n} completions or 1 to replicate, got {len(group)}")
    c = group[0]
    copy = lambda values: None if values is None else list(values)  # noqa: E731
    return [dataclasses.replace(c, token_ids=list(c.token_ids), logprobs=list(c.logprobs),
                                sampled_logprobs=copy(c.sampled_logprobs), raw_logprobs=copy(c.raw_logprobs))
            for _ in range(n)]


def truncates(params: SamplingParams) -> bool:
    """True when top-k, top-p or min-p removes tokens from the sampling distribution."""
    return params.top_k != -1 or params.top_p < 1.0 or params.min_p > 0.0


def group_by_prompt(flat: list[Completion], samples_per_prompt: int, n: int) -> list[list[Completion]]:
    """Consecutive groups of ``samples_per_prompt`` completions, each made ``n`` long."""
    if len(flat) % samples_per_prompt != 0:
        raise ValueError(f"{len(flat)} completions do not split into groups of {samples_per_prompt}")
    return [replicate_greedy(flat[i : i + samples_per_prompt], n) for i in range(0, len(flat), samples_per_prompt)]


# ---------------------------------------------------------------------------------------------
# vLLM mappings (pure)


def to_vllm_sampling_params(
    params: SamplingParams, *, n: int | None = None, seed: int | None = None, max_tokens: int | None = None
) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` equivalent to ``params``.

    One to one: n, temperature (0 = greedy in both), top_p, top_k (-1 = off in both), min_p,
    repetition/presence/frequency penalties (same definitions), max_tokens, stop_token_ids, stop
    strings, seed. ``ignore_eos`` keeps vLLM from stopping on an EOS the caller did not list
    (ours stops only on ``stop_token_ids`` and ``stop``); ``logprobs=0`` returns the sampled
    token's logprob only. ``n``, ``seed`` and ``max_tokens`` override the values of ``params``
    (per-sample requests, per-prompt budgets). For greedy the truncation options are sent as off:
    vLLM ignores them for greedy requests.
    """
    greedy = params.greedy
    kwargs = dict(
        n=params.n if n is None else n,
        temperature=0.0 if greedy else float(params.temperature),
        top_p=1.0 if greedy else float(params.top_p),
        top_k=-1 if greedy else int(params.top_k),
        min_p=0.0 if greedy else float(params.min_p),
        repetition_penalty=float(params.repetition_penalty),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        max_tokens=params.max_new_tokens if max_tokens is None else max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        seed=params.seed if seed is None else seed,
        logprobs=0,
        ignore_eos=True,
        detokenize=False,
        skip_special_tokens=False,
    )
    if params.stop:
        kwargs["stop"] = list(params.stop)
        kwargs["detokenize"] = True  # vLLM matches stop strings on the detokenized text
    return kwargs


def check_vllm_logprob_request(params: SamplingParams) -> None:
    """UserError when ``return_raw_logprobs`` asks for a logprob vLLM cannot report: it reports
    one logprob per token, the processed one, which is the raw T = 1 one only when nothing
    (temperature, penalties, top-k/top-p/min-p) changes the distribution."""
    if params.return_raw_logprobs and (params.logprob_temperature != 1.0 or params.has_penalties or truncates(params)):
        raise UserError("return_raw_logprobs with the vLLM engine needs temperature 1 (or greedy) and no penalties, "
                        "top-k, top-p or min-p: vLLM reports one logprob per token")


def from_vllm_outputs(
    outputs: list[Any], params: SamplingParams | None = None, *, samples_per_prompt: int | None = None
) -> list[list[Completion]]:
    """Completions per prompt from ``vllm.LLM.generate``'s ``RequestOutput`` list.

    Args:
        outputs: one ``RequestOutput`` per request, in request order; each has ``.outputs``, a
            list of ``CompletionOutput`` (``token_ids``, ``logprobs`` = per step a dict token id ->
            ``Logprob(logprob=...)``, ``finish_reason``, ``stop_reason``, ``index``).
        params: the request's sampling parameters; they decide which :class:`Completion`
            logprob fields vLLM's processed logprob fills exactly (see :func:`_logprob_fields`)
            and how many samples a prompt gets (a single greedy completion is replicated).
        samples_per_prompt: None when each request is one prompt with its n samples; k when
            each prompt was sent as k consecutive requests (one sample each).
    """
    per_request = [[_to_completion(out, params) for out in sorted(req.outputs, key=lambda o: o.index)]
                   for req in outputs]
    if samples_per_prompt is None:
        return [replicate_greedy(g, params.n) for g in per_request] if params is not None else per_request
    flat = [c for req in per_request for c in req]
    return group_by_prompt(flat, samples_per_prompt, params.n if params is not None else samples_per_prompt)


def _logprob_fields(processed: list[float], params: SamplingParams | None) -> dict:
    """Which Completion fields vLLM's processed logprob (penalties -> temperature -> min-p ->
    top-k/top-p, renormalised; T = 1 and no truncation for greedy) fills.

    * ``logprobs`` always (it is required); exact when no penalty or truncation is on.
    * ``sampled_logprobs`` when vLLM's processing is ours: not for greedy with truncation options
      (vLLM ignores them for greedy) nor with min-p together with top-k/top-p (vLLM applies min-p
      first, we apply it last).
    * ``raw_logprobs`` when asked for (:func:`check_vllm_logprob_request` made it exact).
    """
    if params is None:
        return {"logprobs": processed}
    fields = {"logprobs": processed}
    same_order = not (params.min_p > 0.0 and (params.top_k != -1 or params.top_p < 1.0))
    if same_order and not (params.greedy and truncates(params)):
        fields["sampled_logprobs"] = list(processed)
    if params.return_raw_logprobs:
        fields["raw_logprobs"] = list(processed)
    return fields


def _to_completion(out: Any, params: SamplingParams | None = None) -> Completion:
    """One ``CompletionOutput`` as a :class:`Completion`; RuntimeError for an aborted request."""
    reason = out.finish_reason
    if reason == "abort":
        raise RuntimeError("vLLM aborted a rollout request (engine shut down or out of KV cache); "
                           "lower rollout.max_num_seqs or raise gpu_memory_utilization")
    if reason not in _FINISH_REASONS:
        raise RuntimeError(f"vLLM returned finish_reason {reason!r}; expected one of {sorted(_FINISH_REASONS)}")
    tokens = [int(t) for t in out.token_ids]
    steps = out.logprobs
    if steps is None or len(steps) != len(tokens):
        raise RuntimeError(f"vLLM returned {0 if steps is None else len(steps)} logprob steps for {len(tokens)} "
                           "tokens; the request must set logprobs=0")
    processed = []
    for step, token in zip(steps, tokens):
        entry = step[token]  # the sampled token is always in its step's dict
        processed.append(float(getattr(entry, "logprob", entry)))
    stop_reason = getattr(out, "stop_reason", None) if reason == "stop" else None
    return Completion(tokens, finish_reason=_FINISH_REASONS[reason], stop_reason=stop_reason,
                      **_logprob_fields(processed, params))


def vllm_llm_kwargs(
    model_path: str,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    max_num_seqs: int = 64,
    max_model_len: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    enforce_eager: bool = False,
    tokenizer: str | None = None,
    load_format: str = "dummy",
    trust_remote_code: bool = False,
) -> dict:
    """Keyword arguments of ``vllm.LLM`` for an engine embedded in a torchrun process
    (``load_format="dummy"``: random weights, the real ones arrive through update_weights;
    ``trust_remote_code``: ``model.trust_remote_code``, for custom config/tokenizer code)."""
    kwargs = dict(
        model=model_path,
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=True,
        load_format=load_format,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        seed=seed,
        dtype=dtype_name(dtype),
        enforce_eager=enforce_eager,
        generation_config="vllm",  # ignore generation_config.json defaults (top_k, penalties, eos ids)
        logprobs_mode="processed_logprobs",
        trust_remote_code=trust_remote_code,
    )
    if tokenizer is None:
        kwargs["skip_tokenizer_init"] = True  # prompts and outputs are token ids
    else:
        kwargs["tokenizer"] = tokenizer
    return kwargs


def vllm_driver_model(llm: Any) -> torch.nn.Module:
    """The torch module inside an in-process ``vllm.LLM``.

    With the external launcher the V1 engine core runs in this process and ``LLMEngine`` exposes
    its executor; the chain below holds for vLLM 0.10.2 up to the newest supported release.
    """
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


# ---------------------------------------------------------------------------------------------
# The engine


class VLLMEngine:
    """:class:`~spmd_rl.rollout.engine.RolloutEngine` over an in-process ``vllm.LLM``.

    The ``tensor_parallel_size`` ranks sharing the engine must pass the same prompts and seeds.

    Seeding: every sample is its own request with seed ``sample_seed(prompt seed, j)``, so sample
    j of a prompt is reproducible on its own (vLLM's per-request generators; kernels may still
    differ in the last bits between batch shapes). Greedy prompts are generated once and copied.

    Args:
        model: an HF model folder (its weights are loaded when it has any, else they are dummy until
            ``update_weights``), or a native ``Transformer`` / transformers model whose config
            builds the engine and whose weights are pushed right away.
        tensor_parallel_size: ranks sharing one engine (consecutive torchrun ranks).
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV cache).
        max_num_seqs: sequences decoded together. max_seq_len: prompt + response budget.
        dtype: engine weights' dtype (default: the module's, or the folder's config).
        update_weights_bucket_mb: size bound of one ``load_weights`` call.
        sleep_level: 1 = offload weights to host memory and drop the KV cache; 2 = drop both (the
            next ``update_weights`` must then bring every weight back before ``generate``).
        tokenizer: tokenizer folder; only needed for stop strings.
        device: must be a CUDA device when given; show_progress: vLLM's tqdm bar.
    """

    def __init__(
        self,
        model: Any,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int = 64,
        max_seq_len: int | None = None,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        enforce_eager: bool = False,
        update_weights_bucket_mb: int = 512,
        sleep_level: int = 1,
        tokenizer: str | None = None,
        device: torch.device | str | None = None,
        show_progress: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        require_package("vllm", VLLM_VERSIONS, VLLM_INSTALL_MESSAGE, "rollout.engine=vllm", "vllm")
        check_cuda_device(device, "rollout.engine=vllm")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights) or 2 (discard weights), got {sleep_level}")
        self._vllm = import_engine_module("vllm", "rollout.engine=vllm")
        path, tmp, module = engine_model_folder(model)
        if dtype is None and module is not None:
            dtype = next(module.parameters()).dtype
        self.tie_word_embeddings = read_tie_word_embeddings(path)
        # A folder with weights loads them; a module's (or a config-only folder's) come by update_weights.
        loaded = module is None and folder_has_weights(path)
        # The external launcher needs the engine core in this process (vLLM asserts it).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self.llm = self._vllm.LLM(**vllm_llm_kwargs(
                path, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs, max_model_len=max_seq_len, seed=seed, dtype=dtype,
                enforce_eager=enforce_eager, tokenizer=tokenizer, load_format="auto" if loaded else "dummy",
                trust_remote_code=trust_remote_code))
        finally:
            if tmp is not None:
                tmp.cleanup()  # the config is read once, at construction
        self.max_seq_len, self.show_progress = max_seq_len, show_progress
        self.has_tokenizer = tokenizer is not None
        self.bucket_bytes = update_weights_bucket_mb * 1024**2
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()
        self._weights_valid = loaded  # dummy weights until real ones arrive
        if module is not None:
            self.update_weights(iter_full_tensors(module))

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """See :meth:`RolloutEngine.generate`."""
        check_request(prompts, params, self.max_seq_len, self.has_tokenizer, "vLLM", "VLLMEngine")
        check_vllm_logprob_request(params)
        self.wake_up()
        if not self._weights_valid:
            raise RuntimeError("the vLLM engine has no real weights (dummy ones, or discarded by sleep(level=2)); "
                               "call update_weights before generate")
        samples, requests, sampling = 1 if params.greedy else params.n, [], []
        for prompt, max_tokens, seed in expand_requests(prompts, params, seeds, self.max_seq_len):
            requests.append({"prompt_token_ids": list(prompt)})
            sampling.append(self._vllm.SamplingParams(**to_vllm_sampling_params(
                params, n=1, seed=seed, max_tokens=max_tokens)))
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=self.show_progress)
        return from_vllm_outputs(outputs, params, samples_per_prompt=samples)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full tensors by HF name through the model's own ``load_weights``, in buckets of at
        most ``update_weights_bucket_mb``; ValueError for a name the model does not have."""
        if "weights" in self._asleep:
            self.wake_up(["weights"])  # weights must be resident to be overwritten
        model = vllm_driver_model(self.llm)
        names = to_engine_names(named_tensors, tie_word_embeddings=self.tie_word_embeddings)
        for bucket in bucket_by_size(names, self.bucket_bytes):
            try:
                model.load_weights(bucket)
            except KeyError as e:
                raise ValueError(f"update_weights: the vLLM model has no parameter for {e.args[0]!r}") from None
        self._weights_valid = True
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self, level: int | None = None) -> None:
        """Release the KV cache and offload (level 1) or discard (level 2) the weights."""
        if self._asleep:
            return
        level = level or self.sleep_level
        self.llm.sleep(level=level)
        self._asleep = set(SLEEP_TAGS)
        if level >= 2:
            self._weights_valid = False

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-acquire the memory of ``tags`` (``"weights"``, ``"kv_cache"``; None = both)."""
        wanted = list(SLEEP_TAGS) if tags is None else list(tags)
        bad = [t for t in wanted if t not in SLEEP_TAGS]
        if bad:
            raise ValueError(f"unknown wake_up tags {bad}; choose from {list(SLEEP_TAGS)}")
        todo = [t for t in wanted if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)
