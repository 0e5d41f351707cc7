"""vLLM / SGLang adapters without the engines: sampling-parameter and result mappings on fake
result objects, weight names and buckets, version checks, and the engines' bookkeeping over fake
``vllm.LLM`` / ``sglang.Engine`` objects that record what they are asked to do."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.models import build_model  # noqa: E402
from spmd_rl.models.args import ModelArgs  # noqa: E402
from spmd_rl.rollout import build_engine  # noqa: E402
from spmd_rl.rollout import sglang as sglang_adapter  # noqa: E402
from spmd_rl.rollout import vllm as vllm_adapter  # noqa: E402
from spmd_rl.rollout.sampling import sample_seed  # noqa: E402
from spmd_rl.rollout.sglang import from_sglang_outputs, sglang_engine_kwargs, to_sglang_sampling_params  # noqa: E402
from spmd_rl.rollout.types import Completion, SamplingParams  # noqa: E402
from spmd_rl.rollout.vllm import (  # noqa: E402
    bucket_by_size,
    engine_model_folder,
    engine_param_name,
    from_vllm_outputs,
    require_package,
    to_engine_names,
    to_vllm_sampling_params,
    vllm_driver_model,
    vllm_llm_kwargs,
)


def tiny_args(**changes) -> ModelArgs:
    args = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=32, hidden_size=16,
                     intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                     attention_bias=True, tie_word_embeddings=True, eos_token_id=3)
    return args.replace(**changes)


@pytest.fixture
def tiny_model():
    return build_model(None, args=tiny_args(), seed=0).float().eval()


# ------------------------------------------------------------------------------ sampling params

SAMPLED = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                         presence_penalty=0.5, frequency_penalty=-0.25, max_new_tokens=12, stop_token_ids=[2, 5],
                         stop=["###"], seed=11)


def test_vllm_sampling_params_one_to_one():
    assert to_vllm_sampling_params(SAMPLED) == dict(
        n=3, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
        frequency_penalty=-0.25, max_tokens=12, stop_token_ids=[2, 5], seed=11, logprobs=0, ignore_eos=True,
        detokenize=True, skip_special_tokens=False, stop=["###"])
    plain = to_vllm_sampling_params(SamplingParams(max_new_tokens=5))
    assert "stop" not in plain and plain["detokenize"] is False  # token ids in, token ids out
    # Per-sample requests override n, seed and the prompt's token budget.
    kw = to_vllm_sampling_params(SAMPLED, n=1, seed=99, max_tokens=4)
    assert (kw["n"], kw["seed"], kw["max_tokens"]) == (1, 99, 4)


def test_greedy_maps_to_temperature_zero_with_filters_off_and_penalties_kept():
    greedy = SamplingParams(n=2, temperature=0.0, top_p=0.5, top_k=5, min_p=0.1, repetition_penalty=1.2,
                            max_new_tokens=7)
    kw = to_vllm_sampling_params(greedy)
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["min_p"], kw["n"]) == (0.0, 1.0, -1, 0.0, 2)
    assert kw["repetition_penalty"] == 1.2  # penalties change the argmax too
    sg = to_sglang_sampling_params(greedy)
    assert (sg["temperature"], sg["top_p"], sg["top_k"], sg["min_p"], sg["repetition_penalty"]) == (
        0.0, 1.0, -1, 0.0, 1.2)


def test_sglang_sampling_params_one_to_one():
    assert to_sglang_sampling_params(SAMPLED, max_new_tokens=9, seed=123) == dict(
        max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.25, stop_token_ids=[2, 5], ignore_eos=False, no_stop_trim=True,
        skip_special_tokens=False, stop=["###"], sampling_seed=123)
    assert "sampling_seed" not in to_sglang_sampling_params(SAMPLED)  # only in deterministic mode
    assert "n" not in to_sglang_sampling_params(SAMPLED)  # n is handled by repeating prompts


# ------------------------------------------------------------------------------ vLLM results


def _lp(x: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=x)  # vllm.sequence.Logprob's one field the adapter reads


def _vllm_out(index, tokens, lps, reason="stop", stop_reason=None):
    # Each step's dict also holds a top candidate other than the sampled token (ignored).
    steps = [{t: _lp(lp), t + 100: _lp(-9.0)} for t, lp in zip(tokens, lps)]
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=steps, finish_reason=reason,
                           stop_reason=stop_reason)


def test_from_vllm_outputs_logprobs_finish_reasons_and_sample_order():
    request = SimpleNamespace(outputs=[_vllm_out(1, [7, 8], [-0.5, -1.5], "length"),
                                       _vllm_out(0, [4, 2], [-0.25, -0.125], "stop", stop_reason=2)])
    [[first, second]] = from_vllm_outputs([request], SamplingParams(n=2))
    # Sorted by CompletionOutput.index; plain T = 1 sampling: processed = trainer-side logprob.
    assert first == Completion([4, 2], [-0.25, -0.125], "stop", sampled_logprobs=[-0.25, -0.125], stop_reason=2)
    assert second == Completion([7, 8], [-0.5, -1.5], "length", sampled_logprobs=[-0.5, -1.5])


@pytest.mark.parametrize("params, sampled, raw", [
    (SamplingParams(temperature=0.5, top_k=4), True, False),  # vLLM's processed = our sampled distribution
    (SamplingParams(temperature=0.0, top_k=4), False, False),  # greedy: vLLM ignores top-k, we do not
    (SamplingParams(top_p=0.9, min_p=0.1), False, False),  # min-p applied before top-p by vLLM, after by us
    (SamplingParams(return_raw_logprobs=True), True, True),  # T = 1, nothing on: all three coincide
])
def test_vllm_processed_logprob_fills_the_fields_it_equals(params, sampled, raw):
    [[c]] = from_vllm_outputs([SimpleNamespace(outputs=[_vllm_out(0, [3], [-0.75])])], params)
    assert c.logprobs == [-0.75]
    assert c.sampled_logprobs == ([-0.75] if sampled else None)
    assert c.raw_logprobs == ([-0.75] if raw else None)


def test_raw_logprobs_refused_where_the_engine_cannot_report_them():
    with pytest.raises(UserError) as err:
        vllm_adapter.check_vllm_logprob_request(SamplingParams(temperature=0.7, return_raw_logprobs=True))
    assert str(err.value) == ("return_raw_logprobs with the vLLM engine needs temperature 1 (or greedy) and no "
                              "penalties, top-k, top-p or min-p: vLLM reports one logprob per token")
    vllm_adapter.check_vllm_logprob_request(SamplingParams(temperature=0.0, return_raw_logprobs=True))
    with pytest.raises(UserError) as err:
        sglang_adapter.check_sglang_logprob_request(SamplingParams(presence_penalty=0.5, return_raw_logprobs=True))
    assert str(err.value) == ("return_raw_logprobs with the SGLang engine needs temperature 1 (or greedy) and no "
                              "penalties: SGLang reports one logprob per token")
    sglang_adapter.check_sglang_logprob_request(SamplingParams(top_k=3, return_raw_logprobs=True))


def test_from_vllm_outputs_regroups_per_sample_requests_and_replicates_greedy():
    requests = [SimpleNamespace(outputs=[_vllm_out(0, [i], [-float(i)])]) for i in range(4)]
    groups = from_vllm_outputs(requests, SamplingParams(n=2), samples_per_prompt=2)
    assert [[c.token_ids for c in g] for g in groups] == [[[0], [1]], [[2], [3]]]
    greedy = from_vllm_outputs(requests[:2], SamplingParams(n=3, temperature=0.0), samples_per_prompt=1)
    assert [[c.token_ids for c in g] for g in greedy] == [[[0]] * 3, [[1]] * 3]
    assert greedy[0][0] == greedy[0][1] and greedy[0][0].token_ids is not greedy[0][1].token_ids


def test_from_vllm_outputs_errors():
    aborted = SimpleNamespace(outputs=[_vllm_out(0, [1], [-1.0], "abort")])
    with pytest.raises(RuntimeError) as err:
        from_vllm_outputs([aborted])
    assert str(err.value) == ("vLLM aborted a rollout request (engine shut down or out of KV cache); "
                              "lower rollout.max_num_seqs or raise gpu_memory_utilization")
    with pytest.raises(RuntimeError) as err:
        from_vllm_outputs([SimpleNamespace(outputs=[_vllm_out(0, [1], [-1.0], None)])])
    assert str(err.value) == "vLLM returned finish_reason None; expected one of ['length', 'stop']"
    no_lp = SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[1, 2], logprobs=None, finish_reason="stop")])
    with pytest.raises(RuntimeError) as err:
        from_vllm_outputs([no_lp])
    assert str(err.value) == "vLLM returned 0 logprob steps for 2 tokens; the request must set logprobs=0"


# ------------------------------------------------------------------------------ SGLang results


def _sg_out(tokens, lps, reason):
    return {"output_ids": tokens, "meta_info": {"finish_reason": reason,
                                                "output_token_logprobs": [(lp, t, None) for t, lp in zip(tokens, lps)]}}


def test_from_sglang_outputs_regroups_repeated_prompts():
    outputs = [_sg_out([5, 2], [-0.5, -0.25], {"type": "stop", "matched": 2}),
               _sg_out([6, 7, 8], [-1.0, -2.0, -3.0], {"type": "length", "length": 3}),
               _sg_out([9, 4], [-0.75, -0.5], {"type": "stop", "matched": "###"}),
               _sg_out([1, 1, 1], [-0.1, -0.2, -0.3], {"type": "length", "length": 3})]
    groups = from_sglang_outputs(outputs, SamplingParams(n=2, temperature=0.9), samples_per_prompt=2)
    assert groups == [
        [Completion([5, 2], [-0.5, -0.25], "stop", sampled_logprobs=[-0.5, -0.25], stop_reason=2),
         Completion([6, 7, 8], [-1.0, -2.0, -3.0], "length", sampled_logprobs=[-1.0, -2.0, -3.0])],
        [Completion([9, 4], [-0.75, -0.5], "stop", sampled_logprobs=[-0.75, -0.5], stop_reason="###"),
         Completion([1, 1, 1], [-0.1, -0.2, -0.3], "length", sampled_logprobs=[-0.1, -0.2, -0.3])]]
    greedy = from_sglang_outputs(outputs[:2], SamplingParams(n=4, temperature=0.0), samples_per_prompt=1)
    assert [len(g) for g in greedy] == [4, 4]
    # Truncation on: SGLang's logprob is taken before top-k, so it is not the sampled distribution's.
    [[c]] = from_sglang_outputs(outputs[:1], SamplingParams(top_k=3), samples_per_prompt=1)
    assert c.logprobs == [-0.5, -0.25] and c.sampled_logprobs is None


def test_from_sglang_outputs_errors():
    with pytest.raises(RuntimeError) as err:
        from_sglang_outputs([_sg_out([1], [-1.0], {"type": "abort", "message": "out of memory"})], samples_per_prompt=1)
    assert str(err.value) == "SGLang aborted a rollout request: out of memory"
    with pytest.raises(RuntimeError) as err:
        from_sglang_outputs([{"meta_info": {"finish_reason": {"type": "stop"}}}], samples_per_prompt=1)
    assert str(err.value) == "SGLang returned no output_token_logprobs; generate needs return_logprob=True"
    with pytest.raises(ValueError) as err:
        from_sglang_outputs([_sg_out([1], [-1.0], {"type": "stop"})] * 3, samples_per_prompt=2)
    assert str(err.value) == "3 SGLang outputs do not split into groups of 2"


# ------------------------------------------------------------------------------ weights


def test_bucket_by_size_respects_budget_except_single_large_tensor():
    sizes = {"a": 10, "b": 20, "c": 5, "d": 100, "e": 3}  # float32 elements: 40, 80, 20, 400, 12 bytes
    named = [(n, torch.zeros(k)) for n, k in sizes.items()]
    buckets = list(bucket_by_size(named, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c"], ["d"], ["e"]]
    for bucket in buckets:
        nbytes = sum(t.numel() * 4 for _, t in bucket)
        assert nbytes <= 100 or len(bucket) == 1
    assert [[n for n, _ in b] for b in bucket_by_size(named, bucket_bytes=10**6)] == [["a", "b", "c", "d", "e"]]
    with pytest.raises(ValueError) as err:
        list(bucket_by_size(named, 0))
    assert str(err.value) == "bucket_bytes must be > 0, got 0"


def test_to_engine_names():
    t = torch.zeros(1)
    named = [("_orig_mod.model.layers.0.self_attn.q_proj.weight", t),
             ("hf_model.model.norm.weight", t),
             ("model.layers.0.self_attn.rotary_emb.inv_freq", t),
             ("model._checkpoint_wrapped_module.embed_tokens.weight", t),
             ("lm_head.weight", t)]
    assert [n for n, _ in to_engine_names(named, tie_word_embeddings=True)] == [
        "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    assert [n for n, _ in to_engine_names(named, tie_word_embeddings=False)][-1] == "lm_head.weight"
    assert [engine_param_name(n) for n in ("model.layers.1.self_attn.k_proj.bias", "model.layers.1.mlp.up_proj.weight",
                                           "model.layers.1.mlp.down_proj.weight")] == [
        "model.layers.1.self_attn.qkv_proj.bias", "model.layers.1.mlp.gate_up_proj.weight",
        "model.layers.1.mlp.down_proj.weight"]


def test_native_decoder_names_are_the_engines_hf_names(tiny_model):
    names = [n for n, _ in to_engine_names(tiny_model.named_parameters(), tie_word_embeddings=True)]
    # 2 layers x (q,k,v weight+bias, o, 2 norms, gate, up, down) + embedding + final norm; no lm_head.
    assert len(names) == 2 * 12 + 2 and "lm_head.weight" not in names
    assert names[0] == "model.embed_tokens.weight" and "model.layers.1.self_attn.v_proj.bias" in names


def test_engine_model_folder_writes_a_config_the_decoder_reads_back(tiny_model, tmp_path):
    assert engine_model_folder(tmp_path) == (str(tmp_path), None, None)
    path, tmp, module = engine_model_folder(tiny_model, overrides={"eos_token_id": None})
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        assert module is tiny_model and config["dtype"] == "float32" and config["eos_token_id"] is None
        assert ModelArgs.from_hf_config(config) == tiny_args(eos_token_id=None)
    finally:
        tmp.cleanup()
    assert not Path(path).exists()


# ------------------------------------------------------------------------------ versions, factory


def _version_is(monkeypatch, value):
    def version(name):
        if value is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return value
    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.parametrize("engine, message", [
    ("vllm", "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]'"),
    ("sglang", "rollout.engine=sglang needs SGLang: pip install -e '.[sglang]'"),
])
def test_missing_extra(monkeypatch, tiny_model, engine, message):
    _version_is(monkeypatch, None)
    with pytest.raises(UserError) as err:
        build_engine(engine, tiny_model, max_num_seqs=4)
    assert str(err.value) == message


@pytest.mark.parametrize("engine, version, message", [
    ("vllm", "0.8.5", "rollout.engine=vllm supports vllm>=0.10.2,<0.33, found vllm 0.8.5: pip install -e '.[vllm]'"),
    ("sglang", "0.6.1", "rollout.engine=sglang supports sglang>=0.4.6,<0.6, found sglang 0.6.1: "
                        "pip install -e '.[sglang]'"),
])
def test_wrong_version(monkeypatch, tiny_model, engine, version, message):
    _version_is(monkeypatch, version)
    with pytest.raises(UserError) as err:
        build_engine(engine, tiny_model)
    assert str(err.value) == message


def test_supported_version_passes_and_cpu_device_is_refused(monkeypatch, tiny_model):
    _version_is(monkeypatch, "0.11.0")
    assert require_package("vllm", vllm_adapter.VLLM_VERSIONS, "x", "rollout.engine=vllm", "vllm") == "0.11.0"
    with pytest.raises(UserError) as err:
        build_engine("vllm", tiny_model, device="cpu")
    assert str(err.value) == "rollout.engine=vllm needs a CUDA device (got cpu); use rollout.engine=native on CPU"


# ------------------------------------------------------------------------------ engine kwargs


def test_vllm_llm_kwargs():
    assert vllm_llm_kwargs("/m", tensor_parallel_size=2, gpu_memory_utilization=0.4, max_num_seqs=8,
                           max_model_len=96, seed=5, dtype=torch.bfloat16) == dict(
        model="/m", tensor_parallel_size=2, distributed_executor_backend="external_launcher", enable_sleep_mode=True,
        load_format="dummy", gpu_memory_utilization=0.4, max_num_seqs=8, max_model_len=96, seed=5, dtype="bfloat16",
        enforce_eager=False, generation_config="vllm", logprobs_mode="processed_logprobs", trust_remote_code=False,
        skip_tokenizer_init=True)
    assert vllm_llm_kwargs("/m", tokenizer="/tok")["tokenizer"] == "/tok"
    assert vllm_llm_kwargs("/m", trust_remote_code=True)["trust_remote_code"] is True


def test_sglang_engine_kwargs():
    assert sglang_engine_kwargs("/m", tp_size=1, mem_fraction_static=0.3, max_num_seqs=16, max_seq_len=128, seed=7,
                                dtype=torch.float32, base_gpu_id=3, deterministic=True) == dict(
        model_path="/m", tp_size=1, mem_fraction_static=0.3, load_format="dummy", random_seed=7, dtype="float32",
        max_running_requests=16, enable_memory_saver=True, disable_cuda_graph=False, base_gpu_id=3, log_level="error",
        trust_remote_code=False, context_length=128, skip_tokenizer_init=True, enable_deterministic_inference=True)
    assert sglang_engine_kwargs("/m", trust_remote_code=True)["trust_remote_code"] is True


def test_vllm_driver_model_path():
    module = torch.nn.Linear(1, 1)
    runner = SimpleNamespace(model=module)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner)))))
    assert vllm_driver_model(llm) is module
    runner.get_model = lambda: "unwrapped"  # newer runners unwrap CUDA-graph wrappers here
    assert vllm_driver_model(llm) == "unwrapped"


# ------------------------------------------------------------------------------ engines over fakes


class FakeVLLMModel:
    def __init__(self, known: set[str]):
        self.known, self.buckets = known, []

    def load_weights(self, weights):
        weights = list(weights)
        for name, _ in weights:
            if name not in self.known:
                raise KeyError(name)  # what vLLM's params_dict lookup raises
        self.buckets.append([n for n, _ in weights])
        return {n for n, _ in weights}


class FakeLLM:
    """Records calls; each sample's single token is its request seed mod 100."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.config = json.loads((Path(kwargs["model"]) / "config.json").read_text())  # readable while building
        self.model = FakeVLLMModel(KNOWN)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.model)))))
        self.calls = []

    def generate(self, requests, sampling_params, use_tqdm):
        self.calls.append(("generate", len(requests)))
        outs = []
        for req, sp in zip(requests, sampling_params):
            token = sp["seed"] % 100
            outs.append(SimpleNamespace(outputs=[_vllm_out(0, [token], [-0.5], "length")],
                                        prompt=req["prompt_token_ids"]))
        return outs

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


