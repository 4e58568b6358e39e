"""qbench: quantization-fidelity benchmarks for transformer language models."""
__version__ = "0.1.0"

import os  # noqa: E402

# qbench never downloads models or data at run time: the hub and datasets libraries run
# offline unless the user sets these variables themselves (e.g. HF_DATASETS_OFFLINE=0).
for _variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_variable, "1")

import logging  # noqa: E402

# transformers imports hqq (its quantized KV cache) when installed, and hqq imports torchao,
# which logs a warning for each CUDA-only extension it cannot load and torch a deprecation
# for each Enum it registers: noise on every command's stderr, not a problem of the user's.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

# Nothing heavy here: `import qbench` (and so `python -m qbench.cli`) imports neither torch
# nor transformers, so the CLI's Ctrl-C handling is in place before they load.  The model
# type "qbench" registers with transformers when qbench.modeling is imported (the zoo does
# before it reads a checkpoint); retrofit folders are a lazily registered zoo folder kind.
