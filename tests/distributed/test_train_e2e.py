"""A short 2-rank torchrun RL run on CPU: metrics.jsonl in verl's names, checkpoint and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spmd_rl.preemption import PREEMPTED_FILE_ENV

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

REQUIRED_METRICS = [
    "actor/pg_loss", "actor/pg_clipfrac", "actor/grad_norm", "critic/score/mean", "response_length/mean",
    "timing_s/gen", "timing_s/step", "perf/throughput", "rollout/logprob_diff_max",
]


def run(cmd, cwd, **env):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def torchrun(module, nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """Addition data, a char tokenizer and a briefly SFT-ed tiny model (2 ranks)."""
    root = tmp_path_factory.mktemp("run")
    run([sys.executable, "-m", "spmd_rl.data.prepare.addition", "--out", str(root / "data"), "--num-train", "512",
         "--num-test", "16", "--max-digits", "2", "--tokenizer-out", str(root / "init")], REPO)
    run([sys.executable, str(REPO / "examples/make_tiny_model.py"), "--tokenizer", str(root / "init"),
         "--out", str(root / "init"), "--hidden-size", "32", "--layers", "2"], REPO)
    run(torchrun("spmd_rl.sft", 2, "--config", str(REPO / "configs/sft_addition.yaml"),
                 f"model.path={root / 'init'}", f"data.train_files=[{root / 'data/sft_train.parquet'}]",
                 "data.train_batch_size=16", "data.micro_batch_size_per_gpu=8", "trainer.total_steps=4",
                 f"trainer.output_dir={root / 'sft'}", "logging.progress_bar=false"), REPO)
    return root


def grpo_args(root, steps, *extra):
    return ["--config", str(REPO / "configs/grpo_addition.yaml"), f"model.path={root / 'sft/model'}",
            f"data.train_files=[{root / 'data/train.parquet'}]", f"data.val_files=[{root / 'data/test.parquet'}]",
            "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "actor.micro_batch_size_per_device=4",
            "rollout.n=4", "rollout.val_n=2", f"trainer.total_steps={steps}", f"trainer.run_dir={root / 'grpo'}", "trainer.test_freq=0",
            "trainer.val_before_train=false", "trainer.save_freq=2", "trainer.save_hf_at_end=false", *extra]


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_two_rank_run_writes_metrics_and_resumes(sft_model):
    root = sft_model
    first = run(torchrun("spmd_rl.train", 2, *grpo_args(root, 2, "trainer.resume=never",
                                                      "trainer.val_before_train=true")), REPO)
    rows = read_metrics(root / "grpo/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0 <= rows[0]["val-core/synthetic/addition/acc/mean@2"] <= 1  # validation before any update
    rows = rows[1:]
    for name in REQUIRED_METRICS:
        assert all(name in r for r in rows), name
    every_step = {"gen", "reward", "old_log_prob", "adv", "update_actor", "update_weights", "step"}
    for r in rows:
        assert every_step <= {k.removeprefix("timing_s/") for k in r if k.startswith("timing_s/")}, r
    assert "timing_s/save_checkpoint" in rows[1] and "timing_s/testing" in rows[1]  # save_freq=2, val_at_end
    # val_at_end ran with rollout.val_n=2 samples per held-out prompt
    assert 0 <= rows[-1]["val-core/synthetic/addition/acc/mean@2"] <= 1
    # The engine and the trainer score the same tokens with the same math (fp32, CPU).
    assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-4
    ckpt = root / "grpo/checkpoints"
    assert (ckpt / "latest").read_text() == "step_000002"
    assert "resumed" not in first.stdout

    second = run(torchrun("spmd_rl.train", 2, *grpo_args(root, 4, "trainer.resume=auto")), REPO)
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    rows = read_metrics(root / "grpo/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert (ckpt / "latest").read_text() == "step_000004"
    assert (root / "grpo/config.yaml").is_file()
    state = torch.load(ckpt / "step_000004/trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["trainer"]["total_steps"] == 4  # the resolved config travels along


VOLATILE = ("timing_s/", "perf/")  # wall-clock numbers differ between any two runs


def test_resumed_run_logs_the_same_metrics_as_an_uninterrupted_one(sft_model):
    """Stop after step 2, resume to 4: rows 3 and 4 equal those of a straight 4-step run, bit for bit."""
    root = sft_model
    # A reward that fails on some responses: the cumulative reward/errors must continue across the resume.
    flaky = root / "flaky_reward.py"
    flaky.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                     "    if len(solution_str) % 3 == 0:\n"
                     "        raise ValueError('flaky')\n"
                     "    return float(ground_truth in solution_str)\n")
    reward = f"reward.custom_function.path={flaky}"
    straight = root / "straight"
    run(torchrun("spmd_rl.train", 2, *grpo_args(root, 4, "trainer.resume=never", reward,
                                                f"trainer.run_dir={straight}")), REPO)
    split = root / "split"
    # The split run also saves asynchronously, keeps one checkpoint and exports HF folders on the way.
    options = ("trainer.async_save=true", "trainer.keep_last_k=1", "trainer.save_hf_every=1", reward,
               f"trainer.run_dir={split}")
    run(torchrun("spmd_rl.train", 2, *grpo_args(root, 2, "trainer.resume=never", *options)), REPO)
    run(torchrun("spmd_rl.train", 2, *grpo_args(root, 4, "trainer.resume=auto", *options)), REPO)
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["latest", "step_000004"]
    assert sorted(p.name for p in (split / "hf_steps").iterdir()) == [f"step_00000{i}" for i in (1, 2, 3, 4)]
    hf = split / "hf_steps/step_000004"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= {
        p.name for p in hf.iterdir()}
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] is not None
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(split / "metrics.jsonl")}
    for step in (3, 4):
        stable_a = {k: v for k, v in a[step].items() if not k.startswith(VOLATILE)}
        stable_b = {k: v for k, v in b[step].items() if not k.startswith(VOLATILE)}
        assert stable_a == stable_b, {k: (stable_a[k], stable_b.get(k)) for k in stable_a if stable_a[k] != stable_b.get(k)}
    assert 0 < b[2]["reward/errors"] < b[4]["reward/errors"]  # the flaky reward did fail, before and after


def test_bad_world_size_is_one_line(sft_model):
    result = subprocess.run(torchrun("spmd_rl.train", 2, *grpo_args(sft_model, 1, "data.train_batch_size=3",
                                                                     "actor.ppo_mini_batch_size=3")),
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "error: data.train_batch_size: 3 must be divisible by the data-parallel size 2" in result.stderr
    assert "Traceback" not in result.stderr.split("error:")[0]


def test_sigterm_saves_a_checkpoint_and_exits_zero(sft_model):
    """Slurm preemption: SIGTERM to the workers -> the step finishes, all ranks save, exit 0."""
    import signal
    import time

    root = sft_model
    run_dir = root / "preempted"
    marker = root / "logs/preempted"
    # As under Slurm: the signal goes to the launcher (torchrun, in the wrapper the sbatch script
    # uses), which passes it on to its workers.
    command = [sys.executable, "-m", "spmd_rl.preemption",
               *torchrun("spmd_rl.train", 2, *grpo_args(root, 500, "trainer.resume=never", "trainer.save_freq=0",
                                                          f"trainer.run_dir={run_dir}"))]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", PREEMPTED_FILE_ENV: str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "SIGTERM: saved step" in out
    assert marker.read_text().startswith("saved step ")
    # torchrun itself exits non-zero after the signal; the wrapper turns that into the job's success.
    assert "preemption: SIGTERM ended the launcher after the run saved its checkpoint" in err
    last_step = read_metrics(metrics)[-1]["step"]
    assert 2 <= last_step < 500
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{last_step:06d}"


def test_random_init_trains_from_a_config_only_folder(sft_model, tmp_path):
    # model.random_init: the folder needs no weights; the policy (and the reference of the KL
    # loss) start from the seeded init, which the engine then generates from.
    import shutil

    folder = tmp_path / "config_only"
    shutil.copytree(sft_model / "init", folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert not list(folder.glob("*.safetensors"))
    run(torchrun("spmd_rl.train", 1, *grpo_args(sft_model, 1, f"model.path={folder}", "model.random_init=true",
                                                "actor.use_kl_loss=true", f"trainer.run_dir={tmp_path / 'run'}",
                                                "trainer.save_freq=0")), REPO)
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert rows[0]["rollout/logprob_diff_max"] < 1e-4  # the engine got the trainer's random init
    assert rows[0]["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same init
    assert rows[0]["actor/entropy"] > 3.5  # near ln(vocab) = 3.9: a random policy, not the SFT-ed weights


def test_generic_transformers_model_trains_and_exports_at_the_end(sft_model, tmp_path):
    # GPT-2 is no native architecture: the generic transformers path trains it under FSDP2 on 2
    # ranks, the hf engine generates, and the run ends by writing run_dir/hf under GPT-2's own
    # names (this crashed on the missing ModelArgs, after all the training).
    import transformers

    from spmd_rl.export import load_checkpoint_state

    folder = tmp_path / "gpt2"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(sft_model / "init"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)).save_pretrained(str(folder))
    (tmp_path / "reward.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                                        "    return (len(solution_str) % 4) / 3\n")  # varies within a group
    run_dir = tmp_path / "run"
    run(torchrun("spmd_rl.train", 2, *grpo_args(sft_model, 2, f"model.path={folder}", "rollout.engine=hf",
                                                f"trainer.run_dir={run_dir}", "trainer.save_hf_at_end=true",
                                                "data.max_response_length=8",
                                                f"reward.custom_function.path={tmp_path / 'reward.py'}")), REPO)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "actor/pg_loss" in r] == [1, 2]
    assert all(r["actor/grad_norm"] > 0 for r in rows if "actor/grad_norm" in r)
    assert json.loads((run_dir / "hf/config.json").read_text())["model_type"] == "gpt2"
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"), dtype=torch.float32)
    trained = load_checkpoint_state(run_dir / "checkpoints/step_000002")  # the same final weights
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, trained[f"decoder.hf_model.{name}"], rtol=0, atol=0, msg=name)
    initial = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    assert max((exported.state_dict()[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # it learned


def test_hf_engine_generates_for_a_native_decoder(sft_model, tmp_path):
    # rollout.engine=hf with a Qwen2 folder: the trainer runs the native decoder, the engine a
    # transformers Qwen2 that takes the trainer's weights at every sync (it used to get the native
    # decoder, which has no generate)
    run(torchrun("spmd_rl.train", 1, *grpo_args(sft_model, 1, "rollout.engine=hf", f"trainer.run_dir={tmp_path / 'run'}",
                                                "trainer.save_freq=0")), REPO)
    row = read_metrics(tmp_path / "run/metrics.jsonl")[-1]
    assert row["step"] == 1 and row["response_length/mean"] > 0
    assert row["rollout/logprob_diff_max"] < 1e-4  # transformers' Qwen2 and the native decoder agree
