"""The sweep summary's cost columns and its FID-vs-energy plot with the Pareto front."""

from __future__ import annotations

import math
from pathlib import Path

# results.json `energy` numbers that become sweep summary columns, in this order.
SWEEP_COLUMNS = ("energy_per_image_uJ", "energy_adc_uJ", "energy_analog_array_uJ", "energy_dac_uJ",
                 "energy_digital_msb_uJ", "energy_digital_rest_uJ", "saving_vs_digital_int8",
                 "latency_per_image_ms", "analog_area_mm2")
ENERGY_KEY = "energy_per_image_uJ"
PLOT_NAME = "summary_fid_vs_energy.png"


def sweep_columns(results: dict) -> dict:
    """The cost columns of one job's summary row (none when it was not estimated)."""
    energy = results.get("energy") or {}
    return {key: energy[key] for key in SWEEP_COLUMNS if isinstance(energy.get(key), (int, float))}


def _finite(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both minimized),
    ordered by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def mark_pareto(rows: list[dict], metric: str | None) -> list[int]:
    """Add `pareto` (True on the FID-vs-energy front) to every row holding both numbers."""
    usable = [i for i, row in enumerate(rows) if metric and not math.isnan(_finite(row.get(metric)))
              and not math.isnan(_finite(row.get(ENERGY_KEY)))]
    front = {usable[k] for k in pareto_front([(_finite(rows[i][ENERGY_KEY]), _finite(rows[i][metric]))
                                               for i in usable])}
    for i in usable:
        rows[i]["pareto"] = i in front
    return sorted(front, key=lambda i: _finite(rows[i][ENERGY_KEY]))


def fid_metric(rows: list[dict]) -> str | None:
    """The FID column of a summary (lower is better: the front minimizes it)."""
    names = [key for row in rows for key in row if key == "fid" or key.startswith("fid_")]
    return "fid" if "fid" in names else (names[0] if names else None)


def plot_fid_vs_energy(rows: list[dict], swept: list[str], out_dir: Path) -> Path | None:
    """One marker per design point, labelled with its swept values; the front as a line."""
    metric = fid_metric(rows)
    front = mark_pareto(rows, metric)
    points = [row for row in rows if "pareto" in row]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    others = [row for row in points if not row["pareto"]]
    ax.scatter([_finite(r[ENERGY_KEY]) for r in others], [_finite(r[metric]) for r in others],
               color="tab:gray", label="design point")
    ax.plot([_finite(rows[i][ENERGY_KEY]) for i in front], [_finite(rows[i][metric]) for i in front],
            color="tab:red", marker="o", label="Pareto front")
    # Label a point by the overrides that tell the design points apart.
    varying = [key for key in swept if len({str(row.get(key)) for row in points}) > 1]
    for row in points:
        label = ", ".join(f"{key.split('.')[-1]}={row[key]}" for key in varying if key in row)
        ax.annotate(label, (_finite(row[ENERGY_KEY]), _finite(row[metric])), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("energy per image (uJ, estimate)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / PLOT_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
