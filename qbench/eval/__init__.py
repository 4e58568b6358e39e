"""Evaluations: perplexity protocols (divergence and lm-eval tasks build on them)."""
from qbench.eval.perplexity import NonFiniteError, PerplexityProtocol, evaluate_perplexity

__all__ = ["NonFiniteError", "PerplexityProtocol", "evaluate_perplexity"]
