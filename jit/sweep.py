"""Summary of a Hydra multirun: one table (CSV + Markdown) and plots per sweep.

Runs as a Hydra callback: rewritten after every finished job (`on_job_end`), and once more
in the launching process when the sweep ends (`on_multirun_end`), or when it is stopped
(Ctrl-C, SIGTERM, an error: at exit), for the basic launcher and for submitit alike.
`python -m jit.sweep <sweep dir>` rebuilds it at any time.

The rows are every job of the sweep's own job list (its `multirun.yaml`, expanded as
Hydra's basic sweeper does; job i runs in `<sweep>/<i>`), each with its status
(`job_status`): ok, failed (with the error of the job's FAILED marker), interrupted,
running, or not started. Any status but ok makes the exit code 1, for the multirun and
for `python -m jit.sweep` alike.

Swept are the overrides given several values (`quant.adc.bits=4,6,8`, as recorded in the
sweep's `multirun.yaml`, or seen with different values across jobs); an override with one
value for every job (`compare_fp=false`) is the same for all rows and appears neither as a
column nor in the legend. When the jobs evaluated the float model too (`compare_fp=true`),
its score is drawn as a dashed line.

A sweep folder holding an earlier sweep is refused unless overwrite=true, which moves it
to `previous/<timestamp>/` (jit/run_folder.py). The sweep also writes a fresh id into
`.sweep_id` and each job copies it into its folder (jit.runner.main): a job folder with
another id is not this sweep's.
"""

from __future__ import annotations

import atexit
import csv
import json
import math
import sys
import uuid
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from jit.atomic import OutputWriteError, atomic_path, atomic_write_text, write_error
from jit.evaluation.report import energy_change
from jit.hardware.report import log_scale_if_wide, plot_fid_vs_energy, sweep_columns
from jit.run_folder import FAILED, LOCK, _alive, _read_owner

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


