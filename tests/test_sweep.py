"""The sweep summary on hand-made sweep folders: which overrides count as swept, integer
axes, the float baseline, and `python -m jit.sweep` for a sweep that stopped early."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jit.sweep import SWEEP_ID_FILE, collect_rows, plot_figure

ROOT = Path(__file__).resolve().parents[1]


def make_sweep(folder: Path, jobs: list[dict], command_line: list[str] | None = None) -> Path:
    """jobs: {"overrides": [...], "results": {...} or None}; all of one sweep."""
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_ID_FILE).write_text("this")
    if command_line is not None:
        (folder / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": command_line}}}))
    for num, job in enumerate(jobs):
        job_dir = folder / str(num)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in job["overrides"]))
        (job_dir / SWEEP_ID_FILE).write_text("this")
        if job.get("results") is not None:
            (job_dir / "results.json").write_text(json.dumps(job["results"]))
    return folder


def adc_sweep(folder: Path, bits=(4, 6, 8, 10), with_record: bool = True, finished: int | None = None) -> Path:
    jobs = [{"overrides": [f"quant.adc.bits={b}", "compare_fp=true", f"quant.adc.noise_sigma_lsb={s}"],
             "results": {"metrics": {"fid": 10.0 / b + s}, "baseline_fp": {"fid": 0.5}}}
            for b in bits for s in (0, 2)]
    for job in jobs[finished:] if finished is not None else []:
        job["results"] = None
    record = ["quant.adc.bits=" + ",".join(map(str, bits)), "compare_fp=true",
              "quant.adc.noise_sigma_lsb=0,2"] if with_record else None
    return make_sweep(folder, jobs, record)


@pytest.mark.parametrize("with_record", [True, False])
def test_only_multi_valued_overrides_are_swept(tmp_path, with_record):
    rows, swept = collect_rows(adc_sweep(tmp_path / "sweep", with_record=with_record))
    assert swept == ["quant.adc.bits", "quant.adc.noise_sigma_lsb"]
    assert all("compare_fp" not in row for row in rows)
    assert rows[0]["fp_fid"] == 0.5


def test_sweep_record_names_the_axis_even_when_one_job_finished(tmp_path):
    rows, swept = collect_rows(adc_sweep(tmp_path / "sweep", bits=(4,), finished=1))
    assert swept == ["quant.adc.noise_sigma_lsb"]  # declared 0,2; bits=4 alone is constant
    assert [row["status"] for row in rows] == ["ok", "not finished"]


def test_plot_has_integer_ticks_a_float_baseline_and_no_constant_legend(tmp_path):
    rows, swept = collect_rows(adc_sweep(tmp_path / "sweep"))
    fig, metric = plot_figure(rows, swept)
    ax = fig.axes[0]
    assert metric == "fid"
    assert list(ax.get_xticks()) == [4, 6, 8, 10]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["quant.adc.noise_sigma_lsb=0", "quant.adc.noise_sigma_lsb=2", "float model"]
    baseline = [line for line in ax.get_lines() if line.get_label() == "float model"]
    assert len(baseline) == 1 and list(baseline[0].get_ydata()) == [0.5, 0.5]


def test_cli_builds_the_summary_of_a_stopped_sweep(tmp_path):
    sweep = adc_sweep(tmp_path / "sweep", finished=3)
    proc = subprocess.run([sys.executable, "-m", "jit.sweep", str(sweep)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"sweep summary: 8 jobs -> {sweep / 'summary.md'}" in proc.stdout
    assert "5 of 8 sweep jobs failed or did not finish" in proc.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["not finished"] * 5
    assert "compare_fp" not in rows[0]
    assert (sweep / "summary_fid.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "jit.sweep", str(tmp_path / "nowhere")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: sweep folder not found: {tmp_path / 'nowhere'}"


def test_time_since_programming_is_plotted_on_a_log_axis_per_compensation():
    rows = [{"device.t_inference_s": t, "device.drift_compensation": comp, "fid": f, "status": "ok"}
            for t, f in ((1.0, 5.0), (3600.0, 6.0), (31536000.0, 9.0))
            for comp in ("none", "global")]
    fig, metric = plot_figure(rows, ["device.drift_compensation", "device.t_inference_s"])
    ax = fig.axes[0]
    assert metric == "fid" and ax.get_xscale() == "log"
    assert ax.get_xlabel() == "device.t_inference_s"
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["device.drift_compensation=global", "device.drift_compensation=none"]
