#!/usr/bin/env bash
# The H200 figures of docs/PERFORMANCE.md, as one script (about 6 minutes on one GPU):
#   bash bench/gpu_check.sh [OUT_DIR]
# Random initialisation throughout: speed does not depend on the weights, and nothing is fetched.
set -euo pipefail
out="${1:-bench-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python}"
cores="$(nproc)"
run() { echo "+ $*" >&2; "$@"; }
# Step throughput and MFU: ViT-B-16 at 224 px, bf16 (target >= 50% MFU, ~3,200 pairs/s); fp32 too.
run "$py" bench/step_throughput.py --arch ViT-B-16 --precision bf16 --batch 256 --device cuda \
    --peak-tflops 989 --steps 10 --repeats 5 | tee "$out/step_vitb16_bf16.txt"
run "$py" bench/step_throughput.py --arch ViT-B-16 --precision fp32 --batch 128 --device cuda \
    --peak-tflops 67 --steps 5 --repeats 3 | tee "$out/step_vitb16_fp32.txt"
# train.compile on the same step: worth turning on only if this beats the line above clearly.
run "$py" bench/step_throughput.py --arch ViT-B-16 --precision bf16 --batch 256 --device cuda \
    --peak-tflops 989 --steps 10 --repeats 3 --compile | tee "$out/step_vitb16_bf16_compile.txt"
# Ray overhead on the same step (target: within 2%).
run "$py" bench/ray_overhead.py --arch ViT-B-16 --precision bf16 --batch 256 --device cuda \
    --threads "$cores" --steps 30 --repeats 3 | tee "$out/ray_overhead_vitb16.txt"
# What the loader delivers per core against what the step consumes.
run "$py" bench/data_path.py --images 2000 --step-rate 3200 | tee "$out/data_path.txt"
