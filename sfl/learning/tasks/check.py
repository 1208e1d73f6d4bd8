"""A task run through the contract (``sfl.learning.tasks.base``) on sample data, one step at
a time, each ending in a plain verdict: what ``sfl task check`` reports.

A user's task is code we did not write: every step runs the task inside ``try`` and reports
an exception as that step's failure, in one line (its type and message), never a traceback.
Steps that need an earlier one's result are skipped when it failed. Checks of the encoded
model against limits that live above this package (the device's size limit, the averager's
sizing) are handed in by the caller as ``ModelCheck``s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfl.learning import codec
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset, Metrics, TrainConfig, TrainingTask

if TYPE_CHECKING:
    import torch

# Examples the training and evaluation steps use: enough for a minibatch, quick on a laptop.
SAMPLE_EXAMPLES = 64
_DETAIL_CHARS = 300


class Verdict(Enum):
    OK = "ok"
    WARN = "warn"  # worth a look, not a failure
    FAIL = "fail"
    SKIP = "skip"  # an earlier step it needs failed


@dataclass(frozen=True)
class Step:
    """One step's verdict, in one line."""

    name: str
    verdict: Verdict
    detail: str

    def line(self) -> str:
        return f"{self.verdict.value.upper():4s}  {self.name:11s} {self.detail}"


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    bytes: int  # the model as stored (``codec.encode_model``): what every round moves


#: A check of the encoded model against a limit: (its step name, a function of the encoded
#: bytes and the state dict returning a one-line verdict detail, raising ``ValueError`` with
#: the numbers when over the limit).
ModelCheck = tuple[str, Callable[[bytes, Mapping[str, "torch.Tensor"]], str]]


@dataclass
class TaskReport:
    """Every step's verdict, and the model's size if it got that far."""

    task: str
    steps: list[Step] = field(default_factory=list)
    size: ModelSize | None = None

    @property
    def ok(self) -> bool:
        return all(s.verdict in (Verdict.OK, Verdict.WARN) for s in self.steps)

    def add(self, name: str, verdict: Verdict, detail: str) -> None:
        self.steps.append(Step(name, verdict, detail))


class _Failed(Exception):
    """A step failed; its verdict is already recorded."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:_DETAIL_CHARS] if text else type(e).__name__


@contextmanager
def _step(report: TaskReport, name: str, *, by_task: bool = True) -> Iterator[None]:
    """Run a step: an exception is this step's failure, in one line (``by_task``: the task
    raised it; else it is a limit's verdict, its message says why)."""
    try:
        yield
    except _Failed:
        raise
    except Exception as e:
        why = f"raised {_one_line(e)}" if by_task else " ".join(str(e).split())
        report.add(name, Verdict.FAIL, why)
        raise _Failed from e


def _fail(report: TaskReport, name: str, detail: str) -> None:
    report.add(name, Verdict.FAIL, detail)
    raise _Failed


def _finite(metrics: Any) -> str | None:
    """Why ``metrics`` are not a finite ``Metrics``, or None if they are."""
    if not isinstance(metrics, Metrics):
        return f"returned a {type(metrics).__name__}, not Metrics"
    for name in ("loss", "accuracy"):
        value = getattr(metrics, name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"{name} is {value!r}, not a finite number"
    if not isinstance(metrics.num_examples, int) or metrics.num_examples <= 0:
        return f"num_examples is {metrics.num_examples!r}, not a positive integer"
    return None


def _state(model: Any) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"build_model returned a {type(model).__name__}, not a torch.nn.Module")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> str | None:
    """The first way two state dicts differ (names, shape, dtype, values), or None."""
    import torch

    if set(a) != set(b):
        return f"tensor names differ: {', '.join(sorted(set(a) ^ set(b))[:5])}"
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if not torch.equal(x, y):
            return f"{name}: values differ"
    return None


def _sample(data: ArrayDataset, n: int = SAMPLE_EXAMPLES) -> ArrayDataset:
    return ArrayDataset(x=data.x[:n], y=data.y[:n])


def _dataset(data: Any, what: str) -> ArrayDataset:
    if not isinstance(data, ArrayDataset):
        raise TypeError(f"{what} is a {type(data).__name__}, not an ArrayDataset")
    if len(data.x) != len(data.y):
        raise ValueError(f"{what} has {len(data.x)} features and {len(data.y)} labels")
    if len(data) == 0:
        raise ValueError(f"{what} is empty")
    return data


def check_task(
    task_name: str,
    *,
    data_dir: Path | None = None,
    model_checks: Sequence[ModelCheck] = (),
) -> TaskReport:
    """Run ``task_name`` (a built-in name or an import path) through the contract: it loads;
    same seed, same weights; its data loads (``data_dir``: a client's, else the central
    data); one training step on a small batch and an evaluation return finite metrics; the
    model round-trips through safetensors; then ``model_checks`` on the encoded model."""
    report = TaskReport(task=task_name)
    try:
        with _step(report, "load"):
            task = load_task(task_name)
        report.add("load", Verdict.OK, f"{task_name} ({type(task).__name__})")
        state = _check_seed(report, task)
    except _Failed:
        return _skip_rest(report)
    data: tuple[ArrayDataset, ArrayDataset] | None
    try:
        data = _check_data(report, task, data_dir)
    except _Failed:
        data = None
    if data is None:
        report.add("train", Verdict.SKIP, "no data")
        report.add("evaluate", Verdict.SKIP, "no data")
    else:
        train, evaluation = data
        try:
            model = _check_train(report, task, train, state)
        except _Failed:
            report.add("evaluate", Verdict.SKIP, "needs the trained model")
        else:
            with suppress(_Failed):
                _check_evaluate(report, task, model, evaluation)
    try:
        body = _check_safetensors(report, state)
    except _Failed:
        return _skip_rest(report)
    for name, check in model_checks:
        try:
            with _step(report, name, by_task=False):
                detail = check(body, state)
            report.add(name, Verdict.OK, detail)
        except _Failed:
            continue
    return report


