"""The launch scripts: launch/train.sh (torchrun on one or several nodes) and launch/slurm_train.sbatch
(one torchrun per Slurm node). Their DRY_RUN=1 lines are checked word by word; a short real run on
CPU checks that the torchrun the sbatch script builds accepts its flags and passes the arguments on
intact. launch/nsys_profile.sh's command lines are tested in test_profiler.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = ROOT / "launch" / "train.sh"
SBATCH = ROOT / "launch" / "slurm_train.sbatch"
ARGS = ["--config", "configs/grpo_addition.yaml", "trainer.total_steps=3", "trainer.run_dir=runs/a b"]
# Settings the scripts read; removed from the inherited environment so that a test run inside a
# Slurm job, or a shell with any of these exported, sees only what each test sets.
READ_BY_SCRIPTS = {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "GPUS_PER_NODE",
                   "ENTRY", "HEAD_NODE", "LOG_DIR", "VENV", "DRY_RUN", "OMP_NUM_THREADS", "NCCL_DEBUG",
                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def run_script(script: Path, args: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in READ_BY_SCRIPTS and not k.startswith("SLURM_")}
    # The scripts call `python`/`torchrun`: use the ones of the interpreter running the tests.
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    return subprocess.run(["bash", str(script), *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def fake_scontrol(folder: Path, names: str) -> Path:
    """An ``scontrol`` that records that it ran and prints ``names``, first on PATH."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "scontrol"
    tool.write_text(f'#!/usr/bin/env bash\necho "$*" > "{folder}/scontrol_called"\nprintf "{names}"\n')
    tool.chmod(0o755)
    return bin_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- launch/slurm_train.sbatch

