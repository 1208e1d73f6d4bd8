"""Hostile devices for ``sfl simulate --attackers K --attack NAME``.

An attacker is a real ``EdgeClient`` with valid credentials, uploading through the same path
as everyone else; only its training task is wrapped, so what it sends is exactly what a
modified device could send. The attacks are the ones a single device could use to decide
the model if the server trusted it:

- ``scale``: its change from the base model, times 1000
- ``sign_flip``: its change reversed and times 10
- ``free_rider``: the base model back, untrained
- ``inflate_examples``: an honest update claiming 10,000,000 training examples
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfl.tasks.base import ArrayDataset, ClientData, Metrics, ShouldStop, TrainConfig, TrainingTask

if TYPE_CHECKING:
    import torch

ATTACKS = ("scale", "sign_flip", "free_rider", "inflate_examples")
INFLATED_EXAMPLES = 10_000_000


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        return self.inner.build_model(seed)

    def load_client_data(self, data_dir: Path) -> ClientData:
        data = self.inner.load_client_data(data_dir)
        if self.attack == "inflate_examples":
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
        metrics = self.inner.train(model, honest, config, should_stop)
        factor = {"scale": 1000.0, "sign_flip": -10.0}.get(self.attack)
        if factor is not None:
            with torch.no_grad():
                for name, value in model.state_dict().items():
                    if value.dtype.is_floating_point:
                        value.copy_(base[name] + factor * (value - base[name]))
        return metrics
