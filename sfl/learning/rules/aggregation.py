"""How a round's accepted updates become the next model: the rule contract, and FedAvg.

A rule owns its identity. Its class declares its ``name``, its parameters (``Params``: a
torch-free, keyword-only dataclass, ``sfl.core.params.RuleParams``) and its ``abilities``
(``Abilities``: keeps server state, sums in shards, reads all updates at once); it is built
from its parameters (``aggregation_params``) and reports what it did in ``Aggregate.details``.
A built-in registers with one line in ``sfl.core.params.RULES``; a user's rule is one module
named by its import path ``package.module:Rule``. The averager asks a rule's abilities, never
its class.

``aggregate`` sees the base model, the round's updates and the server state the rule left
beside the base model, and returns the next model and the state to keep beside it. Updates
reach a rule through an ``UpdateSet``, already bounded (weight capped, change clipped) by the
averager, in one of two shapes:

- ``stream()``: one whole update at a time, for rules that fold updates into a running sum
  (FedAvg and the server optimisers): memory does not grow with the number of updates.
- ``chunks()``: the same rows of one tensor from every update at once, for rules that look
  at all values of a coordinate (median, trimmed mean, Krum's distances): memory is bounded
  by ``CHUNK_ELEMENTS`` whatever the number of updates.

A rule that sums in shards may instead be handed ``PartialSums``: the updates already summed
in parallel (``sfl.server.shards``), to be added up.

The arithmetic is pure functions over tensors; fetching updates is the averager's. Sums are
kept in float64 so that the order of updates does not change the result beyond the output
dtype's rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from sfl.core import params as rule_params
from sfl.core import plugins
from sfl.core.params import NoParams, RuleParams

# At most this many float64 values of a tensor chunk, across all updates, are in memory at
# once (16 MiB; sorting a chunk needs about three times that), unless one row of one tensor
# is larger than that share.
CHUNK_ELEMENTS = 2 * 1024 * 1024
# A running sum widens an update to float64 this many values at a time, in cache, instead of
# copying a whole tensor to float64 first (twice its size in memory, and a pass over it).
ACCUMULATE_BLOCK = 64 * 1024

State = Mapping[str, torch.Tensor]


class AggregationError(ValueError):
    """Updates cannot be combined (different tensor names or shapes, or bad weights)."""


@dataclass(frozen=True)
class Chunk:
    """Rows ``rows`` of tensor ``name`` (seen ``as_rows``) from every update: ``values[i]``
    is update i's."""

    name: str
    rows: slice
    values: torch.Tensor  # float64, shape (n_updates, *rows of the tensor)


class UpdateSet(Protocol):
    """A round's readable updates, bounded and in a fixed order."""

    def stream(
        self, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[Mapping[str, torch.Tensor], float]]:
        """(tensors, weight) of each update (or of those at ``indices``), one at a time."""
        ...

    def chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Chunk]:
        """Every tensor of every update, a few rows at a time (indices are stable)."""
        ...

    def weights(self) -> list[float]:
        """The bounded weight of each update that ``chunks`` yields, in its order."""
        ...

    def clients(self) -> list[str]:
        """The client id of each update that ``chunks`` yields, in its order: how a rule
        names the updates it reports on (``Aggregate.details``)."""
        ...


@dataclass(frozen=True)
class PartialSum:
    """FedAvg's running state over some updates: float64 weighted sums, their total weight,
    how many updates, and each tensor's dtype in the model."""

    sums: dict[str, torch.Tensor]
    weight: float
    count: int
    dtypes: dict[str, torch.dtype]


@runtime_checkable
class PartialSums(Protocol):
    """Updates already summed elsewhere (``sfl.server.shards``): handed only to a rule whose
    abilities say it ``sums_in_shards``, which adds the partial sums up."""

    def partial_sums(self) -> Iterator[PartialSum]:
        """Each shard's partial sum, in shard order."""
        ...