SLURM = {"DRY_RUN": "1", "SLURM_NNODES": "4", "SLURM_JOB_ID": "123", "HEAD_NODE": "node-a", "GPUS_PER_NODE": "8"}
SRUN = ["srun", "--nodes", "4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]


def torchrun_words(nproc: str = "8", endpoint: str = "node-a:29500", entry: str = "spmd_rl.train") -> list[str]:
    # Each node's torchrun runs under the wrapper that reports a saved preemption as success.
    return ["python", "-m", "spmd_rl.preemption", "torchrun", "--nnodes", "4", "--nproc-per-node", nproc, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "123", "--shutdown-timeout", "110", "-m", entry]


@needs_bash
def test_sbatch_dry_run_prints_srun_torchrun_line(tmp_path):
    bin_dir = fake_scontrol(tmp_path, "node-z\\n")
    result = run_script(SBATCH, ARGS, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **SLURM)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1  # exactly one line
    assert shlex.split(result.stdout) == [*SRUN, "--output", "logs/spmd-rl-123/%N.log", "--open-mode=append",
                                          *torchrun_words(), *ARGS]
    assert "trainer.run_dir=runs/a\\ b" in result.stdout  # the space is quoted, not split
    assert not (tmp_path / "scontrol_called").exists()  # HEAD_NODE given: scontrol is never asked
    assert result.stderr.strip() == ("launch: 4 node(s) x 8 worker(s), rendezvous node-a:29500 (id 123), "
                                     "OMP_NUM_THREADS=1, per-node logs in logs/spmd-rl-123/")
    assert not (ROOT / "logs" / "spmd-rl-123").exists()  # a dry run creates nothing


@needs_bash
def test_sbatch_head_node_from_scontrol_and_slurm_gpu_counts(tmp_path):
    bin_dir = fake_scontrol(tmp_path, "gpu-017\\ngpu-018\\ngpu-019\\ngpu-020\\n")
    env = {**SLURM, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[017-020]",
           "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "64", "SLURM_JOB_NAME": "grpo",
           "MASTER_PORT": "29612", "ENTRY": "spmd_rl.sft"}
    del env["HEAD_NODE"], env["GPUS_PER_NODE"]
    result = run_script(SBATCH, ["--config", "c.yaml"], **env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scontrol_called").read_text() == "show hostnames gpu-[017-020]\n"
    assert shlex.split(result.stdout) == [*SRUN, "--cpus-per-task", "64", "--output", "logs/grpo-123/%N.log",
                                          "--open-mode=append",
                                          *torchrun_words("4", "gpu-017:29612", "spmd_rl.sft"), "--config", "c.yaml"]
    # 64 CPUs of the task shared by 4 workers.
    assert "OMP_NUM_THREADS=16," in result.stderr
    # SLURM_GPUS_ON_NODE (what Slurm gave this node) wins over the requested SLURM_GPUS_PER_NODE;
    # GPUS_PER_NODE wins over both.
    on_node = run_script(SBATCH, [], **{**env, "SLURM_GPUS_ON_NODE": "2"})
    assert word_after(on_node.stdout, "--nproc-per-node") == "2"
    forced = run_script(SBATCH, [], **{**env, "SLURM_GPUS_ON_NODE": "2", "GPUS_PER_NODE": "3"})
    assert word_after(forced.stdout, "--nproc-per-node") == "3"
    nothing = run_script(SBATCH, [], **{k: v for k, v in env.items() if k != "SLURM_GPUS_PER_NODE"})
    assert word_after(nothing.stdout, "--nproc-per-node") == "8"


def word_after(line: str, flag: str) -> str:
    words = shlex.split(line)
    return words[words.index(flag) + 1]


@needs_bash
@pytest.mark.parametrize(("drop", "message"), [
    ("SLURM_NNODES", "error: SLURM_NNODES is not set: submit with sbatch (for DRY_RUN=1 outside Slurm set "
                     "SLURM_NNODES, SLURM_JOB_ID and HEAD_NODE)"),
    ("SLURM_JOB_ID", "error: SLURM_JOB_ID is not set: submit with sbatch (for DRY_RUN=1 outside Slurm set "
                     "SLURM_NNODES, SLURM_JOB_ID and HEAD_NODE)"),
    ("HEAD_NODE", "error: neither HEAD_NODE nor SLURM_JOB_NODELIST is set: cannot tell the rendezvous host"),
])
def test_sbatch_missing_setting_is_one_line(drop, message):
    result = run_script(SBATCH, ARGS, **{k: v for k, v in SLURM.items() if k != drop})
    assert (result.returncode, result.stdout, result.stderr.strip()) == (2, "", message)


@needs_bash
def test_sbatch_rejects_bad_numbers_and_missing_venv(tmp_path):
    result = run_script(SBATCH, [], **{**SLURM, "GPUS_PER_NODE": "eight"})
    assert (result.returncode, result.stderr.strip()) == (2, "error: GPUS_PER_NODE=eight is not a positive integer")
    result = run_script(SBATCH, [], **{**SLURM, "VENV": str(tmp_path / "nope")})
    assert (result.returncode, result.stderr.strip()) == (2, f"error: VENV={tmp_path / 'nope'} has no bin/activate")


@needs_bash
def test_sbatch_activates_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\nexport SEEN_VENV=yes\n')
    tool = venv / "bin" / "srun"  # a real run then meets this srun first on PATH
    tool.write_text(f'#!/usr/bin/env bash\necho "$SEEN_VENV $OMP_NUM_THREADS $PYTHONUNBUFFERED" > "{tmp_path}/ran"\n')
    tool.chmod(0o755)
    result = run_script(SBATCH, [], cwd=tmp_path, **{**SLURM, "DRY_RUN": "0", "VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran").read_text() == "yes 1 1\n"
    assert (tmp_path / "logs" / "spmd-rl-123").is_dir()  # LOG_DIR is created before srun starts


# ---------------------------------------------------------------- launch/train.sh

@needs_bash
def test_train_sh_single_node_by_default():
    result = run_script(TRAIN_SH, ARGS, DRY_RUN="1", NPROC_PER_NODE="8")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "8",
                                          "-m", "spmd_rl.train", *ARGS]
    assert "trainer.run_dir=runs/a\\ b" in result.stdout


@needs_bash
def test_train_sh_counts_gpus_when_not_told():
    result = run_script(TRAIN_SH, [], DRY_RUN="1", ENTRY="spmd_rl.evaluate")
    assert result.returncode == 0, result.stderr
    expected = str(max(1, torch.cuda.device_count()))
    assert result.stdout.strip() == f"torchrun --standalone --nnodes 1 --nproc-per-node {expected} -m spmd_rl.evaluate"


@needs_bash
def test_train_sh_multi_node():
    env = {"DRY_RUN": "1", "NPROC_PER_NODE": "8", "NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node-a",
           "MASTER_PORT": "29555", "ENTRY": "spmd_rl.sft"}
    result = run_script(TRAIN_SH, ARGS, **env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == ["torchrun", "--nnodes", "4", "--node-rank", "2", "--nproc-per-node", "8",
                                          "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:29555",
                                          "-m", "spmd_rl.sft", *ARGS]
    # Only a port: still one node, rendezvous on this machine at that port.
    result = run_script(TRAIN_SH, [], DRY_RUN="1", NPROC_PER_NODE="2", MASTER_PORT="29601")
    assert result.stdout.strip() == ("torchrun --nnodes 1 --node-rank 0 --nproc-per-node 2 --rdzv-backend c10d "
                                     "--rdzv-endpoint 127.0.0.1:29601 -m spmd_rl.train")


@needs_bash
@pytest.mark.parametrize(("env", "message"), [
    ({"NNODES": "2"}, "error: NNODES=2 needs MASTER_ADDR: set it to node 0's host name or IP, the same on every node"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"},
     "error: NODE_RANK=2 is not valid for NNODES=2 (choose from 0 to 1)"),
    ({"NNODES": "0", "MASTER_ADDR": "h"}, "error: NNODES=0 is not a positive integer"),
    ({"NPROC_PER_NODE": "-1"}, "error: NPROC_PER_NODE=-1 is not a positive integer"),
])
def test_train_sh_bad_settings_are_one_line(env, message):
    result = run_script(TRAIN_SH, ARGS, DRY_RUN="1", **{"NPROC_PER_NODE": "8", **env})
    assert (result.returncode, result.stdout, result.stderr.strip()) == (2, "", message)


# ---------------------------------------------------------------- a real run (CPU, 2 workers)

ECHO_MODULE = """import json, os, sys
with open(os.path.join(os.environ["ECHO_OUT"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "world": os.environ["WORLD_SIZE"], "omp": os.environ["OMP_NUM_THREADS"]}, f)
"""


def echo_entry(folder: Path) -> dict[str, str]:
    """ENTRY=echo_args: a module that writes its arguments and a few torchrun settings per rank."""
    (folder / "echo_args.py").write_text(ECHO_MODULE)
    return {"ENTRY": "echo_args", "PYTHONPATH": str(folder), "ECHO_OUT": str(folder)}


def echoed(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@needs_bash
def test_sbatch_runs_torchrun_under_srun(tmp_path):
    # An srun stand-in for one node: it drops srun's own options and runs the task in place.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" != python ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"SLURM_NNODES": "1", "SLURM_JOB_ID": "77", "HEAD_NODE": "127.0.0.1", "GPUS_PER_NODE": "2",
           "SLURM_CPUS_PER_TASK": "4", "MASTER_PORT": str(free_port()),
           "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = run_script(SBATCH, ["--config", "a b.yaml", "x=1"], cwd=tmp_path, **env, **echo_entry(tmp_path))
    assert result.returncode == 0, result.stderr
    assert echoed(tmp_path) == [{"argv": ["--config", "a b.yaml", "x=1"], "world": "2", "omp": "2"}] * 2
    assert (tmp_path / "logs" / "spmd-rl-77").is_dir()


# ---------------------------------------------------------------- syntax

@needs_bash
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch")))
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, "")
