"""Peak RSS of FID generation for different numbers of images (constant memory check).

Each size runs in a fresh process so peaks do not carry over:
    .venv/bin/python benchmarks/eval_memory.py --sizes 200 2000
A tiny JiT (JiT-T/4, 32 px, 10 classes, random weights, 2 Euler steps) is enough: the
memory of the evaluation loop does not depend on the model's quality or the step count.
Features go through the shipped digits-cnn extractor against statistics of the digits
reference split, i.e. the built-in default's code path.

`--load-variant JiT-B/16` instead measures loading a model for evaluation (builders.load_module)
from an official-format checkpoint with random weights (model, model_ema1, model_ema2).
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

    from jit.datamodules import DigitsDataModule
    from jit.module import JiTModule
    from jit.passes import evaluate_fid

    torch.set_num_threads(2)
    torch.manual_seed(0)
    # One set of weights and no EMA copies, as task=eval loads a checkpoint.
    module = JiTModule(net={"name": "JiT-T/4", "input_size": 32, "num_classes": 10},
                       sampler={"steps": 2, "method": "euler"}, eval_weights="raw", hold_only="raw")
    with torch.no_grad():  # JiT zero-initialises its output layers: all samples would be equal
        for p in module.denoiser.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    dm = DigitsDataModule(img_size=32, batch_size=200)
    cfg = {"extractor": "digits-cnn", "num_images": num_images, "chunk_size": batch_size, "progress": False,
           "reference": {"split": "reference", "cache_dir": str(workdir / "cache")}}
    results = evaluate_fid(None, module, cfg, workdir / f"run_{num_images}", datamodule=dm)
    return {"num_images": num_images, "batch_size": batch_size, "peak_rss_mb": round(rss_mb("VmHWM"), 1),
            "final_rss_mb": round(rss_mb("VmRSS"), 1), "images_per_s": round(results["images_per_s"], 1),
            "fid_digits": results["metrics"]["fid_digits"]}


def load_run(variant: str, checkpoint: Path) -> dict:
    """Peak RSS of loading `checkpoint` for evaluation, as `task=eval` does."""
    from hydra import compose, initialize_config_dir

    from jit.builders import load_module
    from jit.config import register_schemas

    register_schemas()
    model = {"JiT-B/16": "jit_b16", "JiT-B/32": "jit_b32", "JiT-L/16": "jit_l16"}[variant]
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("run", overrides=[f"model={model}", f"ckpt_path={checkpoint}", "paths.output_dir=unused"])
    before = rss_mb("VmRSS")
    module, _ = load_module(cfg)
    params_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    return {"variant": variant, "params_mb": round(params_mb, 1), "rss_before_load_mb": round(before, 1),
            "peak_rss_mb": round(rss_mb("VmHWM"), 1), "final_rss_mb": round(rss_mb("VmRSS"), 1)}


def write_random_checkpoint(variant: str, path: Path) -> None:
    import torch

    from jit.models import Denoiser, build_jit

    denoiser = Denoiser(build_jit(variant), num_classes=1000)
    state = denoiser.state_dict()
    torch.save({"model": state, "model_ema1": state, "model_ema2": state, "epoch": 0}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--load-variant", help="measure loading this variant for evaluation instead")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child is not None:
        print(json.dumps(load_run(args.load_variant, Path(args.load_child))))
        return
    if args.load_variant is not None:
        with tempfile.TemporaryDirectory() as workdir:
            checkpoint = Path(workdir) / "checkpoint-last.pth"
            subprocess.run([sys.executable, "-c", "import sys; from benchmarks.eval_memory import "
                            "write_random_checkpoint as w; w(sys.argv[1], sys.argv[2])", args.load_variant,
                            str(checkpoint)], check=True)
            out = subprocess.run([sys.executable, __file__, "--load-variant", args.load_variant,
                                  "--load-child", str(checkpoint)], check=True, capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
        return
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
