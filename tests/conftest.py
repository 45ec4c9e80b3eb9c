from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_jit_tiny"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores here; more threads only oversubscribe and make timings noisy.
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def official_tiny_cases():
    return torch.load(OFFICIAL_TINY / "cases.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_tiny_ckpt_path():
    return OFFICIAL_TINY / "checkpoint-last.pth"
