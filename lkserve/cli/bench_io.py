"""Output plumbing shared by the bench/ scripts."""

from __future__ import annotations

import os
import sys


def json_stdout():
    """A file on the original stdout for the one JSON document a bench script prints. fd 1 (and sys.stdout) then
    point at stderr, so vLLM's child processes, which write their logs straight to fd 1, cannot mix into the JSON."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out
