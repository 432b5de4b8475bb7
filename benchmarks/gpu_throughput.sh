#!/usr/bin/env bash
# Real-size throughput on one GPU: ViT-B/32, bf16, b=256 per GPU, with and without selection.
# Writes results/throughput_*.{json,md} (or under $OUT when set). Usage: benchmarks/gpu_throughput.sh
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi -L || true
$py -c "import torch, deepspeed, open_clip; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)"
common=(--model ViT-B-32 --batch 256 --precision bf16 --steps 15 --warmup 5 --score-chunk 1280)
timeout 300 $py -m benchmarks.throughput "${common[@]}" --ratio 0.2 \
  --methods none@b,none@B,random,clipscore,dissect:memory,dissect:ema --out "$out/throughput_vitb32_r0.2.json"
timeout 150 $py -m benchmarks.throughput "${common[@]}" --ratio 0.5 \
  --methods none@B,dissect:memory,dissect:ema --out "$out/throughput_vitb32_r0.5.json"
