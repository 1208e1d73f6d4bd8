"""Every name a user chooses, registered once: the built-in tasks and strategies.

A name maps to a lazy ``module:attribute`` import path, so reading the registry imports
nothing (the initiator stays torch-free). Config validation (``sfl.core.config``), CLI help and
loading (``sfl.learning.tasks.load_task``, ``get_*`` of each strategy kind) all read it
here; a custom plug-in is named by its own import path ``package.module:attribute`` instead.
Aggregation rules register in ``sfl.core.params.RULES``, beside their parameters dataclass,
so config checks ``aggregation_params`` without torch; tasks likewise in
``sfl.core.task_params.TASKS`` (``task_params``). This registry reads both from there.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from sfl.core import params, task_params

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")

KINDS = ("task", "selection", "aggregation", "quorum")
REGISTRY: dict[str, dict[str, str]] = {
    # Tasks register with their parameters, torch-free: sfl.core.task_params.TASKS.
    "task": {name: task.implementation for name, task in task_params.TASKS.items()},
    "selection": {
        "fast_clients": "sfl.core.selection:select_fast_clients",
        "utility": "sfl.core.selection:select_by_utility",
        "random": "sfl.core.selection:select_random",
        "all": "sfl.core.selection:select_all",
        "poisson": "sfl.core.selection:select_poisson",
    },
    # Aggregation rules register with their parameters, torch-free: sfl.core.params.RULES.
    "aggregation": {name: rule.implementation for name, rule in params.RULES.items()},
    "quorum": {
        "all_answered": "sfl.core.quorum:all_answered",
        "min_fraction": "sfl.core.quorum:min_fraction",
    },
}


class PluginError(ValueError):
    """A name is neither registered nor an importable 'package.module:attribute'."""


def names(kind: str) -> tuple[str, ...]:
    """The built-in names of one kind, in registry order."""
    return tuple(REGISTRY[kind])


def allowed(kind: str) -> str:
    return f"{', '.join(names(kind))}, or an import path 'package.module:attribute'"


def is_valid(kind: str, name: str) -> bool:
    """A registered name or something shaped like an import path (not imported here)."""
    return name in REGISTRY[kind] or bool(IMPORT_PATH.match(name))


def import_path(kind: str, name: str) -> str:
    """Where ``name`` lives: the registered path of a built-in, or ``name`` itself."""
    if name in REGISTRY[kind]:
        return REGISTRY[kind][name]
    if not IMPORT_PATH.match(name):
        raise PluginError(f"unknown {kind} {name!r}; allowed: {allowed(kind)}")
    return name


def load(kind: str, name: str) -> Any:
    """The object ``name`` stands for, imported now."""
    path = import_path(kind, name)
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{kind} {name!r}: cannot import module {module_name!r}: {e}") from e
    if not hasattr(module, attribute):
        raise PluginError(f"{kind} {name!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)
