"""The sweep summary on hand-made sweep folders: which overrides count as swept, integer
axes, the float baseline, and `python -m jit.sweep` for a sweep that stopped early."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jit.run_folder import FAILED, LOCK
from jit.sweep import SWEEP_ID_FILE, collect_rows, plot_figure

ROOT = Path(__file__).resolve().parents[1]


def make_sweep(folder: Path, jobs: list[dict], command_line: list[str] | None = None) -> Path:
    """jobs: {"overrides": [...], "results": {...} or None, "started": bool (default: True),
    "failed": the FAILED marker's text, "lock": the lock's owner}; all of one sweep."""
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_ID_FILE).write_text("this")
    if command_line is not None:
        (folder / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": command_line}}}))
    for num, job in enumerate(jobs):
        if not job.get("started", True):
            continue
        job_dir = folder / str(num)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in job["overrides"]))
        (job_dir / SWEEP_ID_FILE).write_text("this")
        if job.get("results") is not None:
            (job_dir / "results.json").write_text(json.dumps(job["results"]))
        if job.get("failed") is not None:
            (job_dir / FAILED).write_text(job["failed"])
        if job.get("lock") is not None:
            (job_dir / LOCK).write_text(json.dumps(job["lock"]))
    return folder


def adc_sweep(folder: Path, bits=(4, 6, 8, 10), with_record: bool = True, finished: int | None = None) -> Path:
    jobs = [{"overrides": [f"quant.adc.bits={b}", "compare_fp=true", f"quant.adc.noise_sigma_lsb={s}"],
             "results": {"metrics": {"fid": 10.0 / b + s}, "baseline_fp": {"fid": 0.5}}}
            for b in bits for s in (0, 2)]
    for job in jobs[finished:] if finished is not None else []:
        job["results"], job["started"] = None, False
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
    assert [row["status"] for row in rows] == ["ok", "not started"]


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
    assert (f"sweep summary: 8 jobs (3 ok, 5 not started) -> {sweep / 'summary.md'}, {sweep / 'summary.csv'}, "
            f"{sweep / 'summary_fid.png'}") in proc.stdout
    assert "5 of 8 sweep jobs did not succeed (3 ok, 5 not started)" in proc.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["not started"] * 5
    assert "compare_fp" not in rows[0]
    assert (sweep / "summary_fid.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "jit.sweep", str(tmp_path / "nowhere")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: sweep folder not found: {tmp_path / 'nowhere'}"


def test_every_job_of_the_sweep_is_listed_with_its_status_and_any_non_ok_fails_the_cli(tmp_path):
    """From the sweep's own job list (multirun.yaml): jobs that never started have no
    folder, and still get a row; a lock whose process is gone means the job was killed."""
    ok = {"metrics": {"fid": 1.0}}
    dead = {"pid": 2 ** 22 + 1, "host": socket.gethostname(), "started": "earlier"}
    sweep = make_sweep(tmp_path / "sweep", [
        {"overrides": ["seed=0"], "results": ok},
        {"overrides": ["seed=1"], "failed": "quant.adc.bits must be an integer in [2, 16], got 40\n"},
        {"overrides": ["seed=2"], "failed": "interrupted by SIGINT (exit code 130)\n"},
        {"overrides": ["seed=3"], "lock": dead},
        {"overrides": ["seed=4"], "started": False},
    ], command_line=["seed=0,1,2,3,4"])
    rows, swept = collect_rows(sweep)
    assert swept == ["seed"]
    assert [(r["seed"], r["status"]) for r in rows] == [
        ("0", "ok"), ("1", "failed: quant.adc.bits must be an integer in [2, 16], got 40"), ("2", "interrupted"),
        ("3", "interrupted"), ("4", "not started")]
    proc = subprocess.run([sys.executable, "-m", "jit.sweep", str(sweep)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "4 of 5 sweep jobs did not succeed (1 ok, 1 failed, 2 interrupted, 1 not started)" in proc.stderr
    # all ok: exit code 0
    for job in ("1", "2", "3"):
        for name in (FAILED, LOCK):
            (sweep / job / name).unlink(missing_ok=True)
        (sweep / job / "results.json").write_text(json.dumps(ok))
    (sweep / "4" / ".hydra").mkdir(parents=True)
    (sweep / "4" / SWEEP_ID_FILE).write_text("this")
    (sweep / "4" / "results.json").write_text(json.dumps(ok))
    proc = subprocess.run([sys.executable, "-m", "jit.sweep", str(sweep)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "5 jobs (5 ok)" in proc.stdout, proc.stderr


def test_markdown_summary_gives_savings_as_percentages_like_the_console(tmp_path):
    from jit.sweep import write_tables

    write_tables([{"job": "0", "status": "ok", "saving_vs_digital_int8": 0.5699}], tmp_path)
    assert "| -57.0% |" in (tmp_path / "summary.md").read_text()
    with open(tmp_path / "summary.csv") as f:
        assert next(csv.DictReader(f))["saving_vs_digital_int8"] == "0.5699"


def test_plots_use_a_log_axis_when_the_metric_spans_more_than_ten_times(tmp_path):
    from jit.hardware.report import fid_vs_energy_figure

    rows, swept = collect_rows(adc_sweep(tmp_path / "narrow"))
    assert plot_figure(rows, swept)[0].axes[0].get_yscale() == "linear"
    jobs = [{"overrides": [f"quant.adc.bits={b}"],
             "results": {"metrics": {"fid": fid}, "energy": {"energy_per_image_uJ": 100.0 + b}}}
            for b, fid in ((4, 300.0), (6, 5.0), (8, 4.0))]
    rows, swept = collect_rows(make_sweep(tmp_path / "wide", jobs, ["quant.adc.bits=4,6,8"]))
    assert plot_figure(rows, swept)[0].axes[0].get_yscale() == "log"
    assert fid_vs_energy_figure(rows, swept)[0].axes[0].get_yscale() == "log"


def test_labels_of_nearby_points_do_not_overlap(tmp_path):
    from jit.hardware.report import fid_vs_energy_figure, label_box

    # eight design points within 1% of the axes of each other, and one far away
    def point(b, s):
        if (b, s) == (10, 2):
            return 40.0, 300.0
        return 5.0 + 0.01 * b + 0.02 * s, 100.0 + 0.1 * b - 0.1 * s

    jobs = [{"overrides": [f"quant.adc.bits={b}", f"quant.adc.noise_sigma_lsb={s}"],
             "results": {"metrics": {"fid": point(b, s)[0]}, "energy": {"energy_per_image_uJ": point(b, s)[1]}}}
            for b in (6, 8, 10) for s in (0, 1, 2)]
    rows, swept = collect_rows(make_sweep(tmp_path / "sweep", jobs,
                                          ["quant.adc.bits=6,8,10", "quant.adc.noise_sigma_lsb=0,1,2"]))
    fig, _ = fid_vs_energy_figure(rows, swept)
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if t.get_text()]
    assert len(labels) == 9
    boxes = [label_box(t, renderer) for t in labels]  # the text, not its leader line
    assert not [(a.get_text(), b.get_text()) for i, (a, ba) in enumerate(zip(labels, boxes))
                for b, bb in zip(labels[i + 1:], boxes[i + 1:]) if ba.overlaps(bb)]


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