KNOWN = {n for n, _ in to_engine_names(build_model(None, args=tiny_args(), seed=0).named_parameters(),
                                      tie_word_embeddings=True)}


@pytest.fixture
def installed(monkeypatch) -> dict:
    """Distribution name -> the version ``importlib.metadata`` reports (absent = not installed)."""
    versions: dict[str, str] = {}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(importlib.metadata, "version", version)
    return versions


@pytest.fixture
def fake_vllm(monkeypatch, installed):
    installed["vllm"] = "0.11.0"
    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setattr(vllm_adapter, "import_engine_module", lambda name, key: fake)
    return fake


def test_vllm_engine_pushes_module_weights_in_buckets_and_generates_per_sample(fake_vllm, tiny_model):
    engine = build_engine("vllm", tiny_model, max_num_seqs=4, max_seq_len=16, update_weights_bucket_mb=1)
    llm = engine.llm
    assert llm.kwargs["model"] and not Path(llm.kwargs["model"]).exists()  # temp config folder removed
    assert ModelArgs.from_hf_config(llm.config) == tiny_args()
    assert (llm.kwargs["dtype"], llm.kwargs["max_num_seqs"], llm.kwargs["max_model_len"]) == ("float32", 4, 16)
    # Construction pushed every weight once (1 MiB holds the whole tiny model: one bucket).
    assert len(llm.model.buckets) == 1 and set(llm.model.buckets[0]) == KNOWN
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=10)
    result = engine.generate([[1, 2], [3]], params)
    # One request per sample, seeded by sample_seed(prompt seed, j): prompt i has seed 10 + i.
    assert [[c.token_ids[0] for c in g] for g in result] == [
        [sample_seed(10, 0) % 100, sample_seed(10, 1) % 100], [sample_seed(11, 0) % 100, sample_seed(11, 1) % 100]]
    greedy = engine.generate([[1, 2]], SamplingParams(n=3, temperature=0.0, max_new_tokens=4, seed=0))
    assert llm.calls[-1] == ("generate", 1) and len(greedy[0]) == 3


