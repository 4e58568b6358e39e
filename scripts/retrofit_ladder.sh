#!/usr/bin/env bash
# The retrofit experiment on the CPU (issue 32): H1 (recipe retrofit-cpu-h1) and H2, clamp and
# repair (retrofit-cpu-h2), each arm and the trained softmax control, CPU bf16 autocast, one
# thread per run; each finished model is benched at once (fp32 and w8a8-pt perplexity on the
# 20,000-character protocol, calibration draw 0; the probes at the largest dose).  WORKERS
# processes share one queue (a job is claimed by an atomic mkdir); resumable: rerun it
# (retrofits resume from their state, cells that exist are skipped).  The queue is in
# priority order: control and vga seeds 0-1, then vga_out and sink_logit seeds 0-1, then
# control and vga seeds 2-3 (the verdict rule needs 4 seeds per side).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
QBENCH=${QBENCH:-.venv/bin/qbench}
LOGS=${LOGS:-logs/ladder}
WORKERS=${WORKERS:-2}
mkdir -p "$LOGS/claims"

jobs() {
  for seed in 0 1; do for hyp in h2 h1; do for arm in softmax vga; do echo "$hyp $arm $seed"; done; done; done
  for seed in 0 1; do for hyp in h2 h1; do for arm in vga_out sink_logit; do echo "$hyp $arm $seed"; done; done; done
  for seed in 2 3; do for hyp in h2 h1; do for arm in softmax vga; do echo "$hyp $arm $seed"; done; done; done
}

bench() {  # bench MODEL [probes]
  flock "$LOGS/zoo.lock" $PY -c "from qbench.zoo_refresh import add_retrofits; add_retrofits()"
  $QBENCH bench --model "$1" --schemes fp32,w8a8-pt --tasks ppl --limit 20000 --calibration-seeds 0 --quiet
  [ "${2:-}" = probes ] && $QBENCH bench --model "$1" --schemes fp32 --tasks probes --limit 20000 --quiet
  return 0
}

worker() {
  jobs | while read -r hyp arm seed; do
    name=smollm2-rf-$hyp-$arm-s$seed
    mkdir "$LOGS/claims/$name" 2>/dev/null || continue
    echo "$(date -u +%FT%TZ) worker $1: $name" >> "$LOGS/progress.log"
    if [ ! -f "models/$name/retrofit.json" ]; then
      $QBENCH retrofit --model smollm2-135m --arm "$arm" --preset "retrofit-cpu-$hyp" --seed "$seed" \
        --out "models/$name" --threads 1 --amp bf16 --quiet >> "$LOGS/$name.log" 2>&1 || {
        echo "$(date -u +%FT%TZ) FAILED $name" >> "$LOGS/progress.log"; continue; }
    fi
    bench "$name" probes >> "$LOGS/$name.log" 2>&1
    if [ "$seed" = 0 ] && { [ "$arm" = softmax ] || [ "$arm" = vga ]; }; then  # the dose ladder
      for snap in models/$name-t*k; do [ -f "$snap/retrofit.json" ] || continue
        [ "$hyp" = h2 ] || [ "${snap##*-}" != t0k ] || continue
        [ "${snap##*-}" != t0k ] || [ "$arm" = softmax ] || continue  # step 0 is the same clamped base for every arm
        bench "$(basename "$snap")" >> "$LOGS/$name.log" 2>&1
      done
    fi
    echo "$(date -u +%FT%TZ) done $name" >> "$LOGS/progress.log"
  done
}

for w in $(seq 1 "$WORKERS"); do worker "$w" & done
wait