@dataclass(frozen=True)
class Aggregate:
    """The next model, and the server state a stateful rule keeps beside it."""

    model: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None = None
    # What the rule did, for the round's summary, naming clients by id (e.g. whom Krum kept).
    details: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Abilities:
    """What a rule asks of the averager and offers it; the averager decides by these."""

    stateful: bool = False
    """Keeps server state beside each model version; ``model_from_state`` remakes the model."""
    sums_in_shards: bool = False
    """Its input is the weighted mean of the updates, so shards' partial sums add up to it."""
    reads_all_at_once: bool = False
    """Reads every update's values of a coordinate at once (``chunks``): one invocation, its
    client cap the averager's disk (docs/strategies.md)."""

    def __post_init__(self) -> None:
        if self.sums_in_shards and self.reads_all_at_once:
            raise ValueError("a rule that reads all updates at once cannot sum in shards")


@runtime_checkable
class AggregationRule(Protocol):
    """The rule contract: identity (name, parameters, abilities) and the maths."""

    name: ClassVar[str]
    Params: ClassVar[type[RuleParams]]
    abilities: ClassVar[Abilities]
    params: RuleParams

    @property
    def stateful(self) -> bool: ...

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: UpdateSet, state: State | None
    ) -> Aggregate | None: ...

    def model_from_state(
        self, base: Mapping[str, torch.Tensor], state: State
    ) -> dict[str, torch.Tensor]: ...


class Rule:
    """What every rule shares: built from its parameters (keywords), checked by ``Params``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[RuleParams]] = NoParams
    abilities: ClassVar[Abilities] = Abilities()
    params: RuleParams

    def __init__(self, **given: Any) -> None:
        try:
            self.params = self.Params.from_mapping(self.name, given)
        except rule_params.ParamsError as e:
            raise AggregationError(str(e)) from e

    @property
    def stateful(self) -> bool:
        return self.abilities.stateful

    def model_from_state(
        self, base: Mapping[str, torch.Tensor], state: State
    ) -> dict[str, torch.Tensor]:
        raise AggregationError(f"aggregation {self.name!r} keeps no server state")


class FedAvg(Rule):
    """Weighted mean of updates; weights are the clients' bounded example counts.

    Also usable on its own as a running sum: ``add`` one update at a time, then ``result``.
    """

    name = "fedavg"
    abilities = Abilities(sums_in_shards=True)

    def __init__(self, **given: Any) -> None:
        super().__init__(**given)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._total_weight = 0.0
        self.count = 0

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: UpdateSet, state: State | None
    ) -> Aggregate | None:
        self.reset()
        if isinstance(updates, PartialSums):  # summed in shards: add their sums
            for partial in updates.partial_sums():
                self.add_partial(partial)
        else:
            for tensors, weight in updates.stream():
                self.add(tensors, weight)
        result = self.result()
        return None if result is None else Aggregate(model=result)

    def partial(self) -> PartialSum:
        """The running sum so far, to be added to others' (a shard of a sharded round)."""
        return PartialSum(dict(self._sums), self._total_weight, self.count, dict(self._dtypes))

    def add_partial(self, partial: PartialSum) -> None:
        """Add another running sum (in shard order: the result depends on the order only
        through float64 rounding)."""
        if not partial.count:
            return
        if self._sums:
            _check_like(partial.sums, self._sums)
            for name, t in partial.sums.items():
                self._sums[name].add_(t.to(torch.float64))
        else:
            self._dtypes = dict(partial.dtypes)
            self._sums = {n: t.to(torch.float64).clone() for n, t in partial.sums.items()}
        self._total_weight += partial.weight
        self.count += partial.count

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not weight > 0:
            raise AggregationError(f"update weight must be > 0, got {weight!r}")
        if self._sums:
            _check_like(tensors, self._sums)
        else:
            for name, t in tensors.items():
                self._dtypes[name] = t.dtype
                self._sums[name] = torch.zeros(t.shape, dtype=torch.float64)
        for name, t in tensors.items():
            accumulate(self._sums[name], t, weight)
        self._total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor] | None:
        if not self.count:
            return None
        return {
            name: cast_like(total / self._total_weight, self._dtypes[name])
            for name, total in self._sums.items()
        }


