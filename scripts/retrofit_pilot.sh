#!/usr/bin/env bash
# The retrofit's CPU pilot (issue 22): each arm fine-tuned into SmolLM2-135M by the
# `retrofit-pilot` recipe (gates / sink logits only), one thread, resumable (rerun it).
# Then `qbench bench` over the retrofitted models and the original (README "Retrofit").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
QBENCH=${QBENCH:-.venv/bin/qbench}
SEED=${SEED:-0}
for arm in ${ARMS:-vga vga_out sink_logit qwen_g1 softmax}; do
  out=models/smollm2-rf-pilot-$arm-s$SEED
  [ -f "$out/retrofit.json" ] && { echo "have $out"; continue; }
  $QBENCH retrofit --model smollm2-135m --arm "$arm" --preset retrofit-pilot --seed "$SEED" --out "$out" --threads 1 --quiet
done
