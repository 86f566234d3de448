#!/usr/bin/env bash
# The H200 figures of docs/PERFORMANCE.md, as one script (about 10 minutes on one GPU):
#   bash bench/gpu_check.sh [OUT_DIR]
# Random initialisation throughout: speed does not depend on the weights, and nothing is fetched.
#
# SMOKE=1 runs every step of it on the CPU with the tiny ViT and a few steps (about 5 minutes),
# to check the script itself before GPU time is spent on it.
set -euo pipefail
out="${1:-bench-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python}"
cores="$(nproc)"
run() { echo "+ $*" >&2; "$@"; }
if [[ "${SMOKE:-0}" == 1 ]]; then
    arch=flyp-tiny-vit device=cpu bf16_batch=16 fp32_batch=16 steps=2 repeats=1 images=64
    # the epoch benchmark: a few images, one pair of runs, one CPU per run
    epoch_args=(--device cpu --cpus 1 --repeats 1 --epochs 3 --subsample 128)
    epoch_big=(--arch flyp-tiny-vit)
else
    arch=ViT-B-16 device=cuda bf16_batch=256 fp32_batch=128 steps=10 repeats=5 images=2000
    epoch_args=(--device cuda --cpus 8 --repeats 3 --epochs 6)
    # ViT-B-16 on the same 1,200 images: the per-epoch costs around the step (a 1.8 GB
    # checkpoint, the zero-shot head, reporting) against a step that is short on an H200
    epoch_big=(--arch ViT-B-16 --repeats 2 --epochs 4)
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
# An epoch of `flyp-ray train` against a bare open_clip loop (target <= 1.05x), and its fixed
# cost: the tiny model (what docs/PERFORMANCE.md compares on CPU), then the big one, fewer runs.
run "$py" bench/epoch_overhead.py "${epoch_args[@]}" | tee "$out/epoch_overhead.txt"
run "$py" bench/epoch_overhead.py "${epoch_args[@]}" "${epoch_big[@]}" \
    | tee "$out/epoch_overhead_big.txt"
