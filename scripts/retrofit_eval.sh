#!/usr/bin/env bash
# The retrofit's evaluation (issue 22): list the finished retrofits in the zoo, then bench
# each (and the original SmolLM2) on the 20,000-character protocol.  Resumable: cells that
# exist are skipped.  MODELS / SCHEMES / SEEDS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
QBENCH=${QBENCH:-.venv/bin/qbench}
$PY -c "from qbench.zoo_refresh import add_retrofits; print('zoo:', ', '.join(add_retrofits()))"
MODELS=${MODELS:-$(for f in models/smollm2-rf-*/retrofit.json; do [ -f "$f" ] && basename "$(dirname "$f")"; done | paste -sd, -)}
MODELS="smollm2-135m,$MODELS"
# the primary endpoint and the probes first, then the other schemes
$QBENCH bench --model "$MODELS" --schemes fp32,w8a8-pt --tasks ppl --limit 20000 --calibration-seeds ${SEEDS:-0,1,2} --quiet || true
$QBENCH bench --model "$MODELS" --schemes fp32 --tasks probes --limit 20000 --quiet || true
$QBENCH bench --model "$MODELS" --schemes ${SCHEMES:-w8a8-dyn,nf4,w8a8-attn,w4-rtn-g64,llm-int8,w8a8-sq,w8a8-had} \
  --tasks ppl --limit 20000 --quiet || true
