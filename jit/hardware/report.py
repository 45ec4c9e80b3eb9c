"""The sweep summary's cost columns and its FID-vs-energy plot with the Pareto front."""

from __future__ import annotations

import math
from pathlib import Path

from jit.atomic import atomic_path

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


def log_scale_if_wide(ax, values, axis: str = "y") -> bool:
    """A log axis when the positive values span more than 10x: one FID of 300 would squash
    the rest on a linear axis. Returns whether it switched."""
    finite = [v for v in map(_finite, values) if v > 0]
    if len(finite) < 2 or max(finite) <= 10 * min(finite):
        return False
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    return True


# Where a label may sit around its point, nearest first: (offset in points, horizontal
# alignment), right or left of it, above or below, one text line (10 pt) further per ring.
_LABEL_SPOTS = [((4 if align == "left" else -4, dy), align)
                for ring in range(8) for dy in (4 + 10 * ring, -10 - 10 * ring) for align in ("left", "right")]


def label_box(annotation, renderer):
    """The label's own box in pixels, without its leader line (Annotation's box spans both)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: float = 6) -> list:
    """Annotate each point with its label at the nearest spot around it (`_LABEL_SPOTS`)
    where the label overlaps neither the legend nor a label placed before and stays inside
    the axes; a label away from its point gets a thin line to it. The nearest spot if none
    is free. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()  # the transforms and text sizes of the final layout
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)

    def annotate(x, y, label, offset, align):
        leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.4, "color": "gray"}} if abs(offset[1]) > 10 else {}
        return ax.annotate(label, (x, y), xytext=offset, textcoords="offset points", fontsize=fontsize,
                           ha=align, va="bottom", **leader)

    legend = ax.get_legend()
    placed, boxes = [], [legend.get_window_extent(renderer)] if legend is not None else []
    for (x, y), label in sorted(zip(points, labels, strict=True), key=lambda item: (item[0][0], item[0][1])):
        if not label or math.isnan(x) or math.isnan(y):
            continue
        chosen = None
        for offset, align in _LABEL_SPOTS:
            text = annotate(x, y, label, offset, align)
            box = label_box(text, renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in boxes):
                chosen = (text, box)
                break
            text.remove()
        if chosen is None:
            text = annotate(x, y, label, *_LABEL_SPOTS[0])
            chosen = (text, label_box(text, renderer))
        placed.append(chosen[0])
        boxes.append(chosen[1])
    return placed


def fid_vs_energy_figure(rows: list[dict], swept: list[str]):
    """(figure, metric): one marker per design point, labelled with its swept values; the
    front as a line. None without a design point holding both numbers."""
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
    log_scale_if_wide(ax, [row[metric] for row in points])
    ax.set_xlabel("energy per image (uJ, estimate)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    # Label a point by the overrides that tell the design points apart.
    varying = [key for key in swept if len({str(row.get(key)) for row in points}) > 1]
    place_labels(ax, [(_finite(row[ENERGY_KEY]), _finite(row[metric])) for row in points],
                 [", ".join(f"{key.split('.')[-1]}={row[key]}" for key in varying if key in row) for row in points])
    return fig, metric


def plot_fid_vs_energy(rows: list[dict], swept: list[str], out_dir: Path) -> Path | None:
    """`fid_vs_energy_figure` saved as summary_fid_vs_energy.png (also marks rows' `pareto`)."""
    drawn = fid_vs_energy_figure(rows, swept)
    if drawn is None:
        return None
    import matplotlib.pyplot as plt


    path = out_dir / PLOT_NAME
    with atomic_path(path) as tmp:
        drawn[0].savefig(tmp, dpi=120, format="png")
    plt.close(drawn[0])
    return path
