#!/usr/bin/env bash
# The H200 figures of docs/PERFORMANCE.md, as one script (about 6 minutes on one GPU):
#   bash bench/gpu_check.sh [OUT_DIR]
# Random initialisation throughout: speed does not depend on the weights, and nothing is fetched.
#
# SMOKE=1 runs every step of it on the CPU with the tiny ViT and a few steps (about 3 minutes),
# to check the script itself before GPU time is spent on it.
set -euo pipefail
out="${1:-bench-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python}"
cores="$(nproc)"
run() { echo "+ $*" >&2; "$@"; }
if [[ "${SMOKE:-0}" == 1 ]]; then
    arch=flyp-tiny-vit device=cpu bf16_batch=16 fp32_batch=16 steps=2 repeats=1 images=64
else
    arch=ViT-B-16 device=cuda bf16_batch=256 fp32_batch=128 steps=10 repeats=5 images=2000
fi
step() { "$py" bench/step_throughput.py --arch "$arch" --device "$device" "$@"; }
# Step throughput and MFU: ViT-B-16 at 224 px, bf16 (target >= 50% MFU, ~3,200 pairs/s); fp32 too.
run step --precision bf16 --batch "$bf16_batch" --peak-tflops 989 --steps "$steps" \
    --repeats "$repeats" | tee "$out/step_bf16.txt"
run step --precision fp32 --batch "$fp32_batch" --peak-tflops 67 --steps "$steps" \
    --repeats "$(( (repeats + 1) / 2 ))" | tee "$out/step_fp32.txt"
# train.compile on the same step: worth turning on only if this beats the bf16 line clearly.
run step --precision bf16 --batch "$bf16_batch" --peak-tflops 989 --steps "$steps" \
    --repeats "$(( (repeats + 1) / 2 ))" --compile | tee "$out/step_bf16_compile.txt"
# Ray overhead on the same step (target: within 2%).
run "$py" bench/ray_overhead.py --arch "$arch" --precision bf16 --batch "$bf16_batch" \
    --device "$device" --threads "$cores" --steps "$(( steps * 3 ))" --repeats 3 \
    | tee "$out/ray_overhead.txt"
# What the loader delivers per core against what the step consumes.
run "$py" bench/data_path.py --images "$images" --step-rate 3200 --repeats "$repeats" \
    | tee "$out/data_path.txt"
