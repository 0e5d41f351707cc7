"""The embedded generation engine over the native decoder (CPU and GPU).

Continuous batching over a paged KV cache (PagedAttention, arXiv:2309.06180; Orca-style
iteration-level scheduling with chunked prefill, arXiv:2308.16369): each step runs one packed
forward holding the decode token of every running sequence and the prompt chunks that fit the
token budget (``scheduler.py``), with keys/values in a preallocated block pool
(``block_pool.py``). The n samples of a prompt share its prefill and its KV blocks. Logprobs of
sampled tokens come from the same math the trainer uses, so the two agree up to forward-pass
numerics.

Reproducibility: every sequence samples with its own generator seeded from (prompt seed,
sample index), and is only ever fed its own tokens, so its tokens do not depend on the batch,
the budgets, preemptions or prefix sharing (up to floating-point rounding of different batch
shapes, which greedy argmax and sampling are insensitive to in practice).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from spmd_rl.errors import UserError
from spmd_rl.kernels.backend import resolve_kernel_backend
from spmd_rl.models.decoder import Transformer
from spmd_rl.rollout.engine import validate_prompts
from spmd_rl.rollout.native.block_pool import (
    BlockAllocator,
    KVPool,
    blocks_for_tokens,
    check_block_size,
    num_blocks_for_budget,
)
from spmd_rl.rollout.native.cuda_graph import DecodeGraphs, default_capture_sizes
from spmd_rl.rollout.native.scheduler import Chunk, Scheduler, Sequence, StepPlan
from spmd_rl.rollout.native.weight_loader import check_still_shared, load_in_buckets, share_parameters
from spmd_rl.rollout.sampling import make_generators, resolve_prompt_seeds, sample_seed, sample_with_logprobs
from spmd_rl.rollout.stop import StopChecker
from spmd_rl.rollout.types import Completion, SamplingParams


@dataclass
class _Request:
    """Sample ``sample_index`` of prompt ``prompt_index``: its scheduler sequence and what it reports."""

    prompt_index: int
    sample_index: int
    prompt_len: int
    seq: Sequence
    seed: int
    logprobs: list[float] = field(default_factory=list)  # [num_generated] trainer-side distribution
    sampled_logprobs: list[float] = field(default_factory=list)  # [num_generated] distribution drawn from
    raw_logprobs: list[float] | None = None  # [num_generated] T = 1, unprocessed (when asked for)
    finish_reason: str | None = None  # None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def response(self) -> list[int]:
        return self.seq.tokens[self.prompt_len :]

    def completion(self) -> Completion:
        return Completion(self.response, self.logprobs, self.finish_reason, sampled_logprobs=self.sampled_logprobs,
                          raw_logprobs=self.raw_logprobs, stop_reason=self.stop_reason)


class NativeEngine:
    """:class:`~spmd_rl.rollout.engine.RolloutEngine` over a native ``Transformer``.

    Args:
        model: the engine's own decoder instance (moved to ``device``/``dtype`` when given).
        max_num_seqs: most sequences running at once.
        max_seq_len: prompt + response budget per sequence; a response that reaches it ends
            with ``finish_reason="length"``.
        device, dtype: where and in which precision to run; default: the model's.
        show_progress: tqdm bar of finished requests and tokens/s (rank 0 only).
        block_size: token slots per KV block (a power of two).
        num_blocks: pool size in blocks; None sizes it from the memory budget below, capped at
            what ``max_num_seqs`` sequences of ``max_seq_len`` tokens could ever use.
        kv_cache_gb: KV pool budget on CPU, in GiB.
        gpu_memory_utilization: KV pool budget on GPU, as a fraction of the device memory free
            when the pool is (re)allocated (after the weights and what training still holds).
        max_num_batched_tokens: most tokens per forward step (decode tokens + prefill chunks).
        enable_prefix_sharing: prefill each prompt once for its n samples, which share its blocks.
        update_weights_bucket_mb: :meth:`update_weights` holds at most this many MiB of incoming
            tensors at once.
        kernels: ``auto | triton | torch`` for the packed prefill and paged decode attention.
        share_weights_with: the trainer's decoder; ``model`` then takes its very parameters
            (zero-copy; ``model`` may be built on the meta device) and :meth:`update_weights`
            is a no-op. Valid only when every parameter of that module is whole on this rank
            (plain, or FSDP2 over a 1-rank shard mesh: the engine then reads FSDP's own shard
            storage, which the optimizer updates in place), never re-sharded or moved after the
            engine is built (:meth:`update_weights` checks and raises), and already in the
            engine's dtype and device; pass a different module object than it, so the engine's
            attention kernel setting stays its own.
        tokenizer: needed only for stop strings (``SamplingParams.stop``).
        tp_mesh: a 1-D mesh to generate tensor-parallel over (the trainer's ``tp`` dimension):
            projections are sharded like the trainer's (column/row parallel, one all-reduce per
            attention and per MLP), each rank holds ``kv_heads/tp`` heads of KV cache, and the
            vocab-sharded logits are gathered for sampling. Every rank of the mesh must call
            :meth:`generate` with the same prompts and seeds.
        decode_graphs: how pure-decode steps run (``cuda_graph.py``). ``auto``: replayed as
            CUDA graphs on a CUDA device with the Triton decode kernel and no tensor
            parallelism, else eager; ``off``: always eager (vLLM's ``enforce_eager``);
            ``static``: the graphs' padded fixed-buffer forward without capture, on any device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_num_seqs: int = 64,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        show_progress: bool = False,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_gb: float = 1.0,
        gpu_memory_utilization: float = 0.5,
        max_num_batched_tokens: int = 4096,
        enable_prefix_sharing: bool = True,
        update_weights_bucket_mb: float = 256,
        kernels: str = "auto",
        share_weights_with: torch.nn.Module | None = None,
        tokenizer=None,
        tp_mesh=None,
        decode_graphs: str = "auto",
    ) -> None:
        if not isinstance(model, Transformer):
            raise UserError(
                f"rollout engine 'native' needs the native decoder, got {type(model).__name__}; "
                "use rollout engine 'hf' for this model"
            )
        if max_num_seqs < 1 or max_seq_len < 2:
            raise UserError(
                f"rollout needs max_num_seqs >= 1 and max_seq_len >= 2, got {max_num_seqs} and {max_seq_len}"
            )
        check_block_size(block_size)
        for ok, message in (
            (max_num_batched_tokens >= 1, f"rollout.max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}"),
            (kv_cache_gb > 0, f"rollout.kv_cache_gb must be > 0 (GiB of KV cache on CPU), got {kv_cache_gb}"),
            (0 < gpu_memory_utilization <= 1,
             f"rollout.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"),
            (num_blocks is None or num_blocks >= 1,
             f"num_blocks must be None (size from memory) or >= 1, got {num_blocks}"),
            (update_weights_bucket_mb > 0,
             f"rollout.update_weights_bucket_mb must be > 0 (MiB per weight bucket), got {update_weights_bucket_mb}"),
            (decode_graphs in DECODE_GRAPH_MODES,
             f"decode_graphs must be one of {', '.join(DECODE_GRAPH_MODES)}; got {decode_graphs!r}"),
        ):
            if not ok:
                raise UserError(message)
        self.shares_weights = share_weights_with is not None
        self._weight_source = share_weights_with
        if self.shares_weights:
            share_parameters(model, share_weights_with)
            first = next(model.parameters())
            if device is not None and not _same_device(torch.device(device), first.device):
                raise UserError(f"share_weights_with: the trainer's weights are on {first.device}, the engine was "
                                f"asked for {device}; leave share_weights_with unset to copy weights instead")
            if dtype is not None and dtype != first.dtype:
                raise UserError(f"share_weights_with: the trainer's weights are {first.dtype}, the engine was asked "
                                f"for {dtype}; leave share_weights_with unset to copy weights instead")
            self.device, self.dtype = first.device, first.dtype
            self.model = model.eval()
        else:
            first = next(model.parameters())
            self.device = torch.device(device) if device is not None else first.device
            self.dtype = dtype if dtype is not None else first.dtype
            if first.is_meta and device is None:
                raise UserError("a native engine built from a meta-device model needs device=...")
            self.model = _materialise(model, self.device, self.dtype, tp_mesh).eval()
        self.tp_group = None
        if tp_mesh is not None and tp_mesh.size() > 1:
            if self.shares_weights:
                raise UserError("share_weights_with cannot be combined with tensor-parallel generation; "
                                "leave share_weights_with unset")
            self.tp_group = tp_mesh.get_group()
        tp = 1 if self.tp_group is None else tp_mesh.size()
        self._kv_args = self.model.args.replace(num_kv_heads=self.model.args.num_kv_heads // tp)  # this rank's heads
        self.tokenizer = tokenizer
        self.kernels = resolve_kernel_backend(kernels, self.device)
        self.model.set_kernels(self.kernels)
        self.decode_graphs = _decode_graph_mode(decode_graphs, self.device, self.kernels, self.tp_group,
                                                moe=self.model.args.is_moe)
        self._graphs: DecodeGraphs | None = None  # built with the KV pool, dropped with it
        self.max_num_seqs, self.max_seq_len = max_num_seqs, max_seq_len
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv_cache_gb, self.gpu_memory_utilization = kv_cache_gb, gpu_memory_utilization
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_sharing = enable_prefix_sharing
        self.bucket_bytes = int(update_weights_bucket_mb * 2**20)
        self.show_progress = show_progress
        self.kv_cache: KVPool | None = None  # allocated on wake_up / first generate
        self.last_stats: dict[str, float] = {}  # counters of the last generate, for rollout/* metrics

    # ---------------------------------------------------------------- protocol

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """See :meth:`RolloutEngine.generate`. Fills :attr:`last_stats`."""
        validate_prompts(prompts, self.max_seq_len, self.model.args.vocab_size)
        if params.stop and self.tokenizer is None:  # before wake_up allocates the KV pool
            raise UserError("stop strings need a tokenizer: build the native engine with tokenizer=...")
        prompt_seeds = resolve_prompt_seeds(len(prompts), params, seeds)
        self.wake_up()
        started = time.perf_counter()
        allocator = BlockAllocator(self._usable_blocks)
        sched = Scheduler(allocator, self.block_size, self.max_num_seqs, self.max_num_batched_tokens)
        requests = self._add_requests(sched, prompts, params, prompt_seeds)
        # On the host: a row's uniform is one CPU draw; on a GPU each would be a kernel launch
        # (~5 us, 256 of them per decode step at batch 256, more than the step's HBM time)
        generators = make_generators([r.seed for r in requests], "cpu")
        stop_ids = set(params.stop_token_ids)
        self._stop_checker = StopChecker(self.tokenizer, params.stop) if params.stop else None
        generated, steps, self._graph_steps = 0, 0, 0
        show = self.show_progress and _rank0()
        with tqdm(total=len(requests), desc="rollout", unit="seq", disable=not show) as bar:
            while sched.has_unfinished():
                plan = sched.schedule()
                if not plan.chunks:  # cannot happen while every sequence fits the pool alone; never spin
                    raise RuntimeError(f"rollout scheduler made no progress ({len(sched.waiting)} waiting, "
                                       f"{allocator.num_free}/{allocator.num_blocks} blocks free)")
                steps += 1
                finished, new = self._step(plan, sched, requests, generators, params, stop_ids)
                generated += new
                bar.update(finished)
                bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - started, 1e-9):.0f}", refresh=False)
        self.last_stats = {
            "num_preemptions": sched.num_preemptions,
            "prefix_hit_blocks": sched.prefix_hit_blocks,
            "peak_blocks_used": allocator.peak_used,
            "num_blocks": allocator.num_blocks,
            "generated_tokens": generated,
            "num_steps": steps,
            "graph_steps": self._graph_steps,
            "seconds": time.perf_counter() - started,
        }
        results: list[list[Completion]] = [[] for _ in prompts]
        for req in requests:  # ordered by (prompt, sample)
            results[req.prompt_index].append(req.completion())
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the model's parameters by name, at most one bucket
        (``update_weights_bucket_mb``) of incoming tensors held at once.

        A no-op when the engine shares the trainer's parameters (``share_weights_with``): the
        iterator is then not consumed, only checked to be still the same objects (ValueError if
        the trainer's module was sharded or re-loaded since). Raises ``ValueError`` for an
        unknown name or a shape mismatch. With tied embeddings ``lm_head.weight`` is the
        embedding itself: it is accepted (or skipped) either way.
        """
        if self.shares_weights:
            check_still_shared(self.model, self._weight_source)
            return
        tied = bool(getattr(self.model.args, "tie_word_embeddings", False))
        load_in_buckets(self.model, named_tensors, self.bucket_bytes, tied_lm_head=tied)

    def sleep(self) -> None:
        """Free the KV pool (and the allocator's cached blocks on GPU); weights stay. Decode
        graphs go with it: their kernels hold the pool's addresses."""
        self.kv_cache = None
        self._graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Allocate the KV pool if it is not there (see ``num_blocks`` for its size)."""
        if self.kv_cache is not None:
            return
        num_blocks = self.num_blocks
        if num_blocks is None:
            most_ever = self.max_num_seqs * blocks_for_tokens(self.max_seq_len - 1, self.block_size)
            num_blocks = num_blocks_for_budget(
                self._kv_args, self.block_size, self.dtype, self.device, kv_cache_gb=self.kv_cache_gb,
                gpu_memory_utilization=self.gpu_memory_utilization, max_blocks=most_ever,
            )
            if self.tp_group is not None:
                # Every rank of a tp group must schedule identically (each step is a set of
                # collectives), so all take the smallest pool any of them can afford.
                agreed = torch.tensor([num_blocks], device=self.device)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=self.tp_group)
                num_blocks = int(agreed.item())
        # Fixed-buffer decode pads its batch with rows that write into one extra block no
        # sequence is ever given.
        extra = 0 if self.decode_graphs is None else 1
        with torch.inference_mode():
            self.kv_cache = KVPool.for_model(self._kv_args, num_blocks + extra, self.block_size, self.dtype,
                                             self.device)
        self._usable_blocks = num_blocks
        if self.decode_graphs is not None:
            self._graphs = DecodeGraphs(
                self.model, self.kv_cache, max_blocks_per_seq=blocks_for_tokens(self.max_seq_len, self.block_size),
                sizes=default_capture_sizes(self.max_num_seqs), scratch_block=num_blocks,
                capture=self.decode_graphs == "graph",
            )

    # ---------------------------------------------------------------- generation

    def _add_requests(
        self, sched: Scheduler, prompts: list[list[int]], params: SamplingParams, prompt_seeds: list[int]
    ) -> list[_Request]:
        """One request per (prompt, sample), in that order; the samples of a prompt join the
        scheduler as a leader and followers when prefix sharing is on and they fit together."""
        requests: list[_Request] = []
        share = self.enable_prefix_sharing and 1 < params.n <= self.max_num_seqs
        for i, prompt in enumerate(prompts):
            max_len = min(len(prompt) + params.max_new_tokens, self.max_seq_len)
            group = [
                _Request(i, j, len(prompt), Sequence(len(requests) + j, list(prompt), max_len),
                         sample_seed(prompt_seeds[i], j))
                for j in range(params.n)
            ]
            requests.extend(group)
            if share:
                sched.add(group[0].seq, followers=[r.seq for r in group[1:]])
            else:
                for r in group:
                    sched.add(r.seq)
        return requests

    def _step(
        self,
        plan: StepPlan,
        sched: Scheduler,
        requests: list[_Request],
        generators: list[torch.Generator],
        params: SamplingParams,
        stop_ids: set[int],
    ) -> tuple[int, int]:
        """Run one planned step: block copies, the packed forward, sampling. Returns
        ``(requests finished, tokens generated)``."""
        if plan.copies:
            self.kv_cache.copy_blocks(plan.copies)
        # Single-token chunks first: the decoder sends them through the paged decode kernel.
        chunks = [c for c in plan.chunks if c.num_tokens == 1]
        num_decodes = len(chunks)
        if num_decodes < len(plan.chunks):
            chunks += [c for c in plan.chunks if c.num_tokens > 1]
        if self._graphs is not None and num_decodes == len(chunks) <= self._graphs.max_batch:
            hidden = self._graphs.run([c.seq.tokens[c.start] for c in chunks], [c.start for c in chunks],
                                      [c.seq.block_table for c in chunks])  # [N, H]
            self._graph_steps += 1
        else:
            hidden = self._forward(chunks, num_decodes)  # [N, H]
        rows, seqs = [], []  # hidden row each sampled sequence reads (forks share their leader's)
        last = -1
        for c in chunks:
            last += c.num_tokens
            if c.samples:
                rows.append(last)
                seqs.append(c.seq)
                if c.forks:
                    rows.extend([last] * len(c.forks))
                    seqs.extend(c.forks)
        if not seqs:
            return 0, 0
        if rows != list(range(hidden.shape[0])):  # else each row samples once, in order: no gather
            hidden = hidden[torch.tensor(rows, device=self.device)]
        logits = self._logits(hidden)  # [R, V]
        penalised = params.has_penalties
        out = sample_with_logprobs(
            logits, params, [generators[s.seq_id] for s in seqs],
            generated=[requests[s.seq_id].response for s in seqs] if penalised else None,
            prompts=[s.tokens[: requests[s.seq_id].prompt_len] for s in seqs] if penalised else None)
        raw = out.raw_logprobs.tolist() if out.raw_logprobs is not None else None
        finished = 0
        stop_checker = self._stop_checker
        for i, (s, token, logprob, sampled) in enumerate(zip(seqs, out.tokens.tolist(), out.logprobs.tolist(),
                                                             out.sampled_logprobs.tolist())):
            req = requests[s.seq_id]
            sched.append_token(s, token)
            req.logprobs.append(logprob)
            req.sampled_logprobs.append(sampled)
            if raw is not None:
                if req.raw_logprobs is None:
                    req.raw_logprobs = []
                req.raw_logprobs.append(raw[i])
            if token in stop_ids:
                req.finish_reason, req.stop_reason = "stop", token
            elif stop_checker is not None and (hit := stop_checker.check(req.response)) is not None:
                req.finish_reason, req.stop_reason = "stop", hit.stop  # checked every token: nothing to cut
            elif len(s.tokens) >= s.max_len:  # max_new_tokens or max_seq_len reached
                req.finish_reason = "length"
            if req.finish_reason is not None:
                sched.finish(s)
                finished += 1
        return finished, len(seqs)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 ``[R, V]`` logits; under tensor parallelism each rank projects onto its vocab
        slice and the slices are gathered, so every rank samples from the same full logits."""
        if self.tp_group is None:
            return self.model.compute_logits(hidden).float()
        from spmd_rl.distributed.tensor_parallel import gather_vocab_logits, local_vocab_shard

        weight, _, _ = local_vocab_shard(self.model.lm_head_weight())
        return gather_vocab_logits((hidden @ weight.t()).float(), self.tp_group, self.model.args.vocab_size)

    def _forward(self, chunks: list[Chunk], num_decodes: int) -> torch.Tensor:
        """One packed forward over the chunks (decode tokens first). Returns hidden states ``[N, H]``."""
        dev = self.device
        width = max(len(c.seq.block_table) for c in chunks)
        tables = torch.tensor([c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks],
                              dtype=torch.int32, device=dev)
        if num_decodes == len(chunks):  # one token per sequence: the decoder's decode mode, no packing to describe
            ids = torch.tensor([c.seq.tokens[c.start] for c in chunks], device=dev)[:, None]
            positions = torch.tensor([c.start for c in chunks], device=dev)[:, None]
            return self.model(ids, positions, kv_cache=self.kv_cache, block_tables=tables)[:, 0]
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        for c in chunks:
            end = c.start + c.num_tokens
            ids.extend(c.seq.tokens[c.start : end])
            pos.extend(range(c.start, end))
            cu.append(cu[-1] + c.num_tokens)
        hidden = self.model(
            torch.tensor(ids, device=dev)[None],
            torch.tensor(pos, device=dev)[None],
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
            kv_cache=self.kv_cache,
            block_tables=tables,
            num_decodes=num_decodes,
        )
        return hidden[0]


def native_engine_options(rollout_cfg, kernels: str = "auto") -> dict:
    """The :class:`NativeEngine` keyword arguments that come from the ``rollout`` config
    section (and ``model.kernels``), for ``build_engine("native", model, **options, ...)``."""
    return dict(
        block_size=rollout_cfg.block_size,
        kv_cache_gb=rollout_cfg.kv_cache_gb,
        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
        max_num_batched_tokens=rollout_cfg.max_num_batched_tokens,
        enable_prefix_sharing=rollout_cfg.enable_prefix_sharing,
        update_weights_bucket_mb=rollout_cfg.update_weights_bucket_mb,
        kernels=kernels,
        decode_graphs="off" if rollout_cfg.enforce_eager else "auto",
    )


DECODE_GRAPH_MODES = ("auto", "off", "static")


def _decode_graph_mode(asked: str, device: torch.device, kernels: str, tp_group, *, moe: bool = False) -> str | None:
    """``"graph"`` (capture), ``"static"`` (fixed buffers, no capture) or None (packed eager
    steps). Capture needs CUDA, a decode path with no host sync (Triton), no tensor parallelism
    (collectives inside a captured graph are untested here) and no mixture-of-experts layers
    (their per-expert token gathers have data-dependent shapes)."""
    if asked == "static":
        return "static"
    if asked == "auto" and device.type == "cuda" and kernels == "triton" and tp_group is None and not moe:
        return "graph"
    return None


def _materialise(model: Transformer, device: torch.device, dtype: torch.dtype, tp_mesh) -> Transformer:
    """``model`` on ``device`` in ``dtype``, tensor-parallel over ``tp_mesh`` when its size is > 1.
    Sharding comes first, so a rank allocates only its own shards on the device; a meta-device
    model gets uninitialised storage there (its weights arrive by ``update_weights``)."""
    if tp_mesh is not None and tp_mesh.size() > 1:
        from spmd_rl.distributed.tensor_parallel import apply_tp

        apply_tp(model, tp_mesh)
    if next(model.parameters()).is_meta:
        model = model.to_empty(device=device)
        if model.args.tie_word_embeddings:
            model.tie_weights()  # to_empty gives the two names separate storage
    return model.to(device=device, dtype=dtype)


def _same_device(asked: torch.device, have: torch.device) -> bool:
    """``cuda`` matches any ``cuda:i``; an explicit index must match."""
    return asked.type == have.type and (asked.index is None or asked.index == have.index)


def _rank0() -> bool:
    """True outside torch.distributed or on global rank 0 (the one that shows progress)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