def test_vllm_engine_sleep_wake_and_update(fake_vllm, tiny_model):
    engine = build_engine("vllm", tiny_model, update_weights_bucket_mb=1)
    llm = engine.llm
    engine.sleep()
    engine.sleep()  # already asleep: no second call
    engine.update_weights([("model.norm.weight", torch.ones(16))])  # wakes the weights only
    engine.wake_up()
    assert llm.calls[-5:] == [("reset_prefix_cache",), ("sleep", 1), ("wake_up", ("weights",)),
                              ("reset_prefix_cache",), ("wake_up", ("kv_cache",))]
    with pytest.raises(ValueError) as err:
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.ones(1))])
    assert str(err.value) == "update_weights: the vLLM model has no parameter for 'model.layers.9.mlp.up_proj.weight'"
    engine.sleep(level=2)
    with pytest.raises(RuntimeError) as err:
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert str(err.value) == ("the vLLM engine has no real weights (dummy ones, or discarded by sleep(level=2)); "
                              "call update_weights before generate")
    with pytest.raises(ValueError) as err:
        engine.wake_up(["activations"])
    assert str(err.value) == "unknown wake_up tags ['activations']; choose from ['weights', 'kv_cache']"


class FakeSGLangEngine:
    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.config = json.loads((Path(kwargs["model_path"]) / "config.json").read_text())

    def generate(self, input_ids, sampling_params, return_logprob):
        assert return_logprob
        self.calls.append(("generate", [sp.get("sampling_seed") for sp in sampling_params]))
        return [_sg_out([len(ids)], [-0.5], {"type": "length"}) for ids in input_ids]

    def update_weights_from_tensor(self, named_tensors, flush_cache):
        self.calls.append(("update", len(named_tensors), flush_cache))
        return True, "ok"

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


