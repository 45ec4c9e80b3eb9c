"""Summary of a Hydra multirun: one table (CSV + Markdown) and one plot per sweep.

Runs as a Hydra callback: rewritten after every finished job (`on_job_end`), so a sweep
stopped by Ctrl-C or a killed launcher still leaves the summary of the jobs that finished,
and written once more in the launching process when the sweep ends (`on_multirun_end`),
for the basic launcher and for submitit alike. `python -m jit.sweep <sweep dir>` rebuilds
it from the job folders at any time. Each job directory holds its overrides
(`.hydra/overrides.yaml`) and, when it succeeded, `results.json`; a failed job still gets
a row, with its status, so one failure does not hide the others; a job still running (or
stopped) shows as "not finished".

Swept are the overrides given several values (`quant.adc.bits=4,6,8`, as recorded in the
sweep's `multirun.yaml`, or seen with different values across jobs); an override with one
value for every job (`compare_fp=false`) is the same for all rows and appears neither as a
column nor in the legend. When the jobs evaluated the float model too (`compare_fp=true`),
its score is drawn as a dashed line.

A sweep folder may be reused. The sweep writes a fresh id into `.sweep_id` when it starts;
each job removes the outputs of an earlier sweep from its folder and copies the id into it
(jit.runner.main), and the summary lists only the folders carrying this sweep's id. When any
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

# Preferred plot axes: x = time since programming, else ADC resolution; one line per
# noise level, else per drift compensation.
X_KEYS = ("device.t_inference_s", "quant.adc.bits")
LINE_KEYS = ("quant.adc.noise_sigma_lsb", "device.drift_compensation")
# Swept over decades: a log x axis.
LOG_X_KEYS = ("device.t_inference_s",)
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


def declared_sweep_keys(sweep_dir: Path) -> list[str] | None:
    """Keys given several values on the command line, from the sweep's multirun.yaml."""
    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = ((yaml.safe_load(record.read_text()) or {}).get("hydra", {}).get("overrides", {})
                 .get("task")) or []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # an unreadable record: fall back to the values the jobs saw
        return None
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def collect_rows(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """One row per job of this sweep and the swept keys (constant overrides left out)."""
    rows, overridden = [], []
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
            if key not in overridden:
                overridden.append(key)
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
            row["status"] = "not finished"
        rows.append(row)
    declared = declared_sweep_keys(sweep_dir) or []
    swept = [k for k in overridden if k in declared or len({row.get(k) for row in rows}) > 1]
    constant = set(overridden) - set(swept)
    rows = [{k: v for k, v in row.items() if k not in constant} for row in rows]
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


def _integers(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and v == int(v) for v in values)


def plot_figure(rows: list[dict], swept: list[str]):
    """(figure, metric) of the preferred metric against the swept keys, or None."""
    metric = next((m for m in METRIC_PREFERENCE if any(m in r for r in rows)), None)
    if metric is None or not swept:
        return None
    x_key = next((k for k in X_KEYS if k in swept), swept[0])
    others = [k for k in swept if k != x_key]
    line_key = next((k for k in LINE_KEYS if k in others), others[0] if others else None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if metric in row:
            groups.setdefault(str(row.get(line_key, "")), []).append((_number(row.get(x_key)), row[metric]))
    for label, points in sorted(groups.items(), key=lambda kv: (_number(kv[0]), kv[0])):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{line_key}={label}" if line_key else None)
    baselines = sorted({round(row[f"fp_{metric}"], 6) for row in rows if f"fp_{metric}" in row})
    for i, value in enumerate(baselines):  # one value unless the sweep changes the float model too
        ax.axhline(value, color="black", linestyle="--", linewidth=1,
                   label="float model" if i == 0 else None)
    xs = sorted({x for points in groups.values() for x, _ in points if math.isfinite(x)})
    if x_key in LOG_X_KEYS and xs and xs[0] > 0:
        ax.set_xscale("log")  # seconds to a year after programming
    elif _integers(xs):  # ADC bits 4, 6, 8, 10: no 4.25
        if len(xs) <= 12:
            ax.set_xticks(xs)
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if line_key or baselines:
        ax.legend()
    fig.tight_layout()
    return fig, metric


def plot(rows: list[dict], swept: list[str], out_dir: Path) -> Path | None:
    drawn = plot_figure(rows, swept)
    if drawn is None:
        return None
    import matplotlib.pyplot as plt

    fig, metric = drawn
    path = out_dir / f"summary_{metric}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
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


def report(sweep_dir: Path) -> int:
    """Write the summary, say where it is; the exit code: 1 when any job did not succeed."""
    info = summarize(sweep_dir)
    if not info["rows"]:
        print(f"no sweep jobs found in {sweep_dir}", file=sys.stderr)
        return 1
    print(f"sweep summary: {info['rows']} jobs -> {sweep_dir / 'summary.md'}"
          + (f", plot {info['plot']}" if info.get("plot") else ""))
    failed = info["rows"] - info["ok"]
    if failed:
        print(f"{failed} of {info['rows']} sweep jobs failed or did not finish; see {sweep_dir / 'summary.md'}",
              file=sys.stderr)
        return 1
    return 0


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        atomic_write_text(Path(config.hydra.sweep.dir) / SWEEP_ID_FILE, uuid.uuid4().hex)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        # The summary so far: if the sweep is stopped, the finished jobs are summarised.
        if config.hydra.mode is not None and str(config.hydra.mode).endswith("MULTIRUN"):
            try:
                summarize(Path(config.hydra.sweep.dir))
            except Exception as err:  # the final summary still comes at the end of the sweep
                print(f"could not update the sweep summary: {err}", file=sys.stderr)

    def on_multirun_end(self, config, **kwargs) -> None:
        if report(Path(config.hydra.sweep.dir)):
            raise SystemExit(1)  # Hydra turns callback exceptions into warnings, not an exit code


def main(argv: list[str] | None = None) -> int:
    """`python -m jit.sweep <sweep dir>`: (re)build the summary of a sweep, e.g. one stopped early."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jit.sweep", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. multirun/2026-01-01_12-00-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep folder not found: {args.sweep_dir}", file=sys.stderr)
        return 2
    return report(args.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
