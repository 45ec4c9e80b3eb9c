"""Summary of a Hydra multirun: one table (CSV + Markdown) and one plot per sweep.

Runs as a Hydra callback (`on_multirun_end`) in the launching process, after every job
finished, for the basic launcher and for submitit alike. Each job directory holds its
overrides (`.hydra/overrides.yaml`) and, when it succeeded, `results.json`; a failed job
still gets a row, with its status, so one failure does not hide the others.

A sweep folder may be reused. The sweep writes a fresh id into `.sweep_id` when it starts;
each job removes the outputs of an earlier sweep from its folder and copies the id into it
(jit.tasks.main), and the summary lists only the folders carrying this sweep's id. When any
job failed, the multirun exits with code 1 once the summary is written.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import uuid
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from jit.atomic import atomic_path, atomic_write_text
from jit.hardware.report import plot_fid_vs_energy, sweep_columns

# Preferred plot axes: x = ADC resolution, one line per noise level.
X_KEY = "quant.adc.bits"
LINE_KEY = "quant.adc.noise_sigma_lsb"
METRIC_PREFERENCE = ("fid", "fid_digits", "cond_accuracy", "inception_score")
SWEEP_ID_FILE = ".sweep_id"


def _sweep_id(folder: Path) -> str | None:
    marker = folder / SWEEP_ID_FILE
    return marker.read_text().strip() if marker.is_file() else None


def mark_sweep_job(job_dir: str | Path) -> None:
    """Copy the running sweep's id into the job folder: its outputs belong to this sweep."""
    from hydra.core.hydra_config import HydraConfig

    sweep_id = _sweep_id(Path(HydraConfig.get().sweep.dir))
    if sweep_id is not None:
        atomic_write_text(Path(job_dir) / SWEEP_ID_FILE, sweep_id)


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def collect_rows(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    rows, swept = [], []
    sweep_id = _sweep_id(sweep_dir)
    job_dirs = sorted((p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")
                       if sweep_id is None or _sweep_id(p.parent.parent) == sweep_id),
                      key=lambda p: (len(p.name), p.name))
    for job in job_dirs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row = {"job": job.name}
        for item in overrides:
            key, value = _parse_override(item)
            row[key] = value
            if key not in swept:
                swept.append(key)
        results, failure = job / "results.json", job / "failed.json"
        if failure.exists():  # also when the job failed after writing its results
            row["status"] = "failed: " + json.loads(failure.read_text()).get("error", "")[:120]
        elif results.exists():
            data = json.loads(results.read_text())
            row["status"] = data.get("status", "ok")
            for name, value in (data.get("metrics") or {}).items():
                if isinstance(value, (int, float)):
                    row[name] = value
            for name, value in (data.get("baseline_fp") or {}).items():
                if isinstance(value, (int, float)):
                    row[f"fp_{name}"] = value
            row.update(sweep_columns(data))  # energy, latency, area estimates
        else:
            row["status"] = "no results"
        rows.append(row)
    return rows, swept


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_tables(rows: list[dict], out_dir: Path) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(out_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    return columns


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot(rows: list[dict], swept: list[str], out_dir: Path) -> Path | None:
    metric = next((m for m in METRIC_PREFERENCE if any(m in r for r in rows)), None)
    if metric is None or not swept:
        return None
    x_key = X_KEY if X_KEY in swept else swept[0]
    others = [k for k in swept if k != x_key]
    line_key = LINE_KEY if LINE_KEY in others else (others[0] if others else None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if metric in row:
            groups.setdefault(str(row.get(line_key, "")), []).append((_number(row.get(x_key)), row[metric]))
    for label, points in sorted(groups.items(), key=lambda kv: _number(kv[0])):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{line_key}={label}" if line_key else None)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if line_key:
        ax.legend()
    fig.tight_layout()
    path = out_dir / f"summary_{metric}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(sweep_dir: str | Path) -> dict:
    sweep_dir = Path(sweep_dir)
    rows, swept = collect_rows(sweep_dir)
    if not rows:
        return {"rows": 0}
    pareto = plot_fid_vs_energy(rows, swept, sweep_dir)  # also marks rows["pareto"]
    write_tables(rows, sweep_dir)
    figure = plot(rows, swept, sweep_dir)
    return {"rows": len(rows), "ok": sum(row["status"] == "ok" for row in rows), "swept": swept,
            "plot": str(figure) if figure else None, "pareto_plot": str(pareto) if pareto else None}


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        atomic_write_text(Path(config.hydra.sweep.dir) / SWEEP_ID_FILE, uuid.uuid4().hex)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        info = summarize(sweep_dir)
        if not info["rows"]:
            return
        print(f"sweep summary: {info['rows']} jobs -> {sweep_dir / 'summary.md'}"
              + (f", plot {info['plot']}" if info.get("plot") else ""))
        failed = info["rows"] - info["ok"]
        if failed:
            print(f"{failed} of {info['rows']} sweep jobs failed; see {sweep_dir / 'summary.md'}", file=sys.stderr)
            raise SystemExit(1)  # Hydra turns callback exceptions into warnings, not an exit code
