"""Pairs per second and model FLOP utilisation (MFU) of the FLYP training step.

The step is forward of both towers, the FLYP loss, backward and the AdamW step, on a random
batch (random weights: speed does not depend on them). FLOPs come from the model itself through
``torch.utils.flop_counter.FlopCounterMode``; MFU is achieved FLOP/s over ``--peak-tflops``.

    python bench/step_throughput.py --arch flyp-tiny-vit --precision fp32 --batch 64
    python bench/step_throughput.py --arch bench-vit-s --precision bf16 --batch 16
    python bench/step_throughput.py --arch ViT-B-16 --precision bf16 --batch 256 \
        --device cuda --peak-tflops 989     # the H200 target: >= 50% MFU, ~3,200 pairs/s

Default peaks: on CUDA, an H200's dense bf16 (989 TFLOP/s) or its fp32 without TF32
(67 TFLOP/s). On CPU an estimate: cores x 3.0 GHz x 32 fp32 FLOP/cycle (two 256-bit FMA pipes,
AMD Zen 4/AVX-512 double-pumped), twice that for bf16 (AVX512_BF16 dot products). The script
also measures a large matmul, the ceiling this machine really reaches, and prints MFU against it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import build_step, machine, median, spread, step_flops, time_steps  # noqa: E402

from flyp_ray.finetune.model import tiny_config_path  # noqa: E402

CPU_GHZ = 3.0
CPU_FP32_FLOP_PER_CYCLE = 32


def default_peak(device: torch.device, precision: str) -> float:
    """Peak TFLOP/s used for MFU when --peak-tflops is not given."""
    if device.type == "cuda":
        return 989.0 if precision in ("bf16", "fp16") else 67.0
    fp32 = (os.cpu_count() or 1) * CPU_GHZ * CPU_FP32_FLOP_PER_CYCLE / 1e3
    return fp32 * (2 if precision == "bf16" else 1)


def matmul_ceiling(device: torch.device, precision: str, n: int = 2048) -> float:
    """TFLOP/s of an n x n matmul in the step's dtype: what this machine really reaches."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median([time_steps(lambda: a @ b, 3, device) for _ in range(5)])
    return 2 * n**3 / seconds / 1e12


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="flyp-tiny-vit",
                   help="open_clip name, model-config JSON, or a bench/configs stem; "
                        "flyp-tiny / flyp-tiny-vit are the package's tiny models")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=64, help="pairs per step")
    p.add_argument("--image-size", type=int, default=None, help="override the arch's image size")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="as train.compile (warm-up compiles)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(argv)
    device = torch.device(args.device)
    arch = args.arch
    if arch in ("flyp-tiny", "flyp-tiny-vit"):
        arch = str(tiny_config_path(vit=arch.endswith("vit")))
    step = build_step(arch, batch=args.batch, image_size=args.image_size,
                      precision=args.precision, device=device,
                      grad_checkpointing=args.grad_checkpointing)
    flops = step_flops(step)  # counted eagerly: compiling does not change the model's FLOPs
    if args.compile:
        step.run.model.compile()  # as train.compile does: in place; the warm-up compiles
    for _ in range(args.warmup):
        step()
    rates = [args.batch / time_steps(step, args.steps, device) for _ in range(args.repeats)]
    pairs_s = median(rates)
    achieved = flops * pairs_s / args.batch / 1e12
    peak = args.peak_tflops or default_peak(device, args.precision)
    ceiling = matmul_ceiling(device, args.precision)
    out = {"arch": args.arch, "precision": args.precision, "batch": args.batch,
           "image_size": args.image_size, "device": args.device,
           "gflop_per_pair": flops / args.batch / 1e9, "pairs_per_s": pairs_s,
           "best_pairs_per_s": max(rates), "noise": spread(rates),
           "achieved_tflops": achieved, "peak_tflops": peak,
           "mfu_best": flops * max(rates) / args.batch / 1e12 / peak,
           "mfu": achieved / peak, "matmul_ceiling_tflops": ceiling,
           "mfu_of_ceiling": achieved / ceiling, "machine": machine()}
    print(f"{args.arch} {args.precision} batch {args.batch}: {pairs_s:.1f} pairs/s "
          f"(repeats {spread(rates)}), {flops / args.batch / 1e9:.3f} GFLOP/pair, "
          f"{achieved * 1e3:.1f} GFLOP/s achieved")
    print(f"MFU {100 * out['mfu']:.1f}% (best repeat {100 * out['mfu_best']:.1f}%) of peak "
          f"{peak:.3f} TFLOP/s; "
          f"{100 * out['mfu_of_ceiling']:.1f}% of the measured matmul ceiling "
          f"{ceiling:.3f} TFLOP/s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
