#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md ("Vectorised clients"), in one call on a CUDA machine:
#   1. the two training engines alone on ViT-B/16 shapes at 224 px in bf16 autocast, every method
#      at 8 x 32, 32 x 8 and 128 x 8 (medians of 5 alternating runs, CUDA peak memory);
#   2. the quickstart end to end on both runners in bf16-mixed (Lightning on the GPU, 2 rounds).
# Each step has its own time limit and writes its table to OUT (default benchmarks/results).
#
#   bash benchmarks/gpu.sh [OUT]
set -u
out=$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
timeout 420 $py benchmarks/vectorized.py --device cuda --model vit-b16 --precision bf16 --max-parallel 32 --memory \
    --skip full@128x8 2>&1 | tee "$out/vectorized_gpu.md"
timeout 150 $py benchmarks/runners.py --methods lora prompt --rounds 2 --accelerator gpu --precision bf16-mixed \
    --output "$out/runners_gpu.md" 2>&1 | tail -8
