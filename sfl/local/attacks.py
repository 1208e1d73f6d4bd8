"""Hostile devices for ``sfl simulate --attackers K --attack NAME``.

An attacker is a real ``EdgeClient`` with valid credentials, uploading through the same path
as everyone else; only its training task is wrapped, so what it sends is exactly what a
modified device could send. The attacks are the ones a single device could use to decide
the model if the server trusted it:

- ``scale``: its change from the base model, times 1000
- ``sign_flip``: its change reversed and times 10
- ``free_rider``: the base model back, untrained
- ``inflate_examples``: an honest update claiming 10,000,000 training examples
- ``gaussian``: the base model plus Gaussian noise (std 1 per coordinate), no training
- ``alie``: "A Little Is Enough" (Baruch et al. 2019), without omniscience: the attacker
  trains on three random halves of its data and sends their mean change minus
  ``ALIE_Z`` times their per-coordinate spread, a shift small enough to look typical
- ``stale``: an honest update, always trained from the first model the attacker saw
- ``steer``: ``sign_flip`` while claiming 10,000,000 examples: one device at both bounds
  (the largest weight and the largest change the round allows), against the honest direction
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfl.learning.tasks.base import (
    ArrayDataset,
    ClientData,
    Metrics,
    ShouldStop,
    TrainConfig,
    TrainingTask,
)

if TYPE_CHECKING:
    import torch

ATTACKS = (
    "scale",
    "sign_flip",
    "free_rider",
    "inflate_examples",
    "gaussian",
    "alie",
    "stale",
    "steer",
)
INFLATED_EXAMPLES = 10_000_000
GAUSSIAN_STD = 1.0
ALIE_Z = 1.5
ALIE_SPLITS = 3


class InflatedDataset(ArrayDataset):
    """The attacker's real data, reporting a made-up size (its claimed ``num_examples``)."""

    def __len__(self) -> int:
        return INFLATED_EXAMPLES


class HostileTask:
    """A task whose ``train`` turns an honest local update into an attack."""

    def __init__(self, inner: TrainingTask, attack: str) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"--attack {attack!r}: allowed: {', '.join(ATTACKS)}")
        self.inner = inner
        self.attack = attack
        self.name = inner.name
        self._first_model: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        return self.inner.build_model(seed)

    def load_client_data(self, data_dir: Path) -> ClientData:
        data = self.inner.load_client_data(data_dir)
        if self.attack in ("inflate_examples", "steer"):
            return ClientData(train=InflatedDataset(data.train.x, data.train.y), eval=data.eval)
        return data

    def evaluate(self, model: torch.nn.Module, data: ArrayDataset) -> Metrics:
        return self.inner.evaluate(model, data)

    def train(
        self,
        model: torch.nn.Module,
        data: ArrayDataset,
        config: TrainConfig,
        should_stop: ShouldStop = lambda: False,
    ) -> Metrics:
        import torch

        honest = ArrayDataset(data.x, data.y)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.attack == "free_rider":
            return Metrics(loss=0.0, accuracy=1.0, num_examples=len(honest))
        if self.attack == "gaussian":
            generator = torch.Generator().manual_seed(config.seed)
            with torch.no_grad():
                for value in model.state_dict().values():
                    if value.dtype.is_floating_point:
                        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
                        value.add_(GAUSSIAN_STD * noise)
            return Metrics(loss=0.0, accuracy=1.0, num_examples=len(honest))
        if self.attack == "alie":
            return self._little_is_enough(model, honest, config, should_stop, base)
        if self.attack == "stale":
            with self._lock:
                if self._first_model is None:
                    self._first_model = base
                first = self._first_model
            model.load_state_dict(first)
        metrics = self.inner.train(model, honest, config, should_stop)
        factor = {"scale": 1000.0, "sign_flip": -10.0, "steer": -10.0}.get(self.attack)
        if factor is not None:
            with torch.no_grad():
                for name, value in model.state_dict().items():
                    if value.dtype.is_floating_point:
                        value.copy_(base[name] + factor * (value - base[name]))
        return metrics

    def _little_is_enough(
        self,
        model: torch.nn.Module,
        data: ArrayDataset,
        config: TrainConfig,
        should_stop: ShouldStop,
        base: dict[str, torch.Tensor],
    ) -> Metrics:
        """Mean change minus ``ALIE_Z`` spreads, both estimated from honest training on
        random halves of the attacker's own data."""
        import numpy as np
        import torch

        rng = np.random.default_rng(config.seed)
        changes: list[dict[str, torch.Tensor]] = []
        metrics = Metrics(loss=0.0, accuracy=0.0, num_examples=len(data))
        for _ in range(ALIE_SPLITS):
            model.load_state_dict(base)
            half = rng.permutation(len(data))[: max(1, len(data) // 2)]
            metrics = self.inner.train(
                model, ArrayDataset(data.x[half], data.y[half]), config, should_stop
            )
            changes.append({k: v.detach() - base[k] for k, v in model.state_dict().items()})
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if not value.dtype.is_floating_point:
                    continue
                stacked = torch.stack([c[name] for c in changes])
                shift = stacked.mean(dim=0) - ALIE_Z * stacked.std(dim=0)
                value.copy_(base[name] + shift)
        return Metrics(metrics.loss, metrics.accuracy, len(data))
