"""``python -m spmd_rl.export``: a DCP checkpoint written by FSDP2 training becomes an HF folder that
transformers loads with the trained model's logits; sharding, bf16, generation config, bad input."""

from __future__ import annotations

import json
import shutil
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from spmd_rl.config import Config, DataConfig, ModelConfig, OptimConfig, save_config
from spmd_rl.errors import UserError
from spmd_rl.export import load_checkpoint_state, main
from spmd_rl.models import ModelArgs, Transformer, build_model, save_pretrained
from spmd_rl.models.hf_io import load_weights
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 49  # the char tokenizer: 5 specials (<|pad|>=0 ... <|end|>=3, the eos) + 44 characters
SEQUENCES = [[1, 9, 20, 8, 2], [1, 30, 31, 32, 33, 34, 35, 2, 6], [7], [48, 0, 3, 12]]
ARCHS = {
    # Qwen2 with tied embeddings, as examples/make_tiny_model.py writes it.
    "qwen2": ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=VOCAB, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       tie_word_embeddings=True, attention_bias=True, eos_token_id=3, pad_token_id=0),
    # Llama with an untied head and two stop ids in its config.json.
    "llama": ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=VOCAB, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       tie_word_embeddings=False, eos_token_id=[3, 1], bos_token_id=1),
}


def _gpt2_model(folder: Path) -> None:
    """A tiny GPT-2 (tied head), a type only the generic transformers path runs."""
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     eos_token_id=3, bos_token_id=1)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))


def _train_and_save(rank, world_size, root):
    """One AdamW step of each tiny policy under FSDP2, saved the way the trainer saves it."""
    from spmd_rl.distributed.parallel_dims import ParallelDims
    from spmd_rl.distributed.parallelize import apply_fsdp
    from spmd_rl.trainer.checkpoint import Checkpointer
    from spmd_rl.trainer.optim import build_optimizer
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs

    mesh = ParallelDims(1, -1, 1, 1, 1, world_size).build_mesh("cpu")
    for name in (*ARCHS, "gpt2"):
        run_dir = Path(root) / name
        policy = apply_fsdp(PolicyModel(build_model(str(run_dir / "model"))), mesh["dp"])
        optimizer = build_optimizer(policy, OptimConfig(lr=1e-2))
        logprobs, _ = policy(build_scoring_inputs([[1, 5, 6], [2, 7]], [[8, 9, 3], [10, 3]], "cpu"))
        (-logprobs.sum()).backward()
        optimizer.step()
        Checkpointer(run_dir, rank).save(1, {"actor": (policy, optimizer)}, {"step": 1})
        full = {k: v.full_tensor().detach().clone() for k, v in policy.decoder.state_dict().items()}
        if rank == 0:
            torch.save(full, run_dir / "trained.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``root/{qwen2,llama}``: model folder, config.yaml, checkpoints/step_000001, trained.pt."""
    from spmd_rl.data.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("export")
    build_char_tokenizer(str(root / "qwen2" / "model"))
    (root / "llama" / "model").mkdir(parents=True)
    # Sampling defaults and an extra stop id of the source folder must survive the export.
    (root / "llama" / "model" / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 2}))
    for name, args in ARCHS.items():
        save_pretrained(build_model(None, args=args, seed=0), args, root / name / "model")
        model_cfg = ModelConfig(path=str(root / name / "model"), tokenizer_path=str(root / "qwen2" / "model"))
        save_config(Config(model=model_cfg, data=DataConfig(train_files=["unused.parquet"])), root / name / "config.yaml")
    _gpt2_model(root / "gpt2" / "model")
    model_cfg = ModelConfig(path=str(root / "gpt2" / "model"), tokenizer_path=str(root / "qwen2" / "model"))
    save_config(Config(model=model_cfg, data=DataConfig(train_files=["unused.parquet"])), root / "gpt2" / "config.yaml")
    run_on_ranks(_train_and_save, 1, str(root))
    return root


def trained_model(run: Path) -> tuple[Transformer, dict[str, torch.Tensor]]:
    args = ARCHS[run.name]
    params = torch.load(run / "trained.pt", weights_only=True)
    with torch.device("meta"):
        model = Transformer(args)
    load_weights(model, dict(params), dtype=torch.float32, source="trained.pt")
    return model.eval(), params