@pytest.fixture
def fake_sglang(monkeypatch, installed):
    installed["sglang"] = "0.5.2"
    fake = SimpleNamespace(Engine=FakeSGLangEngine)
    monkeypatch.setattr(sglang_adapter, "import_engine_module", lambda name, key: fake)
    return fake


def test_sglang_engine_buckets_flush_once_and_repeats_prompts(fake_sglang, tiny_model):
    engine = build_engine("sglang", tiny_model, max_num_seqs=4, deterministic=True)
    eng = engine.engine
    assert eng.config["eos_token_id"] is None and eng.kwargs["enable_deterministic_inference"] is True
    eng.calls.clear()
    # Two 3 MiB tensors in 4 MiB buckets: two calls, the cache flushed only after the last one.
    engine.bucket_bytes = 4 * 1024**2
    big = torch.zeros(3 * 1024**2 // 4)
    engine.update_weights([("model.norm.weight", big), ("model.embed_tokens.weight", big)])
    assert eng.calls == [("update", 1, False), ("update", 1, True)]
    result = engine.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=3, seed=5))
    assert [[c.token_ids for c in g] for g in result] == [[[3], [3]], [[1], [1]]]  # fake token = prompt length
    assert eng.calls[-1] == ("generate", [sample_seed(5, 0), sample_seed(5, 1), sample_seed(6, 0), sample_seed(6, 1)])
    with pytest.raises(ValueError) as err:
        engine.update_weights([("model.layers.0.mlp.experts.weight", big)])
    assert str(err.value) == "update_weights: the model has no parameter named 'model.layers.0.mlp.experts.weight'"


