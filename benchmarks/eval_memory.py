"""Peak RSS of FID generation for different numbers of images (constant memory check).

Each size runs in a fresh process so peaks do not carry over:
    .venv/bin/python benchmarks/eval_memory.py --sizes 200 2000
A tiny JiT (JiT-T/4, 32 px, 10 classes, random weights, 2 Euler steps) is enough: the
memory of the evaluation loop does not depend on the model's quality or the step count.
Features go through the shipped digits-cnn extractor against statistics of the digits
reference split, i.e. the built-in default's code path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one_run(num_images: int, batch_size: int, workdir: Path) -> dict:
    import torch

    from jit.callbacks import FIDEvaluation
    from jit.datamodules import DigitsDataModule
    from jit.models import Denoiser, build_jit

    torch.set_num_threads(2)
    torch.manual_seed(0)
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=32, num_classes=10), num_classes=10).eval()
    with torch.no_grad():  # JiT zero-initialises its output layers: all samples would be equal
        for p in denoiser.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    module = type("Module", (), {"denoiser": denoiser,
                                 "generate": lambda self, y, noise=None, **kw: denoiser.generate(y, noise=noise, **kw),
                                 "sampler": {"steps": 2, "method": "euler"}})()
    dm = DigitsDataModule(img_size=32, batch_size=200)
    cfg = {"extractor": "digits-cnn", "num_images": num_images, "batch_size": batch_size, "progress": False,
           "reference": {"split": "reference", "cache_dir": str(workdir / "cache")}}
    evaluation = FIDEvaluation(cfg, run_dir=workdir / f"run_{num_images}")
    results = evaluation.run(None, module, dm)
    return {"num_images": num_images, "batch_size": batch_size, "peak_rss_mb": round(rss_mb("VmHWM"), 1),
            "final_rss_mb": round(rss_mb("VmRSS"), 1), "images_per_s": round(results["images_per_s"], 1),
            "fid_digits": results["metrics"]["fid_digits"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child, args.batch_size, Path(args.workdir))))
        return
    with tempfile.TemporaryDirectory() as workdir:
        # Warm the reference-statistics cache first so every measured run does the same work.
        subprocess.run([sys.executable, __file__, "--child", "20", "--workdir", workdir], check=True,
                       capture_output=True)
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size),
                                  "--workdir", workdir], check=True, capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
