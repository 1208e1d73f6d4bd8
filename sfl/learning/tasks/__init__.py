"""Training tasks, chosen by name (``sfl.core.plugins``: ``digits``, ``mnist``) or by import path.

Importing this package imports no torch: ``load_task`` imports a task's module when asked.
"""

from __future__ import annotations

from typing import Any

from sfl.core import plugins
from sfl.learning.tasks.base import TrainingTask


class TaskError(ValueError):
    """A task name or import path does not lead to a training task."""


def load_task(name_or_path: str, **kwargs: Any) -> TrainingTask:
    """A task instance; ``kwargs`` go to its constructor (e.g. ``root`` for mnist)."""
    try:
        factory = plugins.load("task", name_or_path)
    except plugins.PluginError as e:
        raise TaskError(str(e)) from e
    if not callable(factory):
        raise TaskError(f"task {name_or_path!r}: it is not a class or function")
    task = factory(**kwargs)
    if not isinstance(task, TrainingTask):
        raise TaskError(
            f"task {name_or_path!r} made a {type(task).__name__}, which is not a TrainingTask "
            "(needs name, build_model, load_central_data, load_client_data, train, evaluate)"
        )
    return task
