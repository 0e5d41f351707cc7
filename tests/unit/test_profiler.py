"""Step profiling: torch.profiler traces of chosen steps, cudaProfilerApi ranges from SPMD_RL_NSYS_STEPS,
and the Nsight Systems launcher's command line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from spmd_rl.config import Config, ConfigError, ProfilerConfig, load_config
from spmd_rl.observability.profiler import NSYS_STEPS_ENV, StepProfiler, parse_step_list

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]


def fake_step(step: int) -> None:
    a = torch.full((32, 32), float(step))
    (a @ a).sum()


def test_captures_only_the_chosen_step(tmp_path):
    profiler = StepProfiler(ProfilerConfig(enable=True, steps=[2]), tmp_path, rank=3, device="cpu", nsys_steps="")
    for step in (1, 2, 3):
        with profiler.step(step):
            fake_step(step)
    files = sorted((tmp_path / "profile").iterdir())
    assert files == [tmp_path / "profile" / "trace_step2_rank3.json"] == profiler.traces
    trace = json.loads(files[0].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert len(trace["traceEvents"]) > 0 and "aten::mm" in names


def test_out_dir_and_start_end_api(tmp_path):
    cfg = ProfilerConfig(enable=True, steps=[1, 3], out_dir=str(tmp_path / "traces"), record_shapes=True)
    profiler = StepProfiler(cfg, tmp_path / "run", rank=0, device="cpu", nsys_steps="")
    for step in (1, 2, 3):
        profiler.start_step(step)
        fake_step(step)
        profiler.end_step(step)
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["trace_step1_rank0.json", "trace_step3_rank0.json"]
    assert not (tmp_path / "run").exists()


def test_disabled_writes_nothing(tmp_path):
    profiler = StepProfiler(ProfilerConfig(enable=False, steps=[1]), tmp_path, rank=0, device="cpu", nsys_steps="")
    with profiler.step(1):
        fake_step(1)
    profiler.close()
    assert not (tmp_path / "profile").exists() and profiler.traces == []


def test_close_writes_a_trace_left_open(tmp_path):
    profiler = StepProfiler(ProfilerConfig(enable=True, steps=[1]), tmp_path, rank=0, device="cpu", nsys_steps="")
    profiler.start_step(1)
    fake_step(1)
    profiler.close()  # the step never ended (e.g. an exception escaped the loop)
    assert [p.name for p in profiler.traces] == ["trace_step1_rank0.json"]


@pytest.mark.parametrize("text, steps", [
    ("", set()), ("3", {3}), ("3-5", {3, 4, 5}), ("2,7", {2, 7}), (" 2-3, 8 ", {2, 3, 8}), ("4-4", {4}),
])
def test_parse_step_list(text, steps):
    assert parse_step_list(text) == steps


@pytest.mark.parametrize("text", ["0", "5-3", "a", "3-", "-2", "1-2-3"])
def test_parse_step_list_rejects(text):
    with pytest.raises(ValueError, match=r"bad step list .* use steps >= 1 as N, A-B \(A <= B\)"):
        parse_step_list(text)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as seen by the profiler, with cudaProfilerStart/Stop recorded instead of called."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    return calls


def test_nsys_range_opens_once_per_run_of_consecutive_steps(tmp_path, fake_cuda):
    profiler = StepProfiler(ProfilerConfig(), tmp_path, rank=0, device="cuda", nsys_steps="3-5,8")
    seen = []
    for step in range(1, 10):
        with profiler.step(step):
            seen.append((step, list(fake_cuda)))
    # Inside step 3 the capture is on; it stays on through 5, stops after 5, then covers 8 alone.
    assert [s for s, calls in seen if len(calls) % 2 == 1] == [3, 4, 5, 8]
    assert fake_cuda == ["start", "stop", "start", "stop"]


def test_nsys_steps_from_env_and_close_stops_an_open_capture(tmp_path, fake_cuda, monkeypatch):
    monkeypatch.setenv(NSYS_STEPS_ENV, "2-6")
    profiler = StepProfiler(ProfilerConfig(), tmp_path, rank=0, device="cuda")
    assert profiler.nsys_steps == {2, 3, 4, 5, 6}
    for step in (1, 2, 3):  # the run ends at step 3, inside the range
        with profiler.step(step):
            pass
    assert fake_cuda == ["start"]
    profiler.close()
    assert fake_cuda == ["start", "stop"]


def test_nsys_is_a_noop_on_cpu(tmp_path, fake_cuda):
    profiler = StepProfiler(ProfilerConfig(), tmp_path, rank=0, device="cpu", nsys_steps="1-2")
    for step in (1, 2, 3):
        with profiler.step(step):
            pass
    profiler.close()
    assert fake_cuda == []


def test_profiler_section_in_config():
    base = ["model.path=m", "data.train_files=[a.parquet]"]
    cfg = load_config(Config, None, base)
    assert cfg.profiler == ProfilerConfig(enable=False, steps=[2], out_dir="", with_stack=False, record_shapes=False)
    cfg = load_config(Config, None, [*base, "profiler.enable=true", "profiler.steps=[3,4]"])
    assert cfg.profiler.enable and cfg.profiler.steps == [3, 4]
    with pytest.raises(ConfigError, match=r"profiler.steps: \[0\]: steps are counted from 1"):
        load_config(Config, None, [*base, "profiler.steps=[0]"])


# ---------------------------------------------------------------- launch/nsys_profile.sh

def dry_run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DRY_RUN": "1", "NPROC_PER_NODE": "8", **env}
    return subprocess.run(["bash", str(ROOT / "launch" / "nsys_profile.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def test_nsys_launcher_per_rank(tmp_path):
    out = tmp_path / "nsys"
    result = dry_run(["--config", "configs/x.yaml", "trainer.run_dir=runs/a b"], NSYS_STEPS="3-5", NSYS_OUT=str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "SPMD_RL_NSYS_STEPS=3-5 torchrun --nnodes 1 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d "
        "--rdzv-endpoint 127.0.0.1:29500 --no-python nsys profile --trace=cuda,nvtx,osrt "
        "--capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true "
        f"-o {out}/rank%q{{RANK}} python -m spmd_rl.train --config configs/x.yaml trainer.run_dir=runs/a\\ b")
    assert not out.exists()  # a dry run creates nothing


def test_nsys_launcher_per_node():
    result = dry_run(["--config", "c.yaml"], NSYS_MODE="node", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0",
                     NSYS_OUT="out", NSYS_STEPS="4", NSYS_CAPTURE_END="repeat", NSYS_EXTRA="--sample=none",
                     ENTRY="spmd_rl.sft")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "SPMD_RL_NSYS_STEPS=4 nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi "
        "--capture-range-end=repeat --force-overwrite=true --sample=none -o out/node1 torchrun --nnodes 2 "
        "--node-rank 1 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 -m spmd_rl.sft --config c.yaml")


def test_nsys_launcher_rejects_unknown_mode():
    result = dry_run([], NSYS_MODE="job")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: NSYS_MODE=job is not valid (choose from: rank, node)"
