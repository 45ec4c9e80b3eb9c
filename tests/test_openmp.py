"""The entry points set OpenMP's spin before torch loads (jit/openmp.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jit import openmp

ROOT = Path(__file__).resolve().parents[1]

# Records GOMP_SPINCOUNT at the moment `torch` is first imported, then imports MODULE.
SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT", "unset"))
        return None
sys.meta_path.insert(0, Spy())
import {module}
print(seen[0] if seen else "torch not imported")
"""


def spin_seen_by_torch(module: str, spin: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", SPY.format(module=module)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["run", "benchmarks.end_to_end"])
def test_entry_points_set_the_spin_before_torch_loads(module):
    assert spin_seen_by_torch(module, None) == str(openmp.GOMP_SPIN_COUNT)


def test_a_spin_set_by_the_user_wins():
    assert spin_seen_by_torch("run", "77") == "77"


def test_prefer_short_spin_says_when_it_is_too_late(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert "torch" in sys.modules  # the test session has loaded torch already
    assert openmp.prefer_short_spin() is False
    assert os.environ["GOMP_SPINCOUNT"] == str(openmp.GOMP_SPIN_COUNT)