def accumulate(total: torch.Tensor, t: torch.Tensor, weight: float) -> None:
    """``total += weight * t`` with ``total`` float64 and contiguous, a block at a time: the
    same float64 arithmetic as widening ``t`` first, without a float64 copy of ``t``."""
    if not t.dtype.is_floating_point:
        total.add_(t.to(torch.float64), alpha=weight)
        return
    flat_total = total.view(-1)
    flat = t.reshape(-1)
    for first in range(0, flat.numel(), ACCUMULATE_BLOCK):
        last = first + ACCUMULATE_BLOCK
        flat_total[first:last].add_(flat[first:last], alpha=weight)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor seen as rows along its first dimension (a 0-d tensor as one row); a view."""
    return t.reshape(1) if t.dim() == 0 else t


def row_slices(shape: Sequence[int], updates: int, max_elements: int) -> Iterator[slice]:
    """Slices of a tensor's rows (``as_rows``) such that ``updates`` copies of one slice hold
    at most ``max_elements`` values, and at least one row."""
    rows = shape[0] if len(shape) else 1
    per_row = math.prod(shape[1:]) if len(shape) else 1
    step = max(1, max_elements // max(1, updates * per_row))
    for first in range(0, rows, step):
        yield slice(first, min(first + step, rows))


class ListUpdates:
    """An ``UpdateSet`` over updates already in memory (tests, benchmarks, references)."""

    def __init__(
        self,
        updates: Sequence[tuple[Mapping[str, torch.Tensor], float]],
        clients: Sequence[str] | None = None,
    ) -> None:
        self.updates = list(updates)
        self.ids = [str(i) for i in range(len(self.updates))] if clients is None else list(clients)
        if len(self.ids) != len(self.updates):
            raise ValueError(f"{len(self.updates)} updates but {len(self.ids)} client ids")

    def stream(
        self, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[Mapping[str, torch.Tensor], float]]:
        chosen = range(len(self.updates)) if indices is None else indices
        for i in chosen:
            yield self.updates[i]

    def chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Chunk]:
        if not self.updates:
            return
        for name, first in self.updates[0][0].items():
            for rows in row_slices(first.shape, len(self.updates), max_elements):
                values = torch.stack(
                    [as_rows(u[name])[rows].to(torch.float64) for u, _ in self.updates]
                )
                yield Chunk(name, rows, values)

    def weights(self) -> list[float]:
        return [w for _, w in self.updates]

    def clients(self) -> list[str]:
        return list(self.ids)


def fedavg(
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor] | None:
    """FedAvg over (tensors, weight) pairs, consumed one at a time; None if there are none."""
    aggregator = FedAvg()
    for tensors, weight in updates:
        aggregator.add(tensors, weight)
    return aggregator.result()


def cast_like(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 result in the model's dtype (integers rounded, not truncated)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        value = value.round()
    return value.to(dtype).contiguous()


def _check_like(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    if set(tensors) != set(reference):
        raise AggregationError(
            "update tensor names differ from the first update's: "
            f"{sorted(set(tensors) ^ set(reference))}"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(reference[name].shape):
            raise AggregationError(
                f"tensor {name!r} has shape {tuple(t.shape)}, "
                f"expected {tuple(reference[name].shape)}"
            )


def get_aggregator(name: str) -> Callable[..., AggregationRule]:
    """The rule class ``name`` stands for (registered, or an import path ``module:Rule``);
    call it with the rule's parameters."""
    result: Callable[..., AggregationRule] = plugins.load("aggregation", name)
    return result


def build_rule(name: str, params_json: str = "{}") -> AggregationRule:
    """The configured rule, built with its parameters from ``aggregation_params``."""
    try:
        given = rule_params.parse(params_json)
    except rule_params.ParamsError as e:
        raise AggregationError(str(e)) from e
    rule = get_aggregator(name)(**given)
    if not isinstance(rule, AggregationRule):
        raise AggregationError(
            f"aggregation {name!r} made a {type(rule).__name__}, which is not an aggregation "
            "rule (needs name, Params, abilities, params, aggregate, model_from_state)"
        )
    return rule
