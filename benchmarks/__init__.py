"""Benchmarks of the project's real code paths: `python -m benchmarks.<name>`; figures
and the commands that made them in benchmarks/RESULTS.md."""

from jit.openmp import prefer_short_spin

prefer_short_spin()  # before a benchmark imports torch (jit/openmp.py)
