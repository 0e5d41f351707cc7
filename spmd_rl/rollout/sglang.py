"""SGLang as a rollout engine (``rollout.engine=sglang``) over its offline ``sglang.Engine``.

Targets ``sglang`` ``SGLANG_VERSIONS``. Each training rank owns one ``sglang.Engine`` (its
scheduler runs in child processes on GPUs ``base_gpu_id .. base_gpu_id + tp_size - 1``; with
``tp_size > 1`` only one rank per group of GPUs may build one). The engine starts from
``load_format="dummy"`` weights and receives the policy's through
``update_weights_from_tensor``. SGLang is imported lazily; without it (or with a version outside
the range) the engine raises a one-line ``UserError``.

Logprobs: SGLang reports ``log softmax(penalised logits / T)`` of the sampled token before
top-k/top-p/min-p (``T = 1`` for greedy; unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set): our
:attr:`Completion.logprobs` exactly when no penalty is on, and :attr:`Completion.sampled_logprobs`
when nothing is truncated (None otherwise).
Stopping: SGLang stops on ``stop_token_ids`` and also on the EOS ids of the model's config; for an
engine built from a module the written config has no EOS, so only ``stop_token_ids`` stop it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from spmd_rl.errors import UserError
from spmd_rl.rollout.types import Completion, SamplingParams
from spmd_rl.rollout.vllm import (
    bucket_by_size,
    check_request,
    expand_requests,
    check_cuda_device,
    dtype_name,
    engine_model_folder,
    folder_has_weights,
    group_by_prompt,
    import_engine_module,
    read_tie_word_embeddings,
    require_package,
    to_engine_names,
    truncates,
)
from spmd_rl.rollout.weight_sync import iter_full_tensors

SGLANG_VERSIONS = ">=0.4.6,<0.6"
SGLANG_INSTALL_MESSAGE = "rollout.engine=sglang needs SGLang: pip install -e '.[sglang]'"
SLEEP_TAGS = ("weights", "kv_cache")
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def to_sglang_sampling_params(
    params: SamplingParams, *, max_new_tokens: int | None = None, seed: int | None = None
) -> dict:
    """SGLang's ``sampling_params`` dict for one request (one sample: ``n`` is handled by
    sending each prompt n times).

    One to one: temperature (0 = greedy in both), top_p, top_k (-1 = off in both), min_p, the
    three penalties, max_new_tokens, stop_token_ids, stop strings. ``ignore_eos`` stays False
    because SGLang's ``ignore_eos`` also disables ``stop_token_ids``; ``no_stop_trim`` keeps the
    stop token in the output, as our :class:`Completion` does. ``seed`` becomes
    ``sampling_seed`` (honoured by SGLang's deterministic-inference mode).
    """
    greedy = params.greedy
    out = dict(
        max_new_tokens=params.max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=0.0 if greedy else float(params.temperature),
        top_p=1.0 if greedy else float(params.top_p),
        top_k=-1 if greedy else int(params.top_k),
        min_p=0.0 if greedy else float(params.min_p),
        repetition_penalty=float(params.repetition_penalty),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=False,
        no_stop_trim=True,
        skip_special_tokens=False,
    )
    if params.stop:
        out["stop"] = list(params.stop)
    if seed is not None:
        out["sampling_seed"] = int(seed)
    return out


def check_sglang_logprob_request(params: SamplingParams) -> None:
    """UserError when ``return_raw_logprobs`` asks for a logprob SGLang cannot report: its
    logprob is taken after penalties and temperature, so it is the raw T = 1 one only without them."""
    if params.return_raw_logprobs and (params.logprob_temperature != 1.0 or params.has_penalties):
        raise UserError("return_raw_logprobs with the SGLang engine needs temperature 1 (or greedy) and no "
                        "penalties: SGLang reports one logprob per token")


def from_sglang_outputs(
    outputs: list[dict], params: SamplingParams | None = None, *, samples_per_prompt: int
) -> list[list[Completion]]:
    """Completions per prompt from ``sglang.Engine.generate(..., return_logprob=True)``.

    ``outputs`` holds one dict per request, prompts repeated ``samples_per_prompt`` times in a
    row; tokens and logprobs come from ``meta_info["output_token_logprobs"]`` (``(logprob,
    token_id, text)`` per generated token), the reason from ``meta_info["finish_reason"]``
    (``{"type": "stop" | "length" | "abort", "matched": ...}``). ``params`` decides which
    logprob fields are filled (:func:`_logprob_fields`) and the samples per prompt (a single
    greedy completion is replicated to ``params.n``).
    """
    flat = [_to_completion(o, params) for o in outputs]
    if len(flat) % samples_per_prompt != 0:
        raise ValueError(f"{len(flat)} SGLang outputs do not split into groups of {samples_per_prompt}")
    return group_by_prompt(flat, samples_per_prompt, params.n if params is not None else samples_per_prompt)


def _logprob_fields(values: list[float], params: SamplingParams | None) -> dict:
    """SGLang's logprob is ``log softmax(penalised logits / T)`` before top-k/top-p/min-p (T = 1
    for greedy): ``logprobs`` (exact without penalties), ``sampled_logprobs`` when nothing is
    truncated, ``raw_logprobs`` when asked for (made exact by :func:`check_sglang_logprob_request`)."""
    fields = {"logprobs": values}
    if params is None:
        return fields
    if not truncates(params):
        fields["sampled_logprobs"] = list(values)
    if params.return_raw_logprobs:
        fields["raw_logprobs"] = list(values)
    return fields


def _to_completion(output: dict, params: SamplingParams | None = None) -> Completion:
    meta = output["meta_info"]
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        message = reason.get("message", "") if isinstance(reason, dict) else ""
        raise RuntimeError(f"SGLang aborted a rollout request: {message or 'no message'}")
    if kind not in _FINISH_REASONS:
        raise RuntimeError(f"SGLang returned finish_reason {reason!r}; expected type 'stop' or 'length'")
    steps = meta.get("output_token_logprobs")
    if steps is None:
        raise RuntimeError("SGLang returned no output_token_logprobs; generate needs return_logprob=True")
    tokens = [int(step[1]) for step in steps]
    values = [float(step[0]) for step in steps]
    # "matched" is the stop token id or stop string; absent when the model's own EOS ended it.
    stop_reason = reason.get("matched") if kind == "stop" and isinstance(reason, dict) else None
    return Completion(tokens, finish_reason=_FINISH_REASONS[kind], stop_reason=stop_reason,
                      **_logprob_fields(values, params))


def sglang_engine_kwargs(
    model_path: str,
    *,
    tp_size: int = 1,
    mem_fraction_static: float = 0.5,
    max_num_seqs: int = 64,
    max_seq_len: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    enforce_eager: bool = False,
    base_gpu_id: int = 0,
    deterministic: bool = False,
    tokenizer: str | None = None,
    load_format: str = "dummy",
    trust_remote_code: bool = False,
) -> dict:
    """Keyword arguments (``ServerArgs`` fields) of ``sglang.Engine`` for a rollout engine
    (``load_format="dummy"``: random weights, the real ones arrive through update_weights;
    ``trust_remote_code``: ``model.trust_remote_code``, for custom config/tokenizer code)."""
    kwargs = dict(
        model_path=model_path,
        tp_size=tp_size,
        mem_fraction_static=mem_fraction_static,
        load_format=load_format,
        random_seed=seed,
        dtype=dtype_name(dtype),
        max_running_requests=max_num_seqs,
        enable_memory_saver=True,  # needed by release/resume_memory_occupation
        disable_cuda_graph=enforce_eager,
        base_gpu_id=base_gpu_id,
        log_level="error",
        trust_remote_code=trust_remote_code,
    )
    if max_seq_len is not None:
        kwargs["context_length"] = max_seq_len
    if tokenizer is None:
        kwargs["skip_tokenizer_init"] = True  # prompts and outputs are token ids
    else:
        kwargs["tokenizer_path"] = tokenizer
    if deterministic:
        kwargs["enable_deterministic_inference"] = True
    return kwargs


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs, looking one item ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class SGLangEngine:
    """:class:`~spmd_rl.rollout.engine.RolloutEngine` over ``sglang.Engine``.

    Seeding: with ``deterministic=True`` (SGLang's deterministic inference) sample j of a prompt
    carries ``sampling_seed = sample_seed(prompt seed, j)`` and is reproducible on its own;
    otherwise SGLang samples from its engine-wide ``random_seed`` stream and per-prompt seeds do
    not pin individual samples. Greedy prompts are generated once and copied.

    Args:
        model: an HF model folder (its weights are loaded when it has any, else they are dummy until
            ``update_weights``), or a native ``Transformer`` / transformers model whose config
            builds the engine and whose weights are pushed right away.
        tp_size: GPUs of this engine. mem_fraction_static: GPU fraction for weights + KV cache.
        max_num_seqs: running requests at most. max_seq_len: prompt + response budget.
        update_weights_bucket_mb: size bound of one ``update_weights_from_tensor`` call.
        deterministic: SGLang's batch-invariant kernels and per-request seeds.
        engine_kwargs: more ``ServerArgs`` fields (e.g. ``port``, ``attention_backend``).
        device: must be a CUDA device when given; its index is the engine's first GPU.
    """

    def __init__(
        self,
        model: Any,
        *,
        tp_size: int = 1,
        mem_fraction_static: float = 0.5,
        max_num_seqs: int = 64,
        max_seq_len: int | None = None,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        enforce_eager: bool = False,
        update_weights_bucket_mb: int = 512,
        deterministic: bool = False,
        tokenizer: str | None = None,
        engine_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        show_progress: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        require_package("sglang", SGLANG_VERSIONS, SGLANG_INSTALL_MESSAGE, "rollout.engine=sglang", "sglang")
        check_cuda_device(device, "rollout.engine=sglang")
        sglang = import_engine_module("sglang", "rollout.engine=sglang")
        # No EOS in a written config: only the caller's stop_token_ids end a response.
        path, tmp, module = engine_model_folder(model, overrides={"eos_token_id": None})
        # A folder with weights loads them; a module's (or a config-only folder's) come by update_weights.
        loaded = module is None and folder_has_weights(path)
        if dtype is None and module is not None:
            dtype = next(module.parameters()).dtype
        base_gpu_id = (torch.device(device).index or 0) if device is not None else 0
        kwargs = sglang_engine_kwargs(
            path, tp_size=tp_size, mem_fraction_static=mem_fraction_static, max_num_seqs=max_num_seqs,
            max_seq_len=max_seq_len, seed=seed, dtype=dtype, enforce_eager=enforce_eager, base_gpu_id=base_gpu_id,
            deterministic=deterministic, tokenizer=tokenizer, load_format="auto" if loaded else "dummy",
            trust_remote_code=trust_remote_code)
        kwargs.update(engine_kwargs or {})
        tie_word_embeddings = read_tie_word_embeddings(path)
        try:
            self.engine = sglang.Engine(**kwargs)
        except TypeError as e:  # a ServerArgs field this SGLang release does not have
            raise UserError(f"rollout.engine=sglang: this SGLang does not accept these engine options ({e}); "
                            f"use a release in sglang{SGLANG_VERSIONS} that has them") from None
        finally:
            if tmp is not None:
                tmp.cleanup()
        self.tie_word_embeddings = tie_word_embeddings
        self.max_seq_len, self.deterministic = max_seq_len, deterministic
        self.has_tokenizer = tokenizer is not None
        self.bucket_bytes = update_weights_bucket_mb * 1024**2
        self._known_names = _known_names(module, path, self.tie_word_embeddings)
        self._asleep: set[str] = set()
        self._weights_valid = loaded
        if module is not None:
            self.update_weights(iter_full_tensors(module))

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """See :meth:`RolloutEngine.generate`."""
        check_request(prompts, params, self.max_seq_len, self.has_tokenizer, "SGLang", "SGLangEngine")
        check_sglang_logprob_request(params)
        self.wake_up()
        if not self._weights_valid:
            raise RuntimeError("the SGLang engine has no real weights (dummy ones, or released by sleep()); "
                               "call update_weights before generate")
        samples, input_ids, sampling = 1 if params.greedy else params.n, [], []
        for prompt, max_tokens, seed in expand_requests(prompts, params, seeds, self.max_seq_len):
            input_ids.append(list(prompt))
            sampling.append(to_sglang_sampling_params(
                params, max_new_tokens=max_tokens, seed=seed if self.deterministic else None))
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True)
        return from_sglang_outputs(outputs, params, samples_per_prompt=samples)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full tensors by HF name with ``update_weights_from_tensor``, in buckets of at most
        ``update_weights_bucket_mb``; the prefix cache is flushed once, with the last bucket.
        ValueError for a name the model does not have."""
        if "weights" in self._asleep:
            self.wake_up(["weights"])
        names = to_engine_names(named_tensors, tie_word_embeddings=self.tie_word_embeddings)
        for bucket, last in _with_last(bucket_by_size(self._checked(names), self.bucket_bytes)):
            result = self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=last)
            if isinstance(result, tuple) and not result[0]:
                raise ValueError(f"update_weights: SGLang refused the weights: {result[1]}")
        self._weights_valid = True

    def _checked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Fail before sending a name the model lacks (SGLang's loader would fail in its child process)."""
        for name, tensor in named_tensors:
            if self._known_names is not None and name not in self._known_names:
                raise ValueError(f"update_weights: the model has no parameter named {name!r}")
            yield name, tensor

    def sleep(self, tags: list[str] | None = None) -> None:
        """Release GPU memory: ``tags`` among ``"weights"``, ``"kv_cache"`` (None = both; released
        weights must be pushed again with ``update_weights`` before the next ``generate``)."""
        wanted = _check_tags(tags)
        todo = [t for t in wanted if t not in self._asleep]
        if not todo:
            return
        if len(todo) == len(SLEEP_TAGS):
            self.engine.release_memory_occupation()  # no tags: also works before tags existed (0.4.6)
        else:
            self.engine.release_memory_occupation(tags=todo)
        self._asleep |= set(todo)
        if "weights" in todo:
            self._weights_valid = False

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-acquire the memory of ``tags`` (None = all that sleep released)."""
        wanted = _check_tags(tags)
        todo = [t for t in wanted if t in self._asleep]
        if not todo:
            return
        if len(todo) == len(SLEEP_TAGS):
            self.engine.resume_memory_occupation()
        else:
            self.engine.resume_memory_occupation(tags=todo)
        self._asleep -= set(todo)


def _check_tags(tags: list[str] | None) -> list[str]:
    wanted = list(SLEEP_TAGS) if tags is None else list(tags)
    bad = [t for t in wanted if t not in SLEEP_TAGS]
    if bad:
        raise ValueError(f"unknown memory tags {bad}; choose from {list(SLEEP_TAGS)}")
    return wanted


def _known_names(module: torch.nn.Module | None, path: str, tie_word_embeddings: bool) -> set[str] | None:
    """HF names ``update_weights`` may send, from the module or the folder's safetensors headers
    (None when neither says: a config-only folder)."""
    if module is not None:
        return {name for name, _ in to_engine_names(module.named_parameters(),
                                                    tie_word_embeddings=tie_word_embeddings)}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return {n for n, _ in to_engine_names(((n, torch.empty(0)) for n in names),
                                          tie_word_embeddings=tie_word_embeddings)}
