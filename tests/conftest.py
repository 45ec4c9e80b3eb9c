import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_jit_tiny"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the tests that take the `device` fixture (e.g. cuda: "
                          "scripts/gpu_check.sh runs them there)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda: no CUDA device is available", returncode=2)
    return device


@pytest.fixture
def accelerator_plan(device, monkeypatch):
    """The execution plan of an accelerator: native on one, emulated on the CPU by taking
    the CPU out of quantizers.plan.BLOCKWISE_DEVICE_TYPES."""
    from jit.quant import plan

    if device.type == "cpu":
        monkeypatch.setattr(plan, "BLOCKWISE_DEVICE_TYPES", frozenset())
    return device


# pytest-xdist runs one worker per core (`-n auto`): each worker then computes on one thread,
# so workers do not oversubscribe the cores. Without xdist, two threads (the 2-core machine).
THREADS_PER_WORKER = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if os.environ.get("PYTEST_XDIST_WORKER"):
    # and so do the `python run.py` processes the tests start (a test that needs a given
    # thread count sets OMP_NUM_THREADS in its own environment)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(THREADS_PER_WORKER)
    yield


@pytest.fixture(scope="session")
def official_tiny_cases():
    return torch.load(OFFICIAL_TINY / "cases.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_tiny_ckpt_path():
    return OFFICIAL_TINY / "checkpoint-last.pth"
