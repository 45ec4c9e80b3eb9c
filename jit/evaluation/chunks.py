"""Finished chunks of an FID pass, kept in the run folder so an interrupted evaluation
continues where it stopped.

Every chunk of the global image index a rank scores is written, as it completes, to
`<run dir>/.fid_chunks/<digest>/chunk_<k>.pt`: the chunk's global indices, features,
logits, sample-grid tiles, the per-layer statistics counters of its forwards where the
pass observes them and, where the pass exports them, its images. The digest covers
everything the features depend on (the FID settings that shape the images and their
score, the sampler, the weights' choice, the quantization and device configs, and every
parameter and buffer of the model being scored, calibrated thresholds included) and which
images the statistics observe, so a chunk is reused only by the very evaluation that
wrote it. A rerun of the same command in
the same folder loads the stored chunks in place of generating them; the statistics are
keyed by index (jit/metrics/fid.py), so the score is bitwise the uninterrupted run's,
whatever the process count of either run. The store goes once the run has succeeded.

Files are written atomically and read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jit.atomic import atomic_path
from jit.metrics.features import weights_digest

STORE_DIR = ".fid_chunks"


@dataclass
class ChunkRecord:
    """What one scored chunk leaves behind."""

    index: torch.Tensor  # global image indices
    features: torch.Tensor
    logits: torch.Tensor | None
    tiles: list[tuple[int, int, int, np.ndarray]]  # (index, grid row, grid column, HWC uint8)
    images: np.ndarray | None  # NHWC uint8, kept only where the pass exports images
    # Per-layer statistics counters of the chunk's forwards (jit.quant.snapshot_stats),
    # where the pass observes them: plain numbers, strings and dicts.
    layer_stats: dict | None = None

    def to_dict(self) -> dict:
        tiles = [(i, r, c) for i, r, c, _ in self.tiles]
        return {"index": self.index, "features": self.features, "logits": self.logits,
                "tile_slots": torch.tensor(tiles, dtype=torch.long).reshape(-1, 3),
                "tile_images": torch.from_numpy(np.stack([t[3] for t in self.tiles])) if self.tiles else None,
                "images": torch.from_numpy(self.images) if self.images is not None else None,
                "layer_stats": self.layer_stats}

    @classmethod
    def from_dict(cls, data: dict) -> ChunkRecord:
        slots, tile_images = data["tile_slots"].tolist(), data["tile_images"]
        tiles = [(i, r, c, tile_images[k].numpy()) for k, (i, r, c) in enumerate(slots)]
        images = data["images"].numpy() if data["images"] is not None else None
        return cls(data["index"], data["features"], data["logits"], tiles, images, data.get("layer_stats"))


def model_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (jit.metrics.features.weights_digest) and every
    quantized layer's config and static thresholds (plain attributes, not buffers)."""
    digest = hashlib.sha256(weights_digest(module).encode())
    for name, layer in module.named_modules():
        if hasattr(layer, "static") and hasattr(layer, "cfg"):
            static = layer.static
            digest.update(f"{name}|{layer.cfg!r}|".encode())
            if static is not None:
                digest.update(f"{static.act_clip!r}|{static.act_bits}|{sorted(static.adc_clips.items())!r}|"
                              f"{static.adc_bits}|".encode())
                for part in (static.weight_int, static.weight_scale):
                    if part is not None:
                        digest.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_digest(settings: dict, model: str) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(f"{text}|{model}".encode()).hexdigest()


class ChunkStore:
    """The stored chunks of one evaluation (`digest`) in `run_dir`."""

    def __init__(self, run_dir: Path, digest: str):
        self.root = Path(run_dir) / STORE_DIR
        self.folder = self.root / digest[:16]

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk_{chunk:07d}.pt"

    def done(self) -> set[int]:
        """The chunks stored by an earlier run of this evaluation (any rank, any layout)."""
        if not self.folder.is_dir():
            return set()
        return {int(p.stem.removeprefix("chunk_")) for p in self.folder.glob("chunk_*.pt")}

    def save(self, chunk: int, record: ChunkRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(chunk)) as tmp:
            torch.save(record.to_dict(), tmp)

    def load(self, chunk: int) -> ChunkRecord:
        return ChunkRecord.from_dict(torch.load(self.path(chunk), map_location="cpu", weights_only=True))

    def remove(self) -> None:
        """All stored chunks of every evaluation in the folder (the run succeeded)."""
        shutil.rmtree(self.root, ignore_errors=True)
