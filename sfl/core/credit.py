"""What an accepted update earns its client in selection: credit for useful work only.

An update that changes the model by next to nothing (the base model plus a trace) is cheap
to send at once, and was credited with the fastest turnaround and a full utility: a device
could earn its way into most rounds by answering instantly with nothing. So an answer is
credited only once its round is finished, against the round's changes: one far smaller than
a typical change is counted as a miss (no turnaround sample, no utility). Pure arithmetic,
shared by the averager (``sfl.server.participation``) and the benchmarks' replay.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# An accepted change below this share of the round's typical change earns no credit.
NEGLIGIBLE_CHANGE_SHARE = 0.1
# Fewer accepted changes than this are too few for their median to say what is typical
# (the devices' own would decide it): the last closed round's stands in.
MIN_CHANGES_FOR_MEDIAN = 3


def typical_change(norms: Sequence[float], *, last_bound: float, bound_factor: float) -> float:
    """The round's typical change from the base model: the (lower) median of its accepted
    changes, or with fewer than ``MIN_CHANGES_FOR_MEDIAN`` of them the last closed round's
    norm bound over the factor it was made with (what that round's median was). 0: none
    known, nothing is judged negligible."""
    known = [n for n in norms if n > 0]
    if len(known) >= MIN_CHANGES_FOR_MEDIAN:
        return float(statistics.median_low(known))
    if last_bound > 0 and bound_factor > 0:
        return last_bound / bound_factor
    return 0.0


def is_negligible(delta_norm: float, typical: float) -> bool:
    """Whether a change is too small against the round's typical one to count as work."""
    return typical > 0 and not delta_norm >= NEGLIGIBLE_CHANGE_SHARE * typical
