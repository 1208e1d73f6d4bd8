"""What an accepted update earns its client in selection: credit for useful work only.

An update that changes the model by next to nothing (the base model plus a trace) is cheap
to send at once, and was credited with the fastest turnaround and a full utility: a device
could earn its way into most rounds by answering instantly with nothing. So an answer is
credited only once its round is finished, against the typical change of recent rounds and
this one (a round of one client is judged against others' changes, not its own): one far
smaller is counted as a miss (no turnaround sample, no utility, a miss in its history).
Pure arithmetic, shared by the averager (``sfl.server.participation``) and the benchmarks'
replay.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# An accepted change below this share of the typical change earns no credit.
NEGLIGIBLE_CHANGE_SHARE = 0.1
# Fewer known changes than this are too few for their median to say what is typical.
MIN_CHANGES_FOR_MEDIAN = 3
# Credited changes of recent rounds kept as the reference: a round of one or two clients is
# judged against them, not against its own devices' changes.
CHANGE_POOL_SIZE = 32


def typical_change(pool: Sequence[float], norms: Sequence[float]) -> float:
    """The typical change from the base model: the (lower) median of the recent rounds'
    credited changes (``pool``) and this round's accepted ones. 0 (nothing is judged
    negligible) with fewer than ``MIN_CHANGES_FOR_MEDIAN`` known."""
    known = [n for n in (*pool, *norms) if n > 0]
    if len(known) < MIN_CHANGES_FOR_MEDIAN:
        return 0.0
    return float(statistics.median_low(known))


def is_negligible(delta_norm: float, typical: float) -> bool:
    """Whether a change is too small against the typical one to count as work."""
    return typical > 0 and not delta_norm >= NEGLIGIBLE_CHANGE_SHARE * typical


def grown_pool(pool: Sequence[float], credited: Sequence[float]) -> tuple[float, ...]:
    """The pool with this round's credited changes, the oldest beyond ``CHANGE_POOL_SIZE``
    dropped. Negligible changes never enter it, so a device cannot drag the reference down."""
    return tuple((*pool, *(n for n in credited if n > 0)))[-CHANGE_POOL_SIZE:]
