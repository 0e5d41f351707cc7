"""Optional experiment trackers chosen by ``logging.backends``: TensorBoard, W&B, MLflow, SwanLab.

Each tracker is one small class with ``log(step, metrics)`` and ``close()``; its package is
imported only when the backend is chosen, so a run that uses none of them needs none installed.
:class:`~spmd_rl.observability.logger.MetricsLogger` creates them on rank 0 only and hands them
plain ``{name: float}`` dicts (non-numeric values already dropped).

Where each one writes, for a run directory ``<run_dir>``:

* ``tensorboard``: event files in ``<run_dir>/tensorboard``.
* ``wandb``: ``<run_dir>/wandb``; ``WANDB_MODE=offline`` (W&B's own variable) keeps it off the
  network, ``wandb sync`` uploads later.
* ``mlflow``: ``logging.mlflow_tracking_uri``, default the file store ``file:<run_dir>/mlruns``.
  MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; it is set here when unset
  and the URI is a file store. MLflow forbids ``@`` in names: it becomes ``_at_``
  (``val-core/acc@4`` -> ``val-core/acc_at_4``); any other forbidden character becomes ``_``.
* ``swanlab``: ``<run_dir>/swanlog``; the mode comes from SwanLab's own settings
  (``SWANLAB_MODE=offline`` or ``local`` for no network).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from spmd_rl.errors import UserError

# backend name -> (module imported, pip extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "swanlab": ("swanlab", "swanlab"),
}


def missing_package_message(backend: str, reason: str = "") -> str:
    """The one-line error for a chosen tracker whose package cannot be imported."""
    module, extra = TRACKERS[backend]
    why = f" ({reason})" if reason else ""
    return (f"logging.backends has '{backend}' but the {module} package is not installed{why}; "
            f"install it with: pip install -e '.[{extra}]' (or remove '{backend}' from logging.backends)")


def check_installed(backends: list[str]) -> None:
    """Raise :class:`UserError` for the first chosen tracker whose package is absent.

    Uses ``find_spec`` only (no import), so every rank can call it and all fail alike."""
    for backend in backends:
        if backend in TRACKERS:
            try:
                found = importlib.util.find_spec(TRACKERS[backend][0]) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise UserError(missing_package_message(backend))


def _import(backend: str, module: str | None = None):
    try:
        return importlib.import_module(module or TRACKERS[backend][0])
    except ImportError as e:
        raise UserError(missing_package_message(backend, _first_line(e))) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def build_trackers(backends: list[str], run_dir: str | Path, *, project: str = "spmd-rl", experiment: str = "",
                   mlflow_tracking_uri: str = "", config: dict | None = None) -> list:
    """One tracker per chosen backend that is a tracker (console/jsonl are not), in the given order.

    ``experiment`` empty = the run directory's name; ``config`` (the resolved config as a nested
    dict) is recorded as the run's hyper-parameters."""
    run_dir = Path(run_dir)
    name = experiment or run_dir.resolve().name
    trackers = []
    try:
        for backend in dict.fromkeys(backends):  # a backend listed twice is created once
            if backend == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir, config))
            elif backend == "wandb":
                trackers.append(WandbTracker(run_dir, project, name, config))
            elif backend == "mlflow":
                trackers.append(MlflowTracker(run_dir, project, name, mlflow_tracking_uri, config))
            elif backend == "swanlab":
                trackers.append(SwanLabTracker(run_dir, project, name, config))
    except BaseException:
        for tracker in trackers:  # finish the runs already started, so none is left open
            tracker.close()
        raise
    return trackers


