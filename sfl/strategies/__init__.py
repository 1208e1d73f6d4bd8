"""Named strategies (selection, aggregation, quorum), or custom ones by import path.

This package's ``__init__`` imports nothing heavy: ``selection`` and ``quorum`` are
torch-free (the initiator uses them); ``aggregation`` needs torch (the averager only).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TypeVar

from sfl.config import IMPORT_PATH

T = TypeVar("T")


class StrategyError(ValueError):
    """A strategy name is neither built in nor an importable 'package.module:attribute'."""


def resolve(name: str, builtins: Mapping[str, T], kind: str) -> T:
    if name in builtins:
        return builtins[name]
    if not IMPORT_PATH.match(name):
        raise StrategyError(
            f"unknown {kind} strategy {name!r}; allowed: {', '.join(builtins)}, "
            "or an import path 'package.module:attribute'"
        )
    module_name, attribute = name.split(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as e:
        raise StrategyError(f"{kind} strategy {name!r} cannot be imported: {e}") from e
