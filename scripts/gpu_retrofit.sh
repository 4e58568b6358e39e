#!/usr/bin/env bash
# The retrofit experiment's GPU form (issue 32), run on a lent GPU from the `retrofit` bundle
# (scripts/device_bundle.py build retrofit): VGA and the trained control under the GPU recipe
# `retrofit-gpu` (the arm plus decoder layers 8-11, 16.4M tokens, bf16 autocast), seeds
# $SEEDS (default 0: two runs' bf16 deltas, ~28 MB each, are what one call can hand back),
# each benched on the GPU (fp32 and w8a8-pt perplexity, 20,000-character protocol, draws
# 0-2; fp32 probes).  Hands back in $OUT: the records (gpu-records.tar) and each run's
# folder (deltas, retrofit.json, logs) as a tar cut into 15 MiB parts
# (retrofit-s<seed>.tar.part-aa, -ab, ...: `cat` them back together).
set -uo pipefail
OUT=${OUT:-/tmp/qbench-out}
QB="python3 -m qbench.cli"
names=()
for seed in ${SEEDS:-0}; do
  for arm in softmax vga; do
    name=smollm2-rf-gpu-$arm-s$seed
    $QB retrofit --model smollm2-135m --arm "$arm" --preset retrofit-gpu --seed "$seed" --out "models/$name" \
      --device cuda --amp bf16 --quiet || exit 1
    names+=("$name")
  done
  python3 -c "from qbench.zoo_refresh import add_retrofits; add_retrofits()"
  models=$(IFS=,; echo "smollm2-135m,${names[*]}")
  $QB bench --model "$models" --schemes fp32,w8a8-pt --tasks ppl --limit 20000 --calibration-seeds 0,1,2 \
    --device cuda --results "$OUT/gpu" --quiet
  $QB bench --model "$models" --schemes fp32 --tasks probes --limit 20000 --device cuda --results "$OUT/gpu" --quiet
  tar -cf - -C models $(printf 'smollm2-rf-gpu-%s-s'"$seed"' ' softmax vga) | split -b 15M - "$OUT/retrofit-s$seed.tar.part-"
done
[ -d "$OUT/gpu" ] && tar -cf "$OUT/gpu-records.tar" -C "$OUT" gpu && rm -rf "$OUT/gpu"
ls -la "$OUT"