def test_sglang_engine_sleep_releases_weights_until_updated(fake_sglang, tiny_model):
    engine = build_engine("sglang", tiny_model)
    eng = engine.engine
    engine.sleep()
    engine.wake_up()
    assert eng.calls[-2:] == [("release", None), ("resume", None)]
    with pytest.raises(RuntimeError) as err:
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert str(err.value) == ("the SGLang engine has no real weights (dummy ones, or released by sleep()); "
                              "call update_weights before generate")
    engine.sleep(["kv_cache"])  # weights stay: generation works after waking
    engine.update_weights([("model.norm.weight", torch.ones(16))])
    engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert eng.calls[-4:] == [("release", ["kv_cache"]), ("update", 1, True), ("resume", ["kv_cache"]),
                              ("generate", [None])]


def test_stop_strings_need_a_tokenizer(fake_vllm, fake_sglang, tiny_model):
    params = SamplingParams(max_new_tokens=4, stop=["\n\n"])
    with pytest.raises(UserError) as err:
        build_engine("vllm", tiny_model).generate([[1]], params)
    assert str(err.value) == ("stop strings need a tokenizer in the vLLM engine; pass its tokenizer folder "
                              "(VLLMEngine(tokenizer=...)) or use stop_token_ids")
    with pytest.raises(UserError) as err:
        build_engine("sglang", tiny_model).generate([[1]], params)
    assert str(err.value) == ("stop strings need a tokenizer in the SGLang engine; pass its tokenizer folder "
                              "(SGLangEngine(tokenizer=...)) or use stop_token_ids")


