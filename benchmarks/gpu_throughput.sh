#!/usr/bin/env bash
# Real-size costs on one GPU, in one go (under 8 minutes; each step has its own time limit):
#   1. throughput: ViT-B/32, bf16, b=256 per GPU, with and without selection (r = 0.2, 0.5),
#      and the small-batch step without the fused optimizer, without text trimming, compiled
#   2. scoring options inside the step (current and EMA history), with short captions
#   3. the scoring forward alone, per option (benchmarks.scoring --cost-only)
#   4. loader rates per worker on this host's CPUs (benchmarks.loader, 256-px JPEG)
# Writes results/*.{json,md} (or under $OUT when set). Usage: benchmarks/gpu_throughput.sh
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi -L || true
$py -c "import torch, deepspeed, open_clip; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)"
# 16-word captions, like short web captions: every forward cuts text at the batch's longest
# caption (model.trim_text, 24 of 77 positions here); step 1d measures without the cut
common=(--model ViT-B-32 --batch 256 --precision bf16 --steps 15 --warmup 5 --score-chunk 1280 --caption-len 16)
t0=$SECONDS
timeout 100 $py -m benchmarks.throughput "${common[@]}" --ratio 0.2 \
  --methods none@b,none@B,random,clipscore,dissect:memory,dissect:ema --out "$out/throughput_vitb32_r0.2.json"
echo "[gpu] step 1a done at $((SECONDS - t0)) s"
timeout 55 $py -m benchmarks.throughput "${common[@]}" --ratio 0.5 \
  --methods none@B,dissect:memory,dissect:ema --out "$out/throughput_vitb32_r0.5.json"
echo "[gpu] step 1b done at $((SECONDS - t0)) s"
# the small-batch step with torch's foreach AdamW instead of the fused default (step(b)/step(B))
timeout 35 $py -m benchmarks.throughput "${common[@]}" --ratio 0.2 --no-fused-adam \
  --methods none@b,none@B --out "$out/throughput_vitb32_r0.2_nofused.json"
echo "[gpu] step 1c done at $((SECONDS - t0)) s"
# training and eval forwards on all 77 text positions (scoring still trims)
timeout 50 $py -m benchmarks.throughput "${common[@]}" --ratio 0.2 --no-trim-text \
  --methods none@b,none@B,dissect:memory --out "$out/throughput_vitb32_r0.2_notrim.json"
echo "[gpu] step 1d done at $((SECONDS - t0)) s"
# torch.compile (inductor) of the model's forward; compiling happens in the untimed warm-up
# (the pair the targets compare first: each method compiles its own model, and a step cut off
# by its limit keeps the methods it finished)
timeout 100 $py -m benchmarks.throughput "${common[@]}" --ratio 0.2 --compile inductor \
  --methods none@B,dissect:memory,none@b --out "$out/throughput_vitb32_r0.2_compile.json"
echo "[gpu] step 1e done at $((SECONDS - t0)) s"
# the approximate scoring options inside the step (the defaults ran in step 1a)
timeout 60 $py -m benchmarks.throughput "${common[@]}" --ratio 0.2 \
  --methods dissect:memory~engine,dissect:memory~pd0.5,dissect:ema~pd0.5,dissect:ema~pd0.5~size0.75 \
  --out "$out/throughput_vitb32_r0.2_scoring.json"
echo "[gpu] step 2 done at $((SECONDS - t0)) s"
timeout 35 $py -m benchmarks.scoring --cost-only --device cuda --cost-models ViT-B-32 \
  --cost-batch 1280 --chunk 1280 --reps 10 \
  --settings engine,lean,full,pd0.25,pd0.5,size0.75,size0.5,pd0.5+size0.75 --out "$out/scoring_cost"
echo "[gpu] step 3 done at $((SECONDS - t0)) s"
timeout 45 $py -m benchmarks.loader --models ViT-B-32 --n 1000 --reps 2 --out "$out/loader"
echo "[gpu] step 4 done at $((SECONDS - t0)) s"
