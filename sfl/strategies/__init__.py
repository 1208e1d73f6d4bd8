"""Named strategies (selection, aggregation, quorum), or custom ones by import path.

This package's ``__init__`` imports nothing heavy: ``selection`` and ``quorum`` are
torch-free (the initiator uses them); ``aggregation`` needs torch (the averager only). The
names are registered once, in ``sfl.plugins``.
"""

from __future__ import annotations

from sfl.plugins import PluginError

# Kept under the name callers know: a strategy that is neither built in nor importable.
StrategyError = PluginError

__all__ = ["StrategyError"]