def test_folder_engines_load_its_weights_or_wait_for_update(fake_vllm, fake_sglang, tiny_model, tmp_path):
    from spmd_rl.models.hf_io import save_pretrained

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(tiny_args().to_hf_config()))
    save_pretrained(tiny_model, tiny_args(), tmp_path / "full")
    full = build_engine("vllm", str(tmp_path / "full"))
    assert full.llm.kwargs["load_format"] == "auto" and full.tie_word_embeddings is True
    assert len(full.generate([[1]], SamplingParams(max_new_tokens=2, seed=0))[0]) == 1
    empty = build_engine("vllm", str(config_only))
    assert empty.llm.kwargs["load_format"] == "dummy"
    with pytest.raises(RuntimeError):
        empty.generate([[1]], SamplingParams(max_new_tokens=2))
    sg = build_engine("sglang", str(tmp_path / "full"))
    assert sg.engine.kwargs["load_format"] == "auto" and sg.engine.config["eos_token_id"] == 3  # folder kept as is
    # Names come from the folder's safetensors headers: an unknown one fails before reaching SGLang.
    with pytest.raises(ValueError):
        sg.update_weights([("model.layers.5.mlp.up_proj.weight", torch.zeros(1))])
    assert build_engine("sglang", str(config_only)).engine.kwargs["load_format"] == "dummy"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_options_forward_trust_remote_code(engine):
    from spmd_rl.config import Config, load_config
    from spmd_rl.trainer.components import engine_options

    base = ["model.path=/m", "data.train_files=[t.parquet]", f"rollout.engine={engine}"]
    assert engine_options(load_config(Config, None, base), None)["trust_remote_code"] is False
    trusted = load_config(Config, None, [*base, "model.trust_remote_code=true"])
    assert engine_options(trusted, None)["trust_remote_code"] is True
