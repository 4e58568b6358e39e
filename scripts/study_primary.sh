#!/bin/sh
# The study's primary endpoint once new tiny seeds have landed in models/ (issue 30): list
# them in the zoo (`qbench zoo` measures only new or changed checkpoints), compute the missing
# cells of the primary endpoint (whole test split, 3 calibration draws), of the quick check
# (the `tiny` stage, first 20,000 characters) and the fp32 probes, measure the primary cells'
# arithmetic sensitivity (ISA AVX-512 -> AVX2), the other gated arms' draws on the whole split
# (iga, vga_out), then regenerate STUDY.md, the README's
# generated text, REPORT.md and summary.csv and check them.  Every step skips what the store
# holds already, so an interrupted run resumes where it stopped.  One thread per cell, like
# the committed records (OMP_NUM_THREADS overrides).
set -e
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$VENV/bin/qbench" zoo > /dev/null
"$VENV/bin/qbench" study --compute --stages "primary,tiny fp32 probes,tiny" --readme ''
"$VENV/bin/qbench" sensitivity --stages primary
"$VENV/bin/qbench" study --compute --stages "primary other arms" --readme ''
"$VENV/bin/qbench" study
"$VENV/bin/qbench" report
"$VENV/bin/python" scripts/check_generated.py