class TensorBoardTracker:
    """Scalars to ``<run_dir>/tensorboard``; the config as a text summary named ``config``.

    TensorBoard takes ``/`` (it groups charts by prefix), ``@`` and NaN as they are."""

    def __init__(self, run_dir: Path, config: dict | None = None):
        _import("tensorboard")  # torch's writer needs the tensorboard package; name it if absent
        SummaryWriter = _import("tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config:
            # Four-space indent = a code block in TensorBoard's markdown text view.
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run with files under ``<run_dir>/wandb``; ``WANDB_MODE`` decides online/offline.

    W&B takes ``/`` (panel sections), ``@`` and NaN as they are."""

    def __init__(self, run_dir: Path, project: str, experiment: str, config: dict | None = None):
        wandb = _import("wandb")
        # W&B puts its files in <dir>/wandb; that folder must exist or it falls back to a temp dir.
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, name=experiment, dir=str(run_dir), config=config or {})
        except Exception as e:  # not logged in, no network, bad settings: a setup problem, not a bug
            raise UserError(f"wandb could not start a run: {_first_line(e)}; run `wandb login`, or set "
                            "WANDB_MODE=offline to log to <run_dir>/wandb without network") from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD_CHARS = re.compile(r"[^/\w.\- :]")
_MLFLOW_BATCH_PARAMS = 100   # MLflow's per-request limits for log_batch
_MLFLOW_BATCH_METRICS = 1000
_MLFLOW_PARAM_VALUE_MAX = 500  # the smallest limit across MLflow servers and versions


def mlflow_key(name: str) -> str:
    """An MLflow-legal metric/param name: ``@`` -> ``_at_``, other forbidden characters -> ``_``.

    MLflow allows letters, digits, ``_ - . / :`` and space; ``pass@k`` style names are common here."""
    return _MLFLOW_BAD_CHARS.sub("_", name.replace("@", "_at_"))


def is_file_store(uri: str) -> bool:
    """True for ``file:`` URIs and bare paths (what MLflow treats as a local file store)."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # one letter = a Windows drive


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"actor": {"optim": {"lr": 1e-6}}}`` -> ``{"actor.optim.lr": 1e-6}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def _mlflow_experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created if absent (another run may create it at the same time)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MlflowTracker:
    """An MLflow run in experiment ``project`` named ``experiment``; config as params.

    Uses :class:`mlflow.MlflowClient` (no global active run), so it does not interfere with other
    MLflow use in the process. NaN is kept (the sqlite store turns inf into the largest double)."""

    def __init__(self, run_dir: Path, project: str, experiment: str, tracking_uri: str = "",
                 config: dict | None = None):
        self.tracking_uri = tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if is_file_store(self.tracking_uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = _import("mlflow")
        from mlflow.entities import Metric, Param
        self._Metric = Metric
        try:
            self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            experiment_id = _mlflow_experiment_id(self.client, project)
            self.run_id = self.client.create_run(experiment_id, run_name=experiment).info.run_id
        except Exception as e:  # unreachable server, unknown URI scheme, unwritable folder
            raise UserError(f"mlflow could not start a run at logging.mlflow_tracking_uri={self.tracking_uri!r}: "
                            f"{_first_line(e)}; use a file: or sqlite: URI or a reachable server") from None
        params = [Param(mlflow_key(k), str(v)[:_MLFLOW_PARAM_VALUE_MAX])
                  for k, v in flatten_config(config or {}).items()]
        for start in range(0, len(params), _MLFLOW_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH_PARAMS])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        batch = [self._Metric(mlflow_key(k), v, now_ms, step) for k, v in metrics.items()]
        for start in range(0, len(batch), _MLFLOW_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[start:start + _MLFLOW_BATCH_METRICS])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class SwanLabTracker:
    """A SwanLab run logging to ``<run_dir>/swanlog``; SwanLab's settings (``SWANLAB_MODE``) pick the mode.

    SwanLab takes ``/``, ``@`` and NaN as they are (it stores inf as NaN)."""

    def __init__(self, run_dir: Path, project: str, experiment: str, config: dict | None = None):
        swanlab = _import("swanlab")
        try:
            self.run = swanlab.init(project=project, name=experiment, config=config or {},
                                    log_dir=str(run_dir / "swanlog"), reinit=True)
        except Exception as e:  # not logged in, no TTY for the login prompt, no network
            raise UserError(f"swanlab could not start a run: {_first_line(e)}; run `swanlab login`, or set "
                            "SWANLAB_MODE=offline (or local) to log to <run_dir>/swanlog without network") from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
