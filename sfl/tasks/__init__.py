"""Training tasks, chosen by name (``digits``, ``mnist``) or by import path ``package.module:attr``.

Importing this package imports no torch: ``load_task`` imports a task's module when asked.
"""

from __future__ import annotations

import importlib
from typing import Any

from sfl.config import BUILTIN_TASKS, IMPORT_PATH
from sfl.tasks.base import TrainingTask


class TaskError(ValueError):
    """A task name or import path does not lead to a training task."""


def load_task(name_or_path: str, **kwargs: Any) -> TrainingTask:
    """A task instance; ``kwargs`` go to its constructor (e.g. ``root`` for mnist)."""
    allowed = f"allowed: {', '.join(BUILTIN_TASKS)}, or an import path 'package.module:attribute'"
    if name_or_path == "digits":
        from sfl.tasks.digits import DigitsTask

        return DigitsTask(**kwargs)
    if name_or_path == "mnist":
        from sfl.tasks.mnist import MnistTask

        return MnistTask(**kwargs)
    if not IMPORT_PATH.match(name_or_path):
        raise TaskError(f"unknown task {name_or_path!r}; {allowed}")
    module_name, _, attribute = name_or_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task {name_or_path!r}: cannot import module {module_name!r}: {e}") from e
    factory = getattr(module, attribute, None)
    if factory is None:
        raise TaskError(f"task {name_or_path!r}: module {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise TaskError(f"task {name_or_path!r}: {attribute!r} is not a class or function")
    task = factory(**kwargs)
    if not isinstance(task, TrainingTask):
        raise TaskError(
            f"task {name_or_path!r} made a {type(task).__name__}, which is not a TrainingTask "
            "(needs name, build_model, load_central_data, load_client_data, train, evaluate)"
        )
    return task
