"""Test-session setup shared by every test folder."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on CPU); it must be chosen
# before triton is first imported. On a CUDA machine the kernels compile for the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