def assert_same_logits(hf_dir: Path, run: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference, _ = trained_model(run)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for seq in SEQUENCES:
            ids = torch.tensor([seq])
            expected = reference.compute_logits(reference(ids, torch.arange(len(seq))[None]))
            torch.testing.assert_close(hf(ids).logits, expected, atol=1e-5, rtol=0)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the CLI entry point run in this process."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generic_transformers_run_exports_under_its_own_names(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from spmd_rl.models import GenericCausalLM

    run, out = runs / "gpt2", tmp_path / "hf"
    ckpt = run / "checkpoints" / "step_000001"
    code, stdout, err = run_main([str(ckpt), str(out)], capsys)
    assert code == 0, err
    assert stdout.splitlines()[0] == f"loading actor/model from {ckpt} (GPT2LMHeadModel, generic transformers model)"
    trained = GenericCausalLM.from_pretrained(run / "model").eval()
    params = torch.load(run / "trained.pt", weights_only=True)
    trained.load_state_dict(params)
    init = GenericCausalLM.from_pretrained(run / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: transformers re-ties it
    with torch.no_grad():
        for seq in SEQUENCES:
            ids = torch.tensor([seq])
            expected = trained.hf_model(ids).logits
            torch.testing.assert_close(exported(ids).logits, expected, atol=1e-5, rtol=0)
            assert (expected - init.hf_model(ids).logits).abs().max() > 1e-2  # the trained weights, not the initial ones


def test_training_changed_the_logits(runs):
    """Otherwise the logits checks below could pass on the initial weights."""
    ids = torch.tensor([SEQUENCES[1]])
    positions = torch.arange(ids.shape[1])[None]
    for name, args in ARCHS.items():
        trained, _ = trained_model(runs / name)
        init = build_model(None, args=args, seed=0)
        with torch.no_grad():
            change = trained.compute_logits(trained(ids, positions)) - init.compute_logits(init(ids, positions))
        assert change.abs().max().item() > 1e-2, name


def test_cli_subprocess_writes_folder_transformers_loads(runs, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    run, out = runs / "qwen2", tmp_path / "hf"
    # --config left out: the run's config.yaml two levels above the checkpoint is used.
    proc = subprocess.run([sys.executable, "-m", "spmd_rl.export", str(run / "checkpoints" / "step_000001"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"loading actor/model from {run / 'checkpoints' / 'step_000001'} (Qwen2ForCausalLM, 2 layers)"
    # 2 layers x 12 tensors (q/k/v with biases, o, 3 MLP, 2 norms) + embedding + final norm;
    # the tied lm_head is not written.
    assert lines[1].startswith(f"writing 26 tensors (0.1 MiB, float32) to {out}")
    assert lines[-1] == f"done: {out} (1 safetensors file)"
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    assert "model.safetensors.index.json" not in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folder left beside it
    assert_same_logits(out, run)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("12+3=15")["input_ids"] == [6, 7, 15, 8, 18, 6, 10]  # "0" is id 5, "+" id 15, "=" id 18
    assert tokenizer.eos_token_id == 3 and tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(str(out))
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (3, 0, None)


def test_sharded_export_has_index_and_loads_identically(runs, tmp_path, capsys):
    run, out = runs / "llama", tmp_path / "sharded"
    # 16 KiB shards: the 49x32 fp32 embedding alone is 6272 bytes, each MLP matrix 8 KiB.
    code, stdout, err = run_main([str(run / "checkpoints" / "step_000001"), str(out), "--config",
                                  str(run / "config.yaml"), "--shard-size-mb", str(16 / 1024)], capsys)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert len(index["weight_map"]) == 21  # 2 x 9 (q/k/v/o, 3 MLP, 2 norms) + embedding + norm + untied lm_head
    assert stdout.strip().splitlines()[-1] == f"done: {out} ({len(files)} safetensors files)"
    _, params = trained_model(run)
    written = {}
    for f in files:
        with safe_open(str(out / f), "pt") as handle:
            written.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert written.keys() == params.keys()
    assert all(torch.equal(written[k], params[k]) for k in params)
    assert_same_logits(out, run)
    # The source folder's sampling default is kept; eos = source 2, then config.json's 3 and 1.
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"temperature": 0.7, "eos_token_id": [2, 3, 1], "bos_token_id": 1, "pad_token_id": 0}


def test_bfloat16_export_and_overwrite(runs, tmp_path, capsys):
    run, out = runs / "qwen2", tmp_path / "bf16"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ckpt = str(run / "checkpoints" / "step_000001")
    code, _, err = run_main([ckpt, str(out), "--dtype", "bfloat16"], capsys)
    assert code == 2 and err == f"error: output folder {out} exists and is not empty; pass --overwrite to replace it or choose a new folder\n"
    assert (out / "stale.txt").read_text() == "old"
    code, stdout, err = run_main([ckpt, str(out), "--dtype", "bfloat16", "--overwrite"], capsys)
    assert code == 0, err
    assert "(0.0 MiB, bfloat16)" in stdout.splitlines()[1]
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, params = trained_model(run)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        emb = handle.get_tensor("model.embed_tokens.weight")
        assert "lm_head.weight" not in handle.keys()
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, params["model.embed_tokens.weight"].to(torch.bfloat16))


def test_load_checkpoint_state_reads_only_the_named_state_dict(runs):
    run = runs / "llama"
    state = load_checkpoint_state(run / "checkpoints" / "step_000001")
    params = torch.load(run / "trained.pt", weights_only=True)
    assert sorted(state) == sorted(f"decoder.{k}" for k in params)
    assert all(torch.equal(state[f"decoder.{k}"], v) for k, v in params.items())
    with pytest.raises(UserError, match=r"holds no tensors under 'critic/model' \(it holds \['actor/model', 'actor/optim'\]\)"):
        load_checkpoint_state(run / "checkpoints" / "step_000001", prefix="critic/model")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_from_before_the_critic_stores_the_policy_as_model(runs, tmp_path, capsys):
    """Older checkpoints saved ``{"model": ..., "optim": ...}`` instead of ``actor/model``."""
    import torch.distributed.checkpoint as dcp

    run = runs / "llama"
    params = torch.load(run / "trained.pt", weights_only=True)
    legacy = tmp_path / "checkpoints" / "step_000003"
    dcp.save({"model": {f"decoder.{k}": v for k, v in params.items()}, "optim": {"step": torch.tensor(3.0)}},
             checkpoint_id=str(legacy), no_dist=True)
    shutil.copy(run / "config.yaml", tmp_path / "config.yaml")
    code, stdout, err = run_main([str(legacy), str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith(f"loading model from {legacy} (LlamaForCausalLM")
    assert_same_logits(tmp_path / "hf", run)


def _bad_inputs(runs: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (argv, the one error line)."""
    ckpt = runs / "qwen2" / "checkpoints" / "step_000001"
    moved = tmp / "moved" / "step_000001"  # a checkpoint copied away from its run folder
    shutil.copytree(ckpt, moved)
    (tmp / "empty").mkdir()
    megatron_ckpt = tmp / "megatron" / "step_000001"  # the key layout of a megatron actor's one shard
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"actor/tp0_pp0/model": {"stage.decoder.final_layernorm.weight": torch.ones(2)}},
                 checkpoint_id=str(megatron_ckpt), no_dist=True)
    gpt2 = tmp / "gpt2"
    shutil.copytree(runs / "qwen2" / "model", gpt2)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    hint = "pass a <run_dir>/checkpoints/step_XXXXXX folder"
    out = str(tmp / "out")
    return {
        "missing checkpoint": ([str(tmp / "nope"), out], f"checkpoint folder {tmp / 'nope'} does not exist; {hint}"),
        "no .metadata": ([str(tmp / "empty"), out],
                         f"{tmp / 'empty'} has no .metadata, so it is not a complete DCP checkpoint; {hint}"),
        "checkpoints folder": ([str(ckpt.parent), out],
                               f"{ckpt.parent} has no .metadata, so it is not a complete DCP checkpoint (this is a "
                               f"checkpoints folder; its newest checkpoint is {ckpt}); {hint}"),
        "missing default config": ([str(moved), out],
                                   f"no config.yaml at {tmp / 'config.yaml'} (the run folder two levels above the "
                                   "checkpoint); pass --config <run_dir>/config.yaml"),
        "missing --config": ([str(ckpt), out, "--config", str(tmp / "x.yaml")],
                             f"config file {tmp / 'x.yaml'} does not exist; pass --config <run_dir>/config.yaml"),
        "non-empty out_dir": ([str(ckpt), str(runs / "qwen2" / "model")],
                              f"output folder {runs / 'qwen2' / 'model'} exists and is not empty; pass --overwrite "
                              "to replace it or choose a new folder"),
        "out_dir holds the checkpoint": ([str(ckpt), str(runs / "qwen2"), "--overwrite"],
                                         f"output folder {runs / 'qwen2'} contains the checkpoint {ckpt}; choose a "
                                         "folder outside it"),
        "generic config, native checkpoint": ([str(ckpt), out, f"model.path={gpt2}"],
                                              f"checkpoint {ckpt} holds the native decoder (decoder.<HF name>), but "
                                              f"{gpt2 / 'config.json'} describes a generic transformers model; pass the "
                                              "--config of the run that wrote this checkpoint"),
        "native config, generic checkpoint": ([str(runs / "gpt2" / "checkpoints" / "step_000001"), out, "--config",
                                               str(runs / "qwen2" / "config.yaml")],
                                              f"checkpoint {runs / 'gpt2' / 'checkpoints' / 'step_000001'} holds a generic "
                                              "transformers model (decoder.hf_model.*) but "
                                              f"{runs / 'qwen2' / 'model' / 'config.json'} describes the native decoder; "
                                              "add model.implementation=generic (the run's setting)"),
        "megatron checkpoint, generic config": ([str(megatron_ckpt), out, "--config", str(runs / "gpt2" / "config.yaml")],
                                                f"checkpoint {megatron_ckpt} was written by actor.strategy=megatron (the "
                                                f"native decoder), but {runs / 'gpt2' / 'model' / 'config.json'} describes "
                                                "a generic transformers model; pass the --config of the run that wrote "
                                                "this checkpoint"),
        # Qwen2 weights with a Llama config: Llama has no q/k/v biases (the untied lm_head exists in both).
        "other architecture": ([str(ckpt), out, "--config", str(runs / "llama" / "config.yaml")],
                               f"checkpoint {ckpt} does not match the architecture in {runs / 'llama' / 'model' / 'config.json'} "
                               "(unexpected ['model.layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.q_proj.bias', "
                               "'model.layers.0.self_attn.v_proj.bias']); pass the --config of the run that wrote this checkpoint"),
        "bad dtype": ([str(ckpt), out, "--dtype", "float16"],
                      "argument --dtype: invalid choice: 'float16' (choose from 'bfloat16', 'float32'); "
                      "see python -m spmd_rl.export --help"),
        "bad shard size": ([str(ckpt), out, "--shard-size-mb", "0"], "--shard-size-mb must be > 0, got 0.0"),
    }


def test_bad_inputs_exit_2_with_one_line(runs, tmp_path, capsys):
    for case, (argv, message) in _bad_inputs(runs, tmp_path).items():
        code, stdout, err = run_main(argv, capsys)
        assert code == 2, (case, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (case, err)
        line = err[len("error: "):].rstrip("\n")
        assert line == message, (case, line)
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spmd_rl.export", str(tmp_path / "nope"), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: checkpoint folder {tmp_path / 'nope'} does not exist; "
                           "pass a <run_dir>/checkpoints/step_XXXXXX folder\n")


def test_remote_code_goes_with_a_config_that_names_it(tmp_path):
    from spmd_rl.models.generic import GenericExportArgs, copy_remote_code

    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir(), out.mkdir()
    (source / "modeling_custom.py").write_text("# model code\n")
    copy_remote_code(source, GenericExportArgs({"tie_word_embeddings": False}), out)
    assert not list(out.iterdir())  # no auto_map: nothing to carry
    copy_remote_code(source, GenericExportArgs({"tie_word_embeddings": False,
                                                "auto_map": {"AutoModelForCausalLM": "modeling_custom.M"}}), out)
    assert (out / "modeling_custom.py").read_text() == "# model code\n"


def test_tensors_sharing_memory_are_written_as_copies(tmp_path):
    # a tied head under a name other than lm_head.weight would reach safetensors as shared memory,
    # which it refuses; each name gets its own copy instead
    from safetensors.torch import load_file

    from spmd_rl.models.generic import GenericExportArgs

    embedding = torch.randn(5, 3)
    state = {"model.embed.weight": embedding, "model.out.weight": embedding, "model.norm.weight": torch.ones(3)}
    save_pretrained(state, GenericExportArgs({"tie_word_embeddings": True, "model_type": "x"}), tmp_path / "m")
    written = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert written.keys() == state.keys() and torch.equal(written["model.out.weight"], embedding)
