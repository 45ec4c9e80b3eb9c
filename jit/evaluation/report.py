"""Reports of an evaluation: results.json, the sample grid, the npz of the generated
images, per-layer statistics (summary, CSV, wandb table) and the console summary table."""

from __future__ import annotations

import contextlib
import csv
import math
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from jit.atomic import atomic_path, atomic_write_json
from jit.evaluation.plan import barrier


def write_json_atomic(obj, path) -> None:
    """JSON written atomically: an interrupted write leaves the previous file (or none)."""
    atomic_write_json(path, obj, indent=2, sort_keys=True, default=str)


def flatten(d, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; dataclasses are turned into dicts first."""
    if is_dataclass(d) and not isinstance(d, type):
        d = asdict(d)
    out = {}
    for key, value in dict(d).items():
        name = f"{prefix}{key}"
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class NpzExport:
    """ADM-style sample export (`arr_0`, NHWC uint8) at constant memory.

    Each rank appends its chunks of images to a raw shard file in the run dir; rank 0 then
    streams the chunks, back in global index order (chunk k is the k // W-th chunk of rank
    k % W), into one zip entry of a temporary npz and renames it into place. Needs a file
    system all ranks share.
    """

    def __init__(self, run_dir: Path, num_images: int, image_shape_hwc, rank: int, world: int,
                 chunk_size: int):
        self.run_dir, self.num_images, self.shape = run_dir, num_images, tuple(image_shape_hwc)
        self.rank, self.world, self.chunk_size = rank, world, chunk_size
        self.item_bytes = int(np.prod(self.shape))
        # Open for the whole generation loop; closed by finish() or abort().
        self.file = open(self._shard(rank), "wb")  # noqa: SIM115

    def _shard(self, rank: int) -> Path:
        return self.run_dir / f".samples.rank{rank}.u8"

    def add(self, images_nhwc: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(images_nhwc, dtype=np.uint8).tobytes())

    def finish(self, path: Path) -> None:
        self.file.close()
        barrier()
        if self.rank == 0:
            n, w, c = self.num_images, self.world, self.chunk_size
            with contextlib.ExitStack() as stack:
                shards = [stack.enter_context(open(self._shard(r), "rb")) for r in range(w)]
                with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                        zf.open("arr_0.npy", "w", force_zip64=True) as out:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                              "fortran_order": False, "shape": (n, *self.shape)}
                    np.lib.format.write_array_header_1_0(out, header)
                    for k in range(math.ceil(n / c)):
                        count = min(c, n - k * c)
                        shard = shards[k % w]  # its chunks are read in order: no seek needed
                        out.write(shard.read(count * self.item_bytes))
        barrier()
        self._shard(self.rank).unlink(missing_ok=True)

    def abort(self) -> None:
        """Interrupted: drop this rank's partial shard."""
        self.file.close()
        self._shard(self.rank).unlink(missing_ok=True)


def sample_grid_slots(labels: torch.Tensor, num_classes: int, samples_per_class: int,
                      max_classes: int) -> dict[int, tuple[int, int]]:
    """Global index -> (row, column) of the sample grid: rows are classes, in class order."""
    if samples_per_class == 0:
        return {}
    classes = np.unique(np.linspace(0, num_classes - 1, min(num_classes, max_classes)).round().astype(int))
    slots = {}
    for row, c in enumerate(classes):
        for col, index in enumerate(torch.nonzero(labels == int(c)).flatten()[:samples_per_class].tolist()):
            slots[index] = (row, col)
    return slots


def sample_grid(tiles, hw, pad: int = 2) -> np.ndarray:
    """HWC uint8 grid of (index, row, column, image) tiles: one row per grid class,
    samples_per_class columns, black padding."""
    rows = 1 + max(t[1] for t in tiles)
    cols = 1 + max(t[2] for t in tiles)  # fewer than samples_per_class when num_images is small
    h, w = hw
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for _, row, col, image in tiles:
        y, x = pad + row * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


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
