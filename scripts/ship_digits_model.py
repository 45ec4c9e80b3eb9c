"""Turn a digits training run into the shipped model `jit/assets/digits_jit.pth`.

    python run.py experiment=digits_train hydra.run.dir=outputs/digits_train
    python scripts/ship_digits_model.py outputs/digits_train/checkpoint-last.pth

The asset keeps the official layout but holds one set of weights, the ema1 weights the
evaluation uses, under all three keys (one shared storage), to stay well under 10 MB.
"""

import argparse
from pathlib import Path

from jit.checkpoint import load_jit_checkpoint, save_official_checkpoint

ASSET = Path(__file__).resolve().parents[1] / "jit" / "assets" / "digits_jit.pth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint-last.pth written by task=train")
    parser.add_argument("--out", default=str(ASSET))
    args = parser.parse_args()
    state, meta = load_jit_checkpoint(args.checkpoint, "model_ema1")
    shipped_args = {**meta["args"], "shipped_weights": "model_ema1 of " + Path(args.checkpoint).name}
    # The same tensors under three keys: torch.save stores shared storages once.
    save_official_checkpoint(args.out, state, state, state, args=shipped_args, epoch=meta["epoch"] or 0)
    size_mb = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out} ({size_mb:.1f} MiB) from {args.checkpoint}")


if __name__ == "__main__":
    main()
