"""Train the digits classifier whose features define the built-in FID ("fid_digits").

    python scripts/train_digits_classifier.py            # writes jit/assets/digits_cnn.pt

Data: the train/val split of `DigitsDataModule(img_size=32, seed=0)` (stratified, 20%
held out), i.e. exactly the images and preprocessing the diffusion model sees. The
held-out accuracy printed at the end is measured on that val split, which training
never touches (no early stopping, no model selection on it).

Reproducible: one seed drives initialisation, shuffling and augmentation, and torch runs
deterministic kernels on a fixed number of CPU threads, so the same command writes the
same weights bit for bit on the same software stack.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from jit.datamodules import DigitsDataModule
from jit.metrics.digits_cnn import DigitsCNN, default_weights_path

SPLIT_SEED = 0  # the DigitsDataModule default, so "val" here is "val" there


def digits_split(name: str, img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB images [N, 3, S, S] and int64 labels of a DigitsDataModule split."""
    datamodule = DigitsDataModule(img_size=img_size, seed=SPLIT_SEED)
    # The whole split as one batch, through the same loader the diffusion model reads.
    size = len(datamodule.split_dataset(name))
    images, labels = next(iter(datamodule.dataloader(name, batch_size=size)))
    return images, labels


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts, zooms and rotations of preprocessed images in [-1, 1].

    Generated digits are rarely centred and sized like the originals; this keeps the
    classifier (and its feature space) from relying on exact placement.
    """
    n = x.shape[0]
    rand = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = rand[:, 0] * math.radians(10)
    scale = 1 + 0.12 * rand[:, 1]
    shift = 0.15 * rand[:, 2:]  # fraction of the half-width: up to ~2.4 px at 32 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sampled around 0 so that pixels pulled in from outside are background (-1).
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def train(
    epochs: int, seed: int, batch_size: int, lr: float, input_size: int, feature_dim: int
) -> tuple[DigitsCNN, dict]:
    train_images, train_labels = digits_split("train")
    val_images, val_labels = digits_split("val")
    # Seeded after loading (iterating a DataLoader draws from the global generator), so
    # the initial weights and the dropout masks depend on `seed` alone.
    torch.manual_seed(seed)
    model = DigitsCNN(input_size=input_size, feature_dim=feature_dim)
    train_x = model.preprocess(train_images)

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # Cosine decay to zero: the last epochs settle the weights without a held-out monitor.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            _, logits = model.embed(augment(train_x[idx], generator))
            loss = F.cross_entropy(logits, train_labels[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}  loss {total / len(order):.4f}", file=sys.stderr)

    meta = {
        **model.config(),
        "heldout_accuracy": accuracy(model, val_images, val_labels),
        "train_accuracy": accuracy(model, train_images, train_labels),
        "seed": seed,
        "epochs": epochs,
        "split": f"DigitsDataModule(img_size=32, seed={SPLIT_SEED}, val_fraction=0.2): "
        f"train {len(train_labels)}, held-out val {len(val_labels)}",
    }
    return model, meta


def save(model: DigitsCNN, meta: dict, path: Path) -> None:
    """Plain tensors and Python scalars only, so `torch.load(weights_only=True)` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated asset behind


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_weights_path())
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads; part of what makes runs bitwise equal"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model, meta = train(
        args.epochs, args.seed, args.batch_size, args.lr, args.input_size, args.feature_dim
    )
    save(model, meta, args.out)
    size_kb = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({size_kb:.0f} KB)")
    print(f"held-out accuracy: {meta['heldout_accuracy']:.4f} ({meta['split']})")


if __name__ == "__main__":
    main()