def _record(sweep_dir: Path) -> dict | None:
    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return None
    try:
        return yaml.safe_load(record.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None


def _parsed_sweep(sweep_dir: Path):
    """The sweep's overrides as Hydra's basic sweeper parses them: its `hydra.sweeper.params`
    and the command line, from multirun.yaml; None without a readable record."""
    record = _record(sweep_dir)
    if record is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_node = record.get("hydra") or {}
    params = [f"{k}={v}" for k, v in ((hydra_node.get("sweeper") or {}).get("params") or {}).items()]
    try:
        return OverridesParser.create().parse_overrides(params + list((hydra_node.get("overrides") or {})
                                                                       .get("task") or []))
    except Exception:  # noqa: BLE001 - an unreadable record: fall back to the job folders
        return None


def declared_sweep_keys(sweep_dir: Path) -> list[str] | None:
    """Keys given several values on the command line, from the sweep's multirun.yaml."""
    parsed = _parsed_sweep(sweep_dir)
    return None if parsed is None else [o.key_or_group for o in parsed if o.is_sweep_override()]


def sweep_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job of the sweep, in job-number order, as its list of overrides: the sweep's
    own job list (Hydra's basic sweeper expands multirun.yaml the same way), whether or
    not the job ever started. None without a readable multirun.yaml."""
    parsed = _parsed_sweep(sweep_dir)
    if parsed is None:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_status(job: Path, sweep_id: str | None) -> str:
    """ok, failed: <error>, interrupted, running or not started: from the job folder's
    results, its FAILED marker and its lock (jit/run_folder.py)."""
    if not (job / ".hydra").is_dir() or (sweep_id is not None and _sweep_id(job) != sweep_id):
        return "not started"
    if (job / FAILED).is_file():
        first = ((job / FAILED).read_text(errors="replace").splitlines() or [""])[0]
        return "interrupted" if first.startswith("interrupted") else "failed: " + first[:120]
    if (job / LOCK).is_file():
        owner = _read_owner(job / LOCK)
        return "running" if owner is not None and _alive(owner) else "interrupted"
    if (job / "results.json").is_file():
        return "ok"
    try:
        task = (yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}).get("task")
    except (OSError, yaml.YAMLError):
        task = None
    return "interrupted" if task in (None, "eval") else "ok"  # train, calibrate: no results.json


def collect_rows(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """One row per job of this sweep, every job of its job list, and the swept keys
    (constant overrides left out)."""
    rows, overridden = [], []
    sweep_id = _sweep_id(sweep_dir)
    listed = sweep_jobs(sweep_dir)
    if listed is not None:  # job i runs in <sweep>/<i> (hydra.sweep.subdir)
        jobs = [(sweep_dir / str(num), overrides) for num, overrides in enumerate(listed)]
    else:  # no record: the job folders there are
        folders = sorted((p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")
                          if sweep_id is None or _sweep_id(p.parent.parent) == sweep_id),
                         key=lambda p: (len(p.name), p.name))
        jobs = [(job, yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []) for job in folders]
    for job, overrides in jobs:
        row = {"job": job.name}
        for item in overrides:
            key, value = _parse_override(item)
            row[key] = value
            if key not in overridden:
                overridden.append(key)
        row["status"] = job_status(job, sweep_id)
        if row["status"] == "ok" and (job / "results.json").is_file():
            data = json.loads((job / "results.json").read_text())
            for name, value in (data.get("metrics") or {}).items():
                if isinstance(value, (int, float)):
                    row[name] = value
            for name, value in (data.get("baseline_fp") or {}).items():
                if isinstance(value, (int, float)):
                    row[f"fp_{name}"] = value
            row.update(sweep_columns(data))  # energy, latency, area estimates
        rows.append(row)
    declared = declared_sweep_keys(sweep_dir) or []
    swept = [k for k in overridden if k in declared or len({row.get(k) for row in rows}) > 1]
    constant = set(overridden) - set(swept)
    rows = [{k: v for k, v in row.items() if k not in constant} for row in rows]
    return rows, swept


def _fmt(value, column: str = "") -> str:
    if column == "saving_vs_digital_int8" and isinstance(value, (int, float)):
        return energy_change(value)  # as the console gives it: -57.0%
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
    lines += ["| " + " | ".join(_fmt(row.get(c, ""), c) for c in columns) + " |" for row in rows]
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
    log_scale_if_wide(ax, [value for points in groups.values() for _, value in points] + baselines)
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


STATUSES = ("ok", "failed", "interrupted", "running", "not started")


def summarize(sweep_dir: str | Path) -> dict:
    sweep_dir = Path(sweep_dir)
    rows, swept = collect_rows(sweep_dir)
    if not rows:
        return {"rows": 0}
    pareto = plot_fid_vs_energy(rows, swept, sweep_dir)  # also marks rows["pareto"]
    write_tables(rows, sweep_dir)
    figure = plot(rows, swept, sweep_dir)
    counts = {status: sum(row["status"].split(":")[0] == status for row in rows) for status in STATUSES}
    return {"rows": len(rows), "ok": counts["ok"], "counts": counts, "swept": swept,
            "files": [str(sweep_dir / name) for name in ("summary.md", "summary.csv")]
            + [str(p) for p in (figure, pareto) if p]}


def report(sweep_dir: Path) -> int:
    """Write the summary, say where it is; the exit code: 1 when any job did not succeed."""
    info = summarize(sweep_dir)
    if not info["rows"]:
        print(f"no sweep jobs found in {sweep_dir}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{n} {status}" for status, n in info["counts"].items() if n)
    print(f"sweep summary: {info['rows']} jobs ({counts}) -> {', '.join(info['files'])}")
    failed = info["rows"] - info["ok"]
    if failed:
        print(f"{failed} of {info['rows']} sweep jobs did not succeed ({counts}); see {sweep_dir / 'summary.md'}",
              file=sys.stderr)
        return 1
    return 0


class SweepSummary(Callback):
    """Rewrites the summary after every job and when the sweep ends, however it ends."""

    def __init__(self):
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        self._sweep_dir = Path(config.hydra.sweep.dir)
        atomic_write_text(self._sweep_dir / SWEEP_ID_FILE, uuid.uuid4().hex)
        atexit.register(self._at_exit)  # a sweep stopped by a signal or an error ends here too

    def on_job_end(self, config, job_return, **kwargs) -> None:
        # The summary so far: if the sweep is stopped, the finished jobs are summarised.
        if config.hydra.mode is None or not str(config.hydra.mode).endswith("MULTIRUN"):
            return
        try:
            summarize(Path(config.hydra.sweep.dir))
        except OSError as err:

            mapped = write_error(err, err.filename or config.hydra.sweep.dir)
            if not isinstance(mapped, OutputWriteError):
                print(f"could not update the sweep summary: {_one_line(err)}", file=sys.stderr)
                return
            # A full disk or an unwritable sweep folder: the next jobs could not write
            # either (nor could Hydra, which would end the sweep with a traceback).
            atexit.unregister(self._at_exit)
            print(f"error: {mapped}; the sweep stops here (`python -m jit.sweep {config.hydra.sweep.dir}` "
                  "summarizes it once there is space)", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as err:  # noqa: BLE001 - the final summary still comes at the end of the sweep
            print(f"could not update the sweep summary: {_one_line(err)}", file=sys.stderr)

    def on_multirun_end(self, config, **kwargs) -> None:
        atexit.unregister(self._at_exit)
        self._sweep_dir = None
        if _report_safely(Path(config.hydra.sweep.dir)):
            raise SystemExit(1)  # Hydra turns callback exceptions into warnings, not an exit code

    def _at_exit(self) -> None:
        if self._sweep_dir is not None:
            _report_safely(self._sweep_dir)


def _one_line(err: BaseException) -> str:

    if isinstance(err, OSError):
        err = write_error(err, err.filename or "the sweep folder")
    return " ".join(str(err).split())


def _report_safely(sweep_dir: Path) -> int:
    """`report`, with a failure to write the summary (a full disk) as one line: exit code 1."""
    try:
        return report(sweep_dir)
    except OSError as err:
        print(f"error: could not write the sweep summary: {_one_line(err)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m jit.sweep <sweep dir>`: (re)build the summary of a sweep, e.g. one stopped early."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jit.sweep", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. multirun/2026-01-01_12-00-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep folder not found: {args.sweep_dir}", file=sys.stderr)
        return 2
    return _report_safely(args.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
