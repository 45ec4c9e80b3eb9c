"""Feature extraction throughput: one extractor pass per image against one per fixed chunk.

    python -m benchmarks.feature_extraction [--images 1000] [--chunk 50] [--threads 2]
    python -m benchmarks.feature_extraction --tiny     # smoke run (figures mean nothing)

Both extractors of the project: the shipped digits classifier (`digits-cnn`, 16 px digits
images) and torch-fidelity's `inception-v3-compat` with random weights made here (the
network, its resize to 299 px and its cost are those of the real one; no weights are
downloaded). Inputs are random uint8 images at each extractor's usual resolution (16 px
for digits, 256 px for Inception, the JiT ImageNet size). "per image" is how features
were extracted before chunking (one pass and one host copy per image); "per chunk" is
`FeatureSpace` as evaluations call it, one pass per chunk of `--chunk` images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from benchmarks.quant_linear import machine
from jit.metrics.features import INCEPTION, create_feature_space


def random_inception_weights(path: Path) -> Path:
    """A randomly initialised inception-v3-compat state dict in torch-fidelity's format."""
    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None
    try:
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(model.state_dict(), path)
    return path


def images_per_s(space, images: torch.Tensor, chunk: int) -> float:
    space(images[:chunk])  # warm-up
    start = time.perf_counter()
    for part in images.split(chunk):
        space(part)
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="8 images, chunks of 4")
    parser.add_argument("--extractors", nargs="+", choices=("digits-cnn", INCEPTION),
                        default=["digits-cnn", INCEPTION], help="which extractors to time")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.chunk = 8, 4
    if args.images < 1 or args.chunk < 1 or args.threads < 1:
        parser.error("--images, --chunk and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.images} images, chunks of {args.chunk}")
    print("| extractor | input | per image (img/s) | per chunk (img/s) | speed-up |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        inception = random_inception_weights(Path(tmp) / "inception.pth") if INCEPTION in args.extractors else None
        for name, weights, size in (("digits-cnn", None, 16), (INCEPTION, inception, 256)):
            if name not in args.extractors:
                continue
            space = create_feature_space(name, weights, probe_size=size)
            gen = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8, generator=gen)
            single = images_per_s(space, images, 1)
            chunked = images_per_s(space, images, args.chunk)
            print(f"| {name} | {size} px | {single:.1f} | {chunked:.1f} | {chunked / single:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
