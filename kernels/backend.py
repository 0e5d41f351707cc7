"""Which implementation of the kernels a run uses: ``model.kernels: auto | triton | torch``.

``auto`` takes the Triton kernels on CUDA and the torch references elsewhere. ``triton`` on a
CPU-only machine works only under Triton's interpreter (``TRITON_INTERPRET=1``: correct but very
slow, meant for tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_kernel_backend(choice: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for ``choice`` on ``device``; a one-line ValueError when
    ``triton`` was asked for and cannot run."""
    if choice not in BACKENDS:
        raise ValueError(f"model.kernels={choice!r}: choose one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or interpreting())
    if choice == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not triton_available():
        raise ValueError("model.kernels=triton but the triton package is not installed: pip install triton, "
                         "or set model.kernels=auto")
    if not usable:
        raise ValueError(f"model.kernels=triton needs a CUDA device (this rank runs on {device}); use "
                         "model.kernels=auto, or TRITON_INTERPRET=1 to run Triton's interpreter on CPU (slow)")
    return "triton"
