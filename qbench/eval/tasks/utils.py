"""custom_dataset hooks for qbench's lm-eval task YAMLs (items: qbench.eval.heldout_tasks)."""
from qbench.eval.heldout_tasks import as_dataset


def _corpus(kwargs) -> str:
    return kwargs.get("corpus", "sotu")


def load_cloze(**kwargs):
    return as_dataset("qbench_cloze", _corpus(kwargs))


def load_nextsent(**kwargs):
    return as_dataset("qbench_nextsent", _corpus(kwargs))


def load_agreement(**kwargs):
    return as_dataset("qbench_agreement", _corpus(kwargs))
