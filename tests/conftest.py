"""Test-session setup shared by every test folder."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on CPU); it must be chosen
# before triton is first imported. On a CUDA machine the kernels compile for the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def process_group():
    """A one-rank gloo process group for the duration of a test (torch.distributed code paths)."""
    from spmd_rl.distributed.init import destroy_distributed, free_port, init_distributed

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed(torch.device("cpu"))
    yield
    destroy_distributed()
    for key in keys:
        os.environ.pop(key, None)
