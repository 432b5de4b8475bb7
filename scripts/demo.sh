#!/usr/bin/env bash
# make demo: build the noisy demo shards (reused when present), train with DISSect on CPU,
# evaluate, print a short table. Re-running reuses the shards and a finished run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=runs/demo

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  make --no-print-directory data  # installs Debian's dataset-fashion-mnist, then builds the shards
else
  "$BIN/dissect-prep" demo --out data/fmnist --noise 0.4
fi

if [ -f "$RUN/eval.json" ]; then
  echo "demo run already finished in $RUN (delete it to train again)"
else
  "$BIN/dissect-train" --config configs/demo.yaml
fi
"$BIN/python" -m benchmarks.demo_summary "$RUN"
