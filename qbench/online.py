"""Offline by default, online when the user says so.

qbench sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 only where the user left them unset
(qbench/__init__.py; the Makefile uses ?= for the same reason), so runs are reproducible
from the local caches, and a user who sets one to 0 gets downloads.  Messages about a
missing model or dataset name the variable to set, and never claim it is 1 when it is not.
"""
from __future__ import annotations

import os

FALSE = ("0", "false", "no", "off", "")


def is_offline(variable: str) -> bool:
    """What the hub and datasets libraries will do: offline unless the variable says no."""
    return os.environ.get(variable, "1").strip().lower() not in FALSE


def offline_hint(variable: str, what: str) -> str:
    """The sentence that says how to get a `what` ("model", "dataset") that is not here."""
    value = os.environ.get(variable)
    if is_offline(variable):
        return (f"qbench reads the local Hugging Face cache only ({variable}={value}); set {variable}=0 "
                f"to let it download the {what}, or put it in the cache of a machine that has it")
    return (f"{variable}={value!r} allows downloads, so the {what} could not be fetched: check the name, "
            f"the network and HF_TOKEN for gated repositories")
