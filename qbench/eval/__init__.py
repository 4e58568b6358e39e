"""Evaluations: perplexity protocols (divergence and lm-eval tasks build on them), the task
catalogue (qbench.eval.catalogue).  The names below load on first use, so a reader of the
catalogue (the report) does not import torch."""
__all__ = ["NonFiniteError", "PerplexityProtocol", "evaluate_perplexity"]


def __getattr__(name: str):
    if name in __all__:
        from qbench.eval import perplexity

        return getattr(perplexity, name)
    raise AttributeError(f"module 'qbench.eval' has no attribute {name!r}")
