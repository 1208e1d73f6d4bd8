"""Training tasks, chosen by name (``sfl.core.plugins``: ``digits``, ``mnist``, ``image_folder``,
``tabular``, ...) or by import path, with their parameters (``task_params``).

Importing this package imports no torch: ``load_task`` imports a task's module when asked.
A task that takes parameters declares them as its ``Params`` attribute, a keyword-only
dataclass deriving ``sfl.core.task_params.TaskParams``; ``load_task`` checks the given
parameters against it and calls the task with the checked instance as its one argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sfl.core import plugins
from sfl.core import task_params as task_params_
from sfl.core.params import ParamsError, PluginParams
from sfl.learning.tasks.base import TrainingTask

if TYPE_CHECKING:
    from sfl.core.config import FederationConfig


class TaskError(ValueError):
    """A task name or import path does not lead to a training task, or its parameters are bad."""


def load_task(
    name_or_path: str, params: str | Mapping[str, Any] | None = None, **kwargs: Any
) -> TrainingTask:
    """A task instance, built with its parameters (``task_params``: a JSON object's text or a
    mapping; checked against the task's ``Params``). ``kwargs`` go to the constructor of a
    task without ``Params`` (e.g. older tasks' own keywords)."""
    try:
        factory = plugins.load("task", name_or_path)
    except plugins.PluginError as e:
        raise TaskError(str(e)) from e
    if not callable(factory):
        raise TaskError(f"task {name_or_path!r}: it is not a class or function")
    try:
        given = task_params_.parse(params) if isinstance(params, str) else dict(params or {})
    except ParamsError as e:
        raise TaskError(str(e)) from e
    declared = getattr(factory, "Params", None)
    if isinstance(declared, type) and issubclass(declared, PluginParams):
        try:
            checked = declared.from_mapping(name_or_path, given)
        except ParamsError as e:
            raise TaskError(str(e)) from e
        task = factory(checked, **kwargs)
    elif given:
        raise TaskError(
            f"task {name_or_path!r} takes no parameters (it declares no Params dataclass); "
            f"given: {', '.join(sorted(given))}"
        )
    else:
        task = factory(**kwargs)
    if not isinstance(task, TrainingTask):
        raise TaskError(
            f"task {name_or_path!r} made a {type(task).__name__}, which is not a TrainingTask "
            "(needs name, build_model, load_central_data, load_client_data, train, evaluate)"
        )
    return task


def configured_task(config: FederationConfig) -> TrainingTask:
    """The federation's task, built with its ``task_params``."""
    return load_task(config.task, config.task_params)