_ALL_STEPS = ("load", "seed", "data", "train", "evaluate", "safetensors")


def _skip_rest(report: TaskReport) -> TaskReport:
    done = {s.name for s in report.steps}
    for name in _ALL_STEPS:
        if name not in done:
            report.add(name, Verdict.SKIP, "an earlier step failed")
    return report


def _check_seed(report: TaskReport, task: TrainingTask) -> dict[str, torch.Tensor]:
    with _step(report, "seed"):
        first = _state(task.build_model(seed=0))
        again = _state(task.build_model(seed=0))
        other = _state(task.build_model(seed=1))
    differs = _difference(first, again)
    if differs is not None:
        _fail(report, "seed", f"build_model(seed=0) twice gave different weights ({differs})")
    if _difference(first, other) is None:
        report.add(
            "seed",
            Verdict.WARN,
            "same seed, same weights; but seed 1 gives the same weights as seed 0 "
            "(does build_model use its seed?)",
        )
    else:
        report.add("seed", Verdict.OK, f"same seed, same weights ({len(first)} tensors)")
    return first


def _check_data(
    report: TaskReport, task: TrainingTask, data_dir: Path | None
) -> tuple[ArrayDataset, ArrayDataset]:
    with _step(report, "data"):
        if data_dir is not None:
            client = task.load_client_data(data_dir)
            train = _dataset(getattr(client, "train", None), "the client's train split")
            evaluation = _dataset(getattr(client, "eval", None), "the client's eval split")
            where = f"client data in {data_dir}"
        else:
            central = task.load_central_data()
            train = _dataset(getattr(central, "train", None), "the central train split")
            evaluation = _dataset(getattr(central, "test", None), "the central test split")
            where = "central data"
    report.add(
        "data",
        Verdict.OK,
        f"{where}: {len(train)} training and {len(evaluation)} evaluation examples",
    )
    return train, evaluation


def _check_train(
    report: TaskReport,
    task: TrainingTask,
    train: ArrayDataset,
    state: Mapping[str, torch.Tensor],
) -> torch.nn.Module:
    import torch

    sample = _sample(train)
    with _step(report, "train"):
        model = task.build_model(seed=0)
        config = TrainConfig(local_epochs=1, lr=0.01, batch_size=len(sample), seed=0)
        metrics = task.train(model, sample, config)
        after = {k: v.detach() for k, v in model.state_dict().items()}
    why = _finite(metrics)
    if why is not None:
        _fail(report, "train", f"one step on {len(sample)} examples: train {why}")
    if {k: (v.shape, v.dtype) for k, v in after.items()} != {
        k: (v.shape, v.dtype) for k, v in state.items()
    }:
        _fail(report, "train", "the trained model's tensors differ from build_model's")
    bad = [k for k, v in after.items() if v.dtype.is_floating_point and not torch.isfinite(v).all()]
    if bad:
        _fail(report, "train", f"non-finite weights after one step: {', '.join(bad[:5])}")
    report.add(
        "train",
        Verdict.OK,
        f"one step on {len(sample)} examples: loss {metrics.loss:.4g}, "
        f"accuracy {metrics.accuracy:.3f}",
    )
    return model


def _check_evaluate(
    report: TaskReport, task: TrainingTask, model: torch.nn.Module, evaluation: ArrayDataset
) -> None:
    sample = _sample(evaluation)
    with _step(report, "evaluate"):
        metrics = task.evaluate(model, sample)
    why = _finite(metrics)
    if why is not None:
        _fail(report, "evaluate", f"on {len(sample)} examples: evaluate {why}")
    report.add(
        "evaluate",
        Verdict.OK,
        f"on {len(sample)} examples: loss {metrics.loss:.4g}, accuracy {metrics.accuracy:.3f}",
    )


def _check_safetensors(report: TaskReport, state: Mapping[str, torch.Tensor]) -> bytes:
    with _step(report, "safetensors"):
        body = codec.encode_model(state, version=0, seed=0)
        back = codec.decode(body)
    differs = _difference(dict(state), back)
    if differs is not None:
        _fail(report, "safetensors", f"the model does not round-trip: {differs}")
    parameters = sum(t.numel() for t in state.values())
    report.size = ModelSize(parameters=parameters, bytes=len(body))
    report.add(
        "safetensors",
        Verdict.OK,
        f"round-trips: {parameters:,} parameters, {len(body):,} bytes "
        f"({len(body) / 2**20:.1f} MiB): sfl_infra.model_bytes = {len(body)}",
    )
    return body
