"""Reports of an evaluation: per-layer statistics (summary, CSV, wandb table) and the
console summary table."""

from __future__ import annotations

import csv
from pathlib import Path

from jit.atomic import atomic_path


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize_layer_stats(rows: list[dict]) -> dict:
    """Mean of every numeric column over the layers that have it (per-layer hardware mixes
    schemes: a W8A8 layer has no MSB density)."""
    keys = dict.fromkeys(k for row in rows for k, v in row.items() if _number(v))
    means = {}
    for key in keys:
        values = [row[key] for row in rows if _number(row.get(key))]
        means[f"mean_{key}"] = sum(values) / len(values)
    return means


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_layer_stats(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        # Rows may differ in columns (per-layer schemes, layers kept in float): all of them, in order.
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def log_table(trainer, key: str, rows: list[dict]) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_table"):  # wandb
            columns = _columns(rows)
            logger.log_table(key=key, columns=columns, data=[[r.get(c) for c in columns] for r in rows])


def print_summary(results: dict, baseline: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = results["metrics"]
    msb = (results.get("layer_stats_summary") or {}).get("mean_msb_density")
    table = Table(title=f"results ({results.get('num_images')} images)")
    table.add_column("model")
    names = list(metrics)
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("msb_density", justify="right")
    energy = results.get("energy") or {}
    costs = energy_columns(energy)
    for name in costs:
        table.add_column(name, justify="right")
    if baseline:
        digital = [f"{energy['digital_int8_energy_per_image_uJ']:.4g}", "-"] if costs else []
        table.add_row("float", *[f"{baseline.get(n, float('nan')):.4g}" for n in names], "-", *digital)
    scheme = results.get("quant", {}).get("scheme", "fp")
    table.add_row(scheme, *[f"{metrics[n]:.4g}" for n in names], f"{msb:.4f}" if msb is not None else "-",
                  *costs.values())
    Console().print(table)
    if costs and energy.get("hardware_kind") == "digital":  # the baseline itself: no saving to state
        print(f"energy per image on {energy['hardware']}: {costs['uJ/image']} uJ (the digital INT8 "
              "baseline other hardware is compared with)")
    elif costs:
        print(f"energy per image on {energy['hardware']}: {costs['uJ/image']} uJ, "
              f"{costs['vs_int8']} vs the digital INT8 baseline "
              f"({energy['digital_int8_energy_per_image_uJ']:.4g} uJ) of the same model")
    elif energy.get("status"):
        print(f"energy per image: {energy['status']}")


def energy_columns(energy: dict) -> dict[str, str]:
    """The cost columns of the console table: energy per image and the saving vs digital
    INT8 (the float row shows the baseline's energy: a digital accelerator runs it)."""
    if "energy_per_image_uJ" not in energy:
        return {}
    return {"uJ/image": f"{energy['energy_per_image_uJ']:.4g}",
            "vs_int8": energy_change(energy["saving_vs_digital_int8"])}


def energy_change(saving: float) -> str:
    """A saving vs the digital INT8 baseline (0.57) as the change in energy: -57.0%. An
    equal energy reads 0.0%, never -0.0% (a saving of 0 negated, or one below 0.05%)."""
    change = round(-100 * saving, 1)
    return f"{change:+.1f}%" if change != 0 else "0.0%"
