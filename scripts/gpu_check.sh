#!/usr/bin/env bash
# GPU readiness in one command (benchmarks/gpu_check.py): device tests, layer timings,
# end-to-end images/s and peak memory, written to one markdown report (--out, default
# gpu_check.md). Without CUDA it says so and runs the tiny CPU variant.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m benchmarks.gpu_check "$@"
