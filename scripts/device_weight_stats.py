"""Weight statistics of the shipped digits model programmed on a device preset, over time:

    python scripts/device_weight_stats.py [--device pcm] [--times 0 1 3600 86400 2592000 31536000]

Quantizes the FFN layers (hybrid W8A11) of the shipped digits model (ema1 weights),
programs them on configs/device/<device>.yaml and prints, per t_inference and drift
compensation, the layer means of weight_snr_db and weight_drift_factor (the layer_stats.csv
columns, jit/quant/stats.py) as a Markdown table. No images are generated.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from jit.builders import SHIPPED_DIGITS_MODEL
from jit.checkpoint import build_denoiser_from_checkpoint
from jit.quant import build_device_config, build_quant_config, quantize_model, quantized_layers
from jit.quant.stats import weight_statistics

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "device"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="pcm", help="a preset of configs/device/")
    parser.add_argument("--times", type=float, nargs="+",
                        default=[0, 1, 3600, 86400, 2592000, 31536000],
                        help="device.t_inference_s values (seconds after programming)")
    args = parser.parse_args()
    preset = CONFIGS / f"{args.device}.yaml"
    if not preset.is_file():
        parser.error(f"--device: no such preset {preset}")
    device = build_device_config(OmegaConf.load(preset))
    net = build_denoiser_from_checkpoint(SHIPPED_DIGITS_MODEL, "model_ema1")[0].net
    quantize_model(net, build_quant_config({"scheme": "hybrid"}, device=device))
    layers = list(quantized_layers(net).values())
    print("| t_inference_s | drift_compensation | weight_snr_db | weight_drift_factor |")
    print("|---:|---|---:|---:|")
    for t in args.times:
        for compensation in ("none", "global"):
            at = dataclasses.replace(device, t_inference_s=t, drift_compensation=compensation)
            for layer in layers:
                layer.cfg = dataclasses.replace(layer.cfg, device=at)
            rows = [weight_statistics(layer) for layer in layers]
            snr = sum(r["weight_snr_db"] for r in rows) / len(rows)
            kept = sum(r["weight_drift_factor"] for r in rows) / len(rows)
            print(f"| {t:g} | {compensation} | {snr:.2f} | {kept:.4f} |", flush=True)


if __name__ == "__main__":
    main()
