"""Aggregation rules. FedAvg streams: one client update in memory at a time plus a sum.

The arithmetic is a pure function of tensors; fetching updates from S3 is the averager's.
Sums are kept in float64 so that the order of updates does not change the result beyond
the output dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch

from sfl import plugins


class AggregationError(ValueError):
    """Updates cannot be combined (different tensor names or shapes, or bad weights)."""


class StreamingAggregator(Protocol):
    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None: ...

    def result(self) -> dict[str, torch.Tensor] | None: ...


class FedAvg:
    """Weighted mean of updates; weights are the clients' example counts."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise AggregationError(f"update weight must be > 0, got {weight!r}")
        if self._sums:
            if set(tensors) != set(self._sums):
                raise AggregationError(
                    "update tensor names differ from the first update's: "
                    f"{sorted(set(tensors) ^ set(self._sums))}"
                )
            for name, t in tensors.items():
                if tuple(t.shape) != tuple(self._sums[name].shape):
                    raise AggregationError(
                        f"tensor {name!r} has shape {tuple(t.shape)}, "
                        f"expected {tuple(self._sums[name].shape)}"
                    )
            for name, t in tensors.items():
                self._sums[name].add_(t.to(torch.float64), alpha=weight)
        else:
            for name, t in tensors.items():
                self._dtypes[name] = t.dtype
                self._sums[name] = t.to(torch.float64) * weight
        self._total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor] | None:
        if not self.count:
            return None
        out: dict[str, torch.Tensor] = {}
        for name, total in self._sums.items():
            mean = total / self._total_weight
            dtype = self._dtypes[name]
            if not (dtype.is_floating_point or dtype.is_complex):
                mean = mean.round()
            out[name] = mean.to(dtype).contiguous()
        return out


def fedavg(
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor] | None:
    """FedAvg over (tensors, weight) pairs, consumed one at a time; None if there are none."""
    aggregator = FedAvg()
    for tensors, weight in updates:
        aggregator.add(tensors, weight)
    return aggregator.result()


def get_aggregator(name: str) -> Callable[[], StreamingAggregator]:
    result: Callable[[], StreamingAggregator] = plugins.load("aggregation", name)
    return result
