"""Streaming statistics: activation outliers, attention sinks, value/residual drains, gates."""
from qbench.probes.attach import attach_probes, run_probes

__all__ = ["attach_probes", "run_probes"]
