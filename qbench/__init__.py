"""qbench: quantization-fidelity benchmarks for transformer language models."""
__version__ = "0.1.0"

from qbench import modeling  # noqa: E402,F401  registers model_type "qbench" with transformers
