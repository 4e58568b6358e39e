"""Name look-ups' "did you mean" suggestions: `closest(name, valid)` is the tail of an error
message naming the nearest valid names."""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, valid: Iterable[str]) -> str:
    """A message tail suggesting the closest valid names, then listing all of them."""
    valid = sorted(set(valid))
    near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    if len(valid) > 40:  # e.g. lm-eval's thousands of task names
        return f"{hint} ({len(valid)} valid names; list them with the tool that owns them)"
    return f"{hint} (valid: {', '.join(valid)})"
