#!/usr/bin/env bash
# The H200 figures of docs/PERFORMANCE.md, as one script (at most 21 minutes: the steps' caps):
#   bash bench/gpu_check.sh [OUT_DIR]
#   BUDGET=540 bash bench/gpu_check.sh OUT_DIR    # what fits in 9 minutes, most telling first
# Random initialisation throughout: speed does not depend on the weights, and nothing is fetched.
#
# The steps run in order of what their figure is worth: the bf16 step first (the day's baseline,
# 30 s on the H200), then what no run has measured yet (Ray's overhead on the GPU, ViT-B-16's
# epoch), then what the first run (2026-12-04) measured once. With BUDGET (seconds), each step
# gets at most its cap and the time left, and a step
# that would get under 25 s is skipped: a GPU lent for a fixed time brings back the first
# figures whole rather than every figure cut off. Each step's output is OUT_DIR/<step>.txt.
#
# SMOKE=1 runs every step of it on the CPU with the tiny ViT and a few steps, to check the script
# itself before GPU time is spent on it (minutes on 2 cores: the bf16 step's matmul ceiling alone
# ran over 80 s on one without bf16 matrix units).
set -uo pipefail
out="${1:-bench-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python}"
cores="$(nproc)"
start=$SECONDS
budget="${BUDGET:-0}"
if [[ "${SMOKE:-0}" == 1 ]]; then
    arch=flyp-tiny-vit device=cpu bf16_batch=16 fp32_batch=16 steps=2 repeats=1 images=64
    # the epoch benchmark: a few images, one pair of runs, one CPU per run
    epoch_args=(--device cpu --cpus 1 --repeats 1 --epochs 3 --subsample 128)
    epoch_big=(--arch flyp-tiny-vit)
else
    arch=ViT-B-16 device=cuda bf16_batch=256 fp32_batch=128 steps=10 repeats=5 images=2000
    epoch_args=(--device cuda --cpus 8 --repeats 2 --epochs 6)
    # ViT-B-16 on the same 1,200 images: the per-epoch costs around the step (a 1.8 GB
    # checkpoint, the zero-shot head, reporting) against a step that is short on an H200
    epoch_big=(--arch ViT-B-16 --repeats 1 --epochs 4)
fi

# step NAME CAP_SECONDS COMMAND...: run it (within the budget, if one is set), output to a file
step() {
    local name=$1 cap=$2; shift 2
    local limit=$cap
    if (( budget > 0 )); then
        local left=$(( budget - (SECONDS - start) ))
        (( left < limit )) && limit=$left
        if (( limit < 25 )); then echo "= $name: skipped, ${left}s of the budget left" >&2; return; fi
    fi
    echo "= $name (at most ${limit}s): $*" >&2
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "= $name: exit ${PIPESTATUS[0]} after $(( SECONDS - start ))s" >&2
}
throughput=("$py" bench/step_throughput.py --arch "$arch" --device "$device" --steps "$steps")
half=$(( (repeats + 1) / 2 ))

# Step throughput and MFU: ViT-B-16 at 224 px, bf16 (target >= 50% MFU, ~3,200 pairs/s).
step step_bf16 120 "${throughput[@]}" --precision bf16 --batch "$bf16_batch" --peak-tflops 989 \
    --repeats "$repeats"
# Ray overhead on the same step (target: within 2%). Three pairs, each Train run starting Ray
# Train's actors on a 16-core node.
step ray_overhead 200 "$py" bench/ray_overhead.py --arch "$arch" --precision bf16 \
    --batch "$bf16_batch" --device "$device" --threads "$cores" --steps "$(( steps * 3 ))" \
    --repeats 3
# The big model's epoch, one pair of runs: the per-epoch costs around the step.
step epoch_overhead_big 240 "$py" bench/epoch_overhead.py "${epoch_args[@]}" "${epoch_big[@]}"
# train.compile on the same step: worth turning on only if this beats the bf16 line clearly.
step step_bf16_compile 150 "${throughput[@]}" --precision bf16 --batch "$bf16_batch" \
    --peak-tflops 989 --repeats "$half" --compile
# An epoch of `flyp-ray train` against a bare open_clip loop (target <= 1.05x), and its fixed
# cost: the tiny model (what docs/PERFORMANCE.md compares on CPU). One pair of runs took 138 s on
# the H200 (2026-12-04), most of it the service's start and end: two need the 300.
step epoch_overhead 300 "$py" bench/epoch_overhead.py "${epoch_args[@]}"
# What the loader delivers per core against what the step consumes (CPU work).
step data_path 120 "$py" bench/data_path.py --images "$images" --step-rate 3200 \
    --repeats "$repeats"
# fp32 (TF32 off, torch's default): what a config left at `precision: fp32` gets from a GPU.
step step_fp32 90 "${throughput[@]}" --precision fp32 --batch "$fp32_batch" --peak-tflops 67 \
    --repeats "$half"
