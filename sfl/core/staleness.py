"""How much a buffered update counts when it started from an older model version.

In buffered mode a device trains on the newest version it was given, and the server may have
taken several steps by the time its update arrives. The update's staleness ``tau`` is how many
versions behind it is (0: it started from the version the step applies to). Its weight in the
buffer's mean is its bounded example weight times ``staleness_factor``: the weightings of
FedBuff (Nguyen et al., AISTATS 2022) and FedAsync (Xie et al., 2019), torch-free so the
initiator, the averager and the benchmarks read one definition.
"""

from __future__ import annotations

import math
from typing import Final

WEIGHTINGS: Final = ("constant", "polynomial", "hinge")


def staleness_factor(weighting: str, tau: int, *, exponent: float = 0.5, hinge: int = 4) -> float:
    """The factor in (0, 1] for an update ``tau`` versions behind.

    - ``constant``: 1 whatever the staleness.
    - ``polynomial``: ``1 / (1 + tau) ** exponent``.
    - ``hinge``: 1 up to ``hinge`` versions behind, then ``1 / (exponent * (tau - hinge) + 1)``.
    """
    if tau < 0:
        raise ValueError(f"staleness must be >= 0 versions, got {tau}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"staleness exponent must be a finite number >= 0, got {exponent}")
    if hinge < 0:
        raise ValueError(f"staleness hinge must be >= 0 versions, got {hinge}")
    if weighting == "constant":
        return 1.0
    if weighting == "polynomial":
        return float((1.0 + tau) ** -exponent)
    if weighting == "hinge":
        return 1.0 if tau <= hinge else 1.0 / (exponent * (tau - hinge) + 1.0)
    raise ValueError(f"unknown staleness weighting {weighting!r}: one of {', '.join(WEIGHTINGS)}")
