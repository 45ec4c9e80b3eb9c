"""scripts/gpu_check.sh runs on the CPU (tiny variant) in CI, so it cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_check_script_runs_the_cpu_variant_and_writes_its_report(tmp_path):
    out = tmp_path / "report" / "gpu_check.md"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == ("gpu_check: no CUDA device found; running the "
                                           "tiny CPU variant")
    text = out.read_text()
    for heading in ("## Tests on the device", "## Quantized layers vs nn.Linear",
                    "## End to end"):
        assert heading in text
    assert " passed" in text and " failed" not in text
    for compiled in ("no", "yes"):
        rows = [line for line in text.splitlines()
                if line.startswith(f"| hybrid W8A11 static | {compiled} | 2 |")]
        assert len(rows) == 1 and rows[0].endswith("| True |")
    assert "| tiny w12 | bf16 autocast | hybrid W8A11 static |" in text
    assert not list(out.parent.glob("*.tmp"))


def test_gpu_check_refuses_cuda_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert "no CUDA device is available" in done.stderr.strip().splitlines()[-1]
