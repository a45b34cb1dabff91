#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md ("Vectorised clients"), in one call on a CUDA machine:
#   1. the two training engines alone on ViT-B/16 shapes at 224 px in bf16 autocast, every method
#      at 1 x 256, 8 x 32, 32 x 8 and 128 x 8 against the centralised reference (one client with
#      the m x B images in one batch; medians of REPEATS alternating runs, CUDA peak memory), on the
#      engine's stacked path and, for comparison, its vmap path at 32 x 8; rows print as they come, so a
#      step cut by its limit leaves the rows it finished;
#   2. the quickstart end to end on both runners in bf16-mixed (Lightning on the GPU, 2 rounds);
#   3. the ViT-B/16 case end to end (benchmarks/configs/vit_b16.yaml, 3 rounds of 32 x 8): fit
#      time and time per round, to hold against step 1's engine time at 32 x 8.
# Each step has its own time limit and writes its table to OUT (default benchmarks/results); the
# script exits non-zero if a step fails or the two sides' states differ by more than 1e-2. The limits
# add up to 560 s, so the whole script fits one call of a lent machine (at most 600 s a command);
# REPEATS (default 3) sets step 1's medians.
#
#   bash benchmarks/gpu.sh [OUT]
#   REPEATS=5 bash benchmarks/gpu.sh [OUT]    # where the machine is yours for longer
set -u -o pipefail
out=$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
# the table to the results file, warnings to a log; fails if a method's states disagree beyond bf16 rounding
timeout 260 $py benchmarks/vectorized.py --device cuda --model vit-b16 --precision bf16 --max-parallel 32 --memory \
    --repeats "${REPEATS:-3}" --skip full@128x8 --max-diff 1e-2 2>"$out/vectorized_gpu.log" | tee "$out/vectorized_gpu.md" || status=1
timeout 80 $py benchmarks/vectorized.py --device cuda --model vit-b16 --precision bf16 --max-parallel 32 --memory \
    --repeats "${REPEATS:-3}" --path vmap --methods head bias adapter prompt lora --configs 32x8 --max-diff 1e-2 \
    2>"$out/vectorized_gpu_vmap.log" | tee "$out/vectorized_gpu_vmap.md" || status=1
timeout 90 $py benchmarks/runners.py --methods lora prompt --rounds 2 --accelerator gpu --precision bf16-mixed \
    --output "$out/runners_gpu.md" 2>&1 | tail -8 || status=1
timeout 130 $py benchmarks/runners.py --methods lora prompt bias --rounds 3 --accelerator gpu --precision bf16-mixed \
    --config benchmarks/configs/vit_b16.yaml --output "$out/runners_vit_b16.md" 2>&1 | tail -8 || status=1
exit "${status:-0}"
