"""Which requests get captured. The engine asks per request; the policy lives here so it is written down once.

Opting out wins over everything: a request marked no-capture is never recorded, whatever the sample rate.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Request header a client (or the gateway, per API key) sets to keep a request out of the capture stream.
OPT_OUT_HEADER = "x-lkserve-no-capture"
_TRUTHY = {"1", "true", "yes", "on"}


def should_capture(
    sample_rate: float, opt_out: bool = False, rng: Callable[[], float] = random.random, enabled: bool = True
) -> bool:
    """True if this request's verification records go to the stream. `rng` returns floats in [0, 1)."""
    if not enabled or opt_out or sample_rate <= 0.0:
        return False
    return sample_rate >= 1.0 or rng() < sample_rate


def opted_out(headers) -> bool:
    """True if the request carries `x-lkserve-no-capture: 1|true|yes|on` (any header-name case)."""
    for name, value in dict(headers or {}).items():
        if name.lower() == OPT_OUT_HEADER and str(value).strip().lower() in _TRUTHY:
            return True
    return False
