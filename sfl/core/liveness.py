"""A client's recent picks, answered or missed: the window its liveness is judged over.

A streak of misses is reset by one answer, so a device that answers one round and stays
silent the next was never benched and made every other round wait. The server therefore
keeps each client's last ``HISTORY_PICKS`` outcomes as the bits of one number (bit 0 the
latest pick, 1 a miss; a leading 1 marks how many picks it holds), and judges the misses
among its last ``window`` picks: alternating answers and silence is half misses whatever
their order. Pure arithmetic over that number, so the registry, selection, the quorum and a
simulation agree on it; the number is server-written and read defensively.
"""

from __future__ import annotations

# Outcomes kept per client: a liveness window may look back at most this many picks.
HISTORY_PICKS = 16
# No pick recorded yet: the marker bit alone.
EMPTY_HISTORY = 1
# Picks over which misses are counted unless the config says otherwise (liveness_window).
DEFAULT_WINDOW = 8
# A client sits out at most 2 ** this rounds after a pick (32).
MAX_BENCH_EXPONENT = 5


def valid_history(history: object) -> int:
    """A stored history as a number this module can trust; anything else reads as empty."""
    if isinstance(history, bool) or not isinstance(history, int):
        return EMPTY_HISTORY
    return history if EMPTY_HISTORY <= history < 1 << (HISTORY_PICKS + 1) else EMPTY_HISTORY


def record_pick(history: int, *, missed: bool) -> int:
    """The history with one more pick: its outcome in bit 0, the oldest beyond
    ``HISTORY_PICKS`` dropped."""
    grown = (valid_history(history) << 1) | int(missed)
    if grown >= 1 << (HISTORY_PICKS + 1):
        grown = (grown & ((1 << HISTORY_PICKS) - 1)) | (1 << HISTORY_PICKS)
    return grown


def history_from_streak(missed_streak: int) -> int:
    """What a record written before histories existed says: its streak of misses, latest."""
    picks = min(max(missed_streak, 0), HISTORY_PICKS)
    return (1 << picks) | ((1 << picks) - 1)


def recent_misses(history: int, window: int) -> tuple[int, int]:
    """(misses, picks) among the last ``window`` picks the history holds."""
    history = valid_history(history)
    picks = min(history.bit_length() - 1, max(window, 0))
    return (history & ((1 << picks) - 1)).bit_count(), picks


def bench_rounds(history: int, window: int) -> int:
    """Rounds a client sits out after its last pick: none with fewer than two misses among
    its last ``window`` picks, else ``2 ** (misses - 1)`` (at most 32). An answer does not
    clear the bench: only picks that push the misses out of the window do."""
    misses, _ = recent_misses(history, window)
    return 0 if misses < 2 else 2 ** min(misses - 1, MAX_BENCH_EXPONENT)


def is_doubtful(history: int, window: int) -> bool:
    """Whether a client's recent picks say it will likely not answer: at least two misses,
    and at least a third of its last ``window`` picks (an alternating device is, from its
    second miss). A round waits for it only until the soft deadline (``sfl.core.quorum``);
    a client that answers every pick, however slowly, is never doubtful."""
    misses, picks = recent_misses(history, window)
    return misses >= 2 and 3 * misses >= picks
