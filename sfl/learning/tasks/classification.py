"""What every image-classification task shares: SGD training, scoring and reading client files.

A concrete task names itself, says its input shape and class count, builds a fresh model
(``new_model``) and loads its whole dataset (``load_central_data``); the rest is here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file
from torch import nn

from sfl.learning.tasks.base import (
    CLIENT_DATA_FILE,
    ArrayDataset,
    CentralData,
    ClientData,
    ClientDataError,
    Metrics,
    NoClientDataError,
    ShouldStop,
    TrainConfig,
)

SGD_MOMENTUM = 0.9
EVAL_BATCH_SIZE = 1024
CLIENT_TENSORS = ("x_train", "y_train", "x_eval", "y_eval")


__all__ = ["ClassificationTask", "ClientDataError", "NoClientDataError", "proximal_term"]


class ClassificationTask(ABC):
    """Cross-entropy classification of float32 inputs into ``num_classes`` integer labels."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    #: Smaller minibatches are skipped in training (BatchNorm cannot train on one example).
    min_batch: int = 1

    @abstractmethod
    def new_model(self) -> nn.Module:
        """A model with torch's default initialisation; ``build_model`` seeds it."""

    @abstractmethod
    def load_central_data(self) -> CentralData:
        """The full dataset, from local files or a package (never a download)."""

    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh model whose weights depend on ``seed`` alone; torch's global RNG is kept."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.new_model()

    def load_client_data(self, data_dir: Path) -> ClientData:
        """Read ``data_dir / CLIENT_DATA_FILE`` (written by ``sfl.learning.splits``); check it."""
        path = Path(data_dir) / CLIENT_DATA_FILE
        if not path.is_file():
            raise NoClientDataError(
                f"client data file {path} does not exist; write it with `sfl split-dataset`"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ClientDataError(f"client data file {path} is not a safetensors file: {e}") from e
        missing = [k for k in CLIENT_TENSORS if k not in tensors]
        if missing:
            raise ClientDataError(
                f"client data file {path} lacks tensor(s) {', '.join(missing)}; "
                f"expected {', '.join(CLIENT_TENSORS)}"
            )
        return ClientData(
            train=self._dataset(path, "train", tensors["x_train"], tensors["y_train"]),
            eval=self._dataset(path, "eval", tensors["x_eval"], tensors["y_eval"]),
        )

    def train(
        self,
        model: nn.Module,
        data: ArrayDataset,
        config: TrainConfig,
        should_stop: ShouldStop = lambda: False,
    ) -> Metrics:
        """SGD with momentum over shuffled minibatches; stops early once ``should_stop()``.

        Loss and accuracy are averaged over every example trained on in this call. If it
        stopped before the first minibatch, ``num_examples`` is 0 (and loss, accuracy 0).
        """
        x, y = _tensors(model, data)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=SGD_MOMENTUM)
        anchor = [p.detach().clone() for p in model.parameters()]
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(config.seed)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(config.local_epochs):
            order = torch.randperm(len(y), generator=generator).to(y.device)
            for start in range(0, len(y), config.batch_size):
                if should_stop():
                    return _metrics(loss_sum, correct, seen, len(y))
                batch = order[start : start + config.batch_size]
                if len(batch) < self.min_batch:
                    continue
                logits = model(x[batch])
                loss = loss_fn(logits, y[batch])
                objective = loss
                if config.proximal_mu > 0:
                    objective = loss + proximal_term(model, anchor, config.proximal_mu)
                optimizer.zero_grad()
                objective.backward()
                optimizer.step()
                loss_sum += loss.item() * len(batch)
                correct += int((logits.argmax(dim=1) == y[batch]).sum().item())
                seen += len(batch)
        return _metrics(loss_sum, correct, seen, len(y))

    def evaluate(self, model: nn.Module, data: ArrayDataset) -> Metrics:
        """Mean cross-entropy and accuracy over ``data``; all zero for an empty dataset."""
        x, y = _tensors(model, data)
        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(y), EVAL_BATCH_SIZE):
                logits = model(x[start : start + EVAL_BATCH_SIZE])
                target = y[start : start + EVAL_BATCH_SIZE]
                loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == target).sum().item())
        return _metrics(loss_sum, correct, len(y), len(y))

    def _dataset(self, path: Path, split: str, x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        where = f"client data file {path}, {split} split"
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ClientDataError(
                f"{where}: x_{split} has shape {x.shape}; task {self.name!r} expects "
                f"[N, {', '.join(map(str, self.input_shape))}]"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise ClientDataError(
                f"{where}: y_{split} has shape {y.shape}; expected [{len(x)}] to match x_{split}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ClientDataError(f"{where}: y_{split} has dtype {y.dtype}; expected integers")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ClientDataError(
                f"{where}: labels range from {y.min()} to {y.max()}; task {self.name!r} "
                f"has classes 0 to {self.num_classes - 1}"
            )
        return ArrayDataset(x=x.astype(np.float32, copy=False), y=y.astype(np.int64, copy=False))


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term, mu/2 * ||w - w_base||^2 over the trainable parameters: it
    keeps a client's model near the round's base model on skewed data."""
    squared = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
    return (mu / 2) * torch.as_tensor(squared)


def _tensors(model: nn.Module, data: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(data.y, dtype=np.int64)).to(device)
    return x, y


def _metrics(loss_sum: float, correct: int, seen: int, size: int) -> Metrics:
    if seen == 0:
        return Metrics(loss=0.0, accuracy=0.0, num_examples=0)
    return Metrics(loss=loss_sum / seen, accuracy=correct / seen, num_examples=size)
