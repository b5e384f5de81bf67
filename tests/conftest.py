"""Test configuration shared by every test module.

Without CUDA the Triton kernels run in Triton's CPU interpreter, so TRITON_INTERPRET must be
set before anything imports triton: that is done here, at collection, before the test
modules are imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlab._hub_kernels import use_installed_kernels_package  # noqa: E402
# pytest runs from the repository root, whose `kernels/` folder would answer to the Hub's
# package name when transformers imports it (see fastlab._hub_kernels)
use_installed_kernels_package()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device, none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def interpreter_only(request):
    """For modules whose CPU tests force the kernel on CPU tensors (Triton's interpreter): on
    a CUDA machine only their gpu tests run."""
    if HAS_CUDA and "gpu" not in request.keywords:
        pytest.skip("CPU interpreter test: runs where no CUDA device is present")


@pytest.fixture
def device():
    """The device real-size checks run on: CUDA when present."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
