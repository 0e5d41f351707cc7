"""Experiment trackers: config names, missing-package errors, name mapping, and a 3-step run per
installed backend read back from what it wrote (TensorBoard events, W&B offline run, MLflow store,
SwanLab offline run)."""

import importlib.util
import json
import os
import struct
import sys
import time

import pytest
import torch

from spmd_rl.config import LoggingConfig
from spmd_rl.config_loader import ConfigError
from spmd_rl.errors import UserError
from spmd_rl.observability.logger import MetricsLogger, numeric_metrics
from spmd_rl.observability.trackers import (
    TensorBoardTracker,
    build_trackers,
    flatten_config,
    is_file_store,
    mlflow_key,
)

torch.set_num_threads(1)

VALID = ["console", "jsonl", "tensorboard", "wandb", "mlflow", "swanlab"]
# Values exact in binary, so their decimal and float64 forms are known byte for byte.
STEPS = {1: 0.125, 2: 0.375, 3: 0.625}
CONFIG = {"actor": {"optim": {"lr": 1e-6}}, "data": {"train_files": ["a.parquet"]}, "logging": {"backends": []}}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs(module: str):
    return pytest.mark.skipif(not installed(module),
                              reason=f"{module} is not installed (pip install -e '.[{module}]')")


def log_three_steps(run_dir, backends, **kwargs) -> None:
    logger = MetricsLogger(run_dir, backends, enabled=True, console_print=lambda line: None,
                           config=CONFIG, **kwargs)
    for step, acc in STEPS.items():
        logger.log(step, {"val-core/acc@4": acc, "actor/pg_loss": -acc, "note": "text", "nan/metric": float("nan")})
    logger.close()
    logger.close()  # a second close is a no-op


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and nothing written outside tmp_path by W&B or SwanLab."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # wandb-core debug logs
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab_root"))


# ---- config ------------------------------------------------------------------------------------

def test_config_accepts_every_backend():
    cfg = LoggingConfig(backends=list(VALID))
    assert cfg.backends == VALID
    assert (cfg.project, cfg.experiment, cfg.mlflow_tracking_uri) == ("spmd-rl", "", "")


def test_config_rejects_unknown_backend_listing_valid_ones():
    with pytest.raises(ConfigError) as e:
        LoggingConfig(backends=["console", "neptune", "tensorbord"])
    assert str(e.value) == f"backends: unknown ['neptune', 'tensorbord'] (choose from {VALID})"


