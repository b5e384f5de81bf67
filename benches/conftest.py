"""Bench configuration: GPU only; one Recorder per session writes ``--fastlab-json``.

Each bench test takes the ``bench`` fixture and calls ``bench.measure(...)`` once per
provider; pytest-benchmark's ``benchmark`` fixture, where a test uses it, times the same
callable with a synchronising timer so its table shows wall time per call too.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--fastlab-json", default=os.environ.get("FASTLAB_BENCH_JSON"),
                     help="write every bench record (with peer ratios) to this JSON file")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu: benches need a CUDA device, none is present")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def bench(request):
    from benches._harness import Machine, Recorder

    recorder = Recorder(Machine())
    yield recorder
    path = request.config.getoption("--fastlab-json")
    if path:
        recorder.write(path)


def optional_import(name):
    """A peer's module, or a skip naming it when it is not installed or does not load."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception as exc:  # a peer wheel built for another torch raises at import
        pytest.skip(f"peer {name} not available: {type(exc).__name__}: {exc}")
