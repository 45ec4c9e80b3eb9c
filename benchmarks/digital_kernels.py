"""Kernels for the hybrid layer's digital MSB product on this CPU: is there anything
faster than the dense float32 matmul?

    python -m benchmarks.digital_kernels [--runs 9] [--threads 2] [--tiny]

The MSB codes of INT11 Student-t(3) activations clipped at their 99.8th percentile (the
center-out split, values in {-3..3}, ~8% non-zero, as in benchmarks.quant_linear) times
INT8 weight codes, at the JiT-B/16 FFN shapes. Candidates: the dense float32 matmul the
layer uses; a CSR sparse matmul (conversion timed separately, since the layer would pay
it per call); torch._int_mm (INT8 x INT8 -> INT32); oneDNN's INT8 linear as the layers
call it (jit/quant/intmm.py: packed weights, float32 output; "-" where the kernel is
missing or not exact; jit.quant.plan.use_int8 takes it by default on AMX CPUs only).
Each result is checked to equal the float32 product. Times are medians of `runs` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import warnings
from functools import partial

import torch

from benchmarks.quant_linear import machine, median_ms
from jit.quant import intmm, plan
from jit.quant.quantizers import center_out_split_, percentile_abs, quantize_symmetric

SHAPES = [(768, 4096, 576), (768, 4096, 2304), (2048, 768, 576), (2048, 768, 2304)]
TINY_SHAPES = [(64, 96, 40)]


def msb_codes(tokens: int, in_features: int) -> torch.Tensor:
    x = torch.distributions.StudentT(3.0).sample((tokens, in_features))
    codes, _ = quantize_symmetric(x, percentile_abs(x, 99.8), 11)
    return center_out_split_(codes, 9, 256)


def int8_kernel_ms(backend: str, msb: torch.Tensor, weight_t: torch.Tensor,
                   dense: torch.Tensor, runs: int) -> str:
    """The INT8 kernel as the layers call it, or "-" where it is missing or not exact."""
    if not intmm.kernel_is_exact(backend):
        return "-"
    packed, out = intmm.Int8Weights(weight_t, backend), torch.empty_like(dense)
    call = partial(intmm.int8_linear, [msb.to(torch.int8)], packed, slice(None), out)
    call()
    assert torch.equal(out, dense), f"{backend} differs from the float32 product"
    return f"{median_ms(call, runs):.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="one small shape, one run")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1")
    if args.tiny:
        args.runs = 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.manual_seed(0)
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.runs}")
    print("| in->out | tokens | MSB density | dense f32 ms | to CSR ms | CSR matmul ms "
          "| _int_mm ms | oneDNN INT8 ms | plan's kernel |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for in_features, out_features, tokens in TINY_SHAPES if args.tiny else SHAPES:
        msb = msb_codes(tokens, in_features)
        weight_t = torch.randint(-127, 128, (in_features, out_features)).float()
        dense = msb @ weight_t
        csr = msb.to_sparse_csr()
        assert torch.equal(csr @ weight_t, dense)
        density = float(msb.ne(0).float().mean())
        times = [median_ms(partial(torch.matmul, msb, weight_t), args.runs),
                 median_ms(msb.to_sparse_csr, args.runs),
                 median_ms(partial(torch.matmul, csr, weight_t), args.runs)]
        cells = [f"{t:.1f}" for t in times]
        cells += [int8_kernel_ms(backend, msb, weight_t, dense, max(1, args.runs // 3))
                  for backend in intmm.BACKENDS]
        cells.append(plan.int8_backend() or "float32")
        print(f"| {in_features}->{out_features} | {tokens} | {density:.3f} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
