"""The training-task contract: what a user customises (model, data, training, evaluation).

A task says what model is trained (``build_model``), what data a client holds
(``load_client_data``, from the device's data directory, in the task's own layout), how a
client trains (``train``) and how a model is scored (``evaluate``). Tasks are chosen by name
(``digits``, ``mnist``, ``image_folder``, ``tabular``) or by import path
(``my_package.tasks:MyTask``), with parameters; see ``sfl.learning.tasks``.

Optional: ``write_client_data(data_dir, data)`` writes one client's share in the layout
``load_client_data`` reads (class folders of images, a CSV), so a simulated device reads
what a real one holds; without it, simulation writes ``data_dir / CLIENT_DATA_FILE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

CLIENT_DATA_FILE = "data.safetensors"


class ClientDataError(ValueError):
    """A client's data is missing, unreadable or not what the task expects."""


class NoClientDataError(ClientDataError):
    """A client's data directory is missing or holds no examples."""


@dataclass(frozen=True)
class TrainConfig:
    """What the round's assignment tells a client about local training."""

    local_epochs: int
    lr: float
    batch_size: int
    seed: int = 0
    # FedProx: add mu/2 * ||w - w_base||^2 to the loss (0: plain local training).
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class ArrayDataset:
    """Features and integer labels as numpy arrays (x: float32 [N, ...], y: int64 [N])."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ClientData:
    """One client's private data: a training split and a local evaluation split."""

    train: ArrayDataset
    eval: ArrayDataset


@dataclass(frozen=True)
class CentralData:
    """The whole dataset: the pool that is partitioned among clients, and a held-out test split."""

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int


ShouldStop = Callable[[], bool]


@runtime_checkable
class TrainingTask(Protocol):
    name: str

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        """A freshly initialised model; the same seed gives the same weights."""
        ...

    def load_central_data(self) -> CentralData:
        """The full dataset, from local files or a package (never a download)."""
        ...

    def load_client_data(self, data_dir: Path) -> ClientData:
        """A client's data from its data directory, read afresh on every call (a device's
        data grows between rounds); ``ClientDataError`` when it is missing or bad."""
        ...

    def train(
        self,
        model: torch.nn.Module,
        data: ArrayDataset,
        config: TrainConfig,
        should_stop: ShouldStop = lambda: False,
    ) -> Metrics:
        """Train in place; ``should_stop`` is checked between minibatches (SIGTERM)."""
        ...

    def evaluate(self, model: torch.nn.Module, data: ArrayDataset) -> Metrics: ...
