"""What every step of the averager works with, built once per invocation by its front.

The stores, the configuration the function was deployed with, the clock, this invocation's
identity as an aggregation lease holder, how shards are summed, and who hears of a round's or
a version's end.
Judging (``answers``), moving rounds on (``transitions``), aggregating (``aggregation``) and
the watchdog (``watchdog``) take it as their first argument, so none reaches back to the front.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.state.aws import AwsClients
from sfl.state.buffers import Buffer, BufferStore
from sfl.state.control import ControlStore, round_config
from sfl.state.model_store import ModelStore
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Round, RoundStore

if TYPE_CHECKING:
    from sfl.server.shards import Invoker


@dataclass(frozen=True)
class Aggregated:
    """A model version written for a round, and the figures its close records."""

    version: int
    summary: dict[str, Any]
    finished_at: float
    stateful_rule: bool  # the rule keeps server state (it is written beside the version)


#: Hears of a round this invocation is closing, before the close is written, and returns the
#: figures it adds to the round's summary (stored with the close: the round's cost).
ClosingListener = Callable[[Round, Aggregated], Mapping[str, Any]]
#: Hears of a round this invocation finished, CLOSED or ABANDONED (scoring, the next round).
FinishedListener = Callable[[Round], None]
#: Buffered mode: hears of a buffer this invocation is closing, its version written, before
#: the close is written, and returns the figures it adds to the buffer's summary (its cost).
VersionClosingListener = Callable[["AveragerContext", Buffer, Mapping[str, Any]], Mapping[str, Any]]
#: Buffered mode: hears of a buffer this invocation closed, its version written (lineage).
VersionListener = Callable[[Buffer], None]
#: Buffered mode: hears of a ticket this invocation ended (answered or expired), so a training
#: place is free (the handler chains the initiator to fill it).
PlaceFreedListener = Callable[[int], None]


@dataclass(frozen=True)
class AveragerContext:
    """One invocation's stores, settings and listeners (``build`` makes the stores)."""

    s3: Any
    names: ResourceNames
    config: FederationConfig  # the deployed one; a round runs with ``round_config(round_)``
    rounds: RoundStore
    registry: ClientRegistry
    models: ModelStore
    buffers: BufferStore
    control: ControlStore  # the operator's pause (a DP budget spent pauses the experiment)
    clock: Callable[[], float] = time.time
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)  # as an aggregation lease holder
    invoke_shard: Invoker | None = None  # None: every round is aggregated in this invocation
    on_closing: tuple[ClosingListener, ...] = ()
    on_finished: tuple[FinishedListener, ...] = ()
    on_version_closing: tuple[VersionClosingListener, ...] = ()
    on_version: tuple[VersionListener, ...] = ()
    on_place_freed: tuple[PlaceFreedListener, ...] = ()

    @classmethod
    def build(
        cls, aws: AwsClients, names: ResourceNames, config: FederationConfig, **options: Any
    ) -> AveragerContext:
        """The stores over ``aws``'s clients for the deployed ``names``."""
        return cls(
            s3=aws.s3,
            names=names,
            config=config,
            rounds=RoundStore(aws.dynamodb, names.rounds_table),
            registry=ClientRegistry(aws.dynamodb, names.clients_table),
            models=ModelStore(aws.s3, names.models_bucket),
            buffers=BufferStore(aws.dynamodb, names.rounds_table),
            control=ControlStore(aws.dynamodb, names.rounds_table),
            **options,
        )

    def round_config(self, round_: Round) -> FederationConfig:
        """The configuration a round runs with: the one its record holds (``sfl.state.control``),
        or the one this function was deployed with for rounds that hold none."""
        return round_config(round_, self.config)