# ---- missing packages --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow", "swanlab"])
def test_missing_package_is_one_line_naming_the_extra(backend, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import <backend>` fail
    for enabled in (True, False):  # every rank fails alike, not only rank 0
        with pytest.raises(UserError) as e:
            MetricsLogger(tmp_path / "run", ["console", backend], enabled=enabled)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg == (f"logging.backends has '{backend}' but the {backend} package is not installed; "
                       f"install it with: pip install -e '.[{backend}]' (or remove '{backend}' from logging.backends)")
    assert not (tmp_path / "run").exists()


def test_import_failure_inside_tracker_is_a_user_error(monkeypatch, tmp_path):
    # torch.utils.tensorboard may already be imported; the tracker still names the missing package.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"^logging.backends has 'tensorboard' .*pip install -e '\.\[tensorboard\]'"):
        TensorBoardTracker(tmp_path, None)


def test_console_and_jsonl_build_no_tracker(tmp_path):
    assert build_trackers(["console", "jsonl"], tmp_path) == []
    logger = MetricsLogger(tmp_path, ["jsonl"], enabled=True)
    logger.log(1, {"a": 1, "n": float("nan"), "note": "text", "t": torch.tensor(0.5)})
    logger.close()
    # JSONL keeps every value: numbers as float, NaN as its string, text as is.
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 1, "a": 1.0, "n": "nan", "note": "text", "t": 0.5}


@needs("tensorboard")
def test_only_rank0_creates_trackers(tmp_path):
    logger = MetricsLogger(tmp_path / "run", ["tensorboard"], enabled=False)
    logger.log(1, {"a": 1.0})
    logger.close()
    assert logger.trackers == [] and not (tmp_path / "run").exists()


# ---- name and value mapping --------------------------------------------------------------------

def test_mlflow_key_maps_at_sign_and_forbidden_characters():
    assert mlflow_key("val-core/acc@4") == "val-core/acc_at_4"
    assert mlflow_key("val-core/gsm8k/acc/mean@16") == "val-core/gsm8k/acc/mean_at_16"
    assert mlflow_key("timing_s/step") == "timing_s/step"
    assert mlflow_key("a+b=c (x)") == "a_b_c _x_"


def test_is_file_store():
    assert is_file_store("file:///tmp/run/mlruns") and is_file_store("/tmp/run/mlruns") and is_file_store("mlruns")
    assert not is_file_store("sqlite:///tmp/mlflow.db") and not is_file_store("http://localhost:5000")


def test_flatten_config():
    assert flatten_config(CONFIG) == {"actor.optim.lr": 1e-6, "data.train_files": ["a.parquet"], "logging.backends": []}
    assert flatten_config({"a": {}}) == {"a": {}}


def test_numeric_metrics_drops_non_numbers_keeps_nan():
    out = numeric_metrics({"a": 1, "b": torch.tensor(2.5), "c": "text", "d": None, "e": float("nan"), "f": True})
    assert set(out) == {"a", "b", "e", "f"}
    assert (out["a"], out["b"], out["f"]) == (1.0, 2.5, 1.0) and out["e"] != out["e"]


# ---- one run per installed backend -------------------------------------------------------------

@needs("tensorboard")
def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_three_steps(tmp_path, ["jsonl", "tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"val-core/acc@4", "actor/pg_loss", "nan/metric"}
    assert [(e.step, e.value) for e in acc.Scalars("val-core/acc@4")] == list(STEPS.items())
    assert [e.value for e in acc.Scalars("actor/pg_loss")] == [-0.125, -0.375, -0.625]
    assert acc.Tags()["tensors"] == ["config/text_summary"]  # the hyper-parameters as text


@needs("wandb")
def test_wandb_offline_run_holds_history(tmp_path, offline):
    log_three_steps(tmp_path, ["jsonl", "wandb"], project="proj", experiment="exp1")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record_file,) = runs[0].glob("run-*.wandb")
    # W&B's background service may finish writing its log a moment after run.finish() returns.
    expected = [t.encode() for t in ("val-core/acc@4", "actor/pg_loss", "0.125", "0.375", "0.625", "-0.625", "exp1")]
    deadline = time.monotonic() + 20
    while not all(t in record_file.read_bytes() for t in expected) and time.monotonic() < deadline:
        time.sleep(0.1)
    data = record_file.read_bytes()
    # History values are stored as JSON text next to their keys.
    assert [t for t in expected if t not in data] == []


@needs("mlflow")
@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_mlflow_metric_history(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = tmp_path / "my-run"
    uri = "" if store == "file" else f"sqlite:///{tmp_path}/mlflow.db"
    log_three_steps(run_dir, ["jsonl", "mlflow"], project="proj", mlflow_tracking_uri=uri)
    uri = uri or (run_dir / "mlruns").resolve().as_uri()
    assert os.environ.get("MLFLOW_ALLOW_FILE_STORE") == ("true" if store == "file" else None)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val-core/acc_at_4")
    assert [(m.step, m.value) for m in history] == list(STEPS.items())
    assert run.data.params["actor.optim.lr"] == "1e-06"
    assert "note" not in run.data.metrics


@needs("mlflow")
def test_mlflow_keeps_a_user_set_file_store_flag(tmp_path, monkeypatch):
    from spmd_rl.observability.trackers import MlflowTracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "1")
    MlflowTracker(tmp_path, "proj", "exp").close()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "1"


@needs("swanlab")
def test_swanlab_offline_run_holds_values(tmp_path, offline):
    log_three_steps(tmp_path, ["jsonl", "swanlab"], project="proj", experiment="exp1")
    (record_file,) = (tmp_path / "swanlog").glob("run-*/run-*.swanlab")
    data = record_file.read_bytes()
    assert b"val-core/acc@4" in data and b"actor/pg_loss" in data
    for acc in STEPS.values():  # scalars are stored as little-endian float64
        assert struct.pack("<d", acc) in data and struct.pack("<d", -acc) in data


@needs("mlflow")
def test_mlflow_bad_uri_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^mlflow could not start a run at logging.mlflow_tracking_uri='bogus://x': "):
        MetricsLogger(tmp_path, ["mlflow"], enabled=True, mlflow_tracking_uri="bogus://x")


@needs("tensorboard")
def test_a_failing_tracker_closes_the_ones_already_started(tmp_path, monkeypatch):
    from spmd_rl.observability import trackers

    closed = []
    monkeypatch.setattr(trackers.TensorBoardTracker, "close", lambda self: closed.append("tensorboard"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb's import fails after TensorBoard started
    with pytest.raises(UserError, match="pip install -e '.\\[wandb\\]'"):
        build_trackers(["tensorboard", "wandb"], tmp_path)
    assert closed == ["tensorboard"]
