"""The averager's front: what its Lambda handler dispatches to.

S3 ObjectCreated events (at least once, out of order, possibly concurrent) go to
``sfl.server.answers`` (judge, record, move the round on); the periodic tick to
``sfl.server.watchdog``. In buffered mode (``mode=buffered``, docs/buffered.md) they go to
``sfl.server.buffered_answers`` and ``sfl.server.buffered_watchdog`` instead. In rounds mode
both reach ``sfl.server.transitions`` (quorum, close, abandon), which
has ``sfl.server.aggregation`` write the next model. The front only wires them: the stores,
the shard invoker it is given, and who listens for a round's or a version's end (its cost, by
default; the handler adds scoring and the next round).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning.codec import Header, encode_model
from sfl.server import answers, buffered_answers, buffered_watchdog, watchdog
from sfl.server.answers import UpdateOutcome
from sfl.server.base_model import base_model
from sfl.server.context import (
    AveragerContext,
    ClosingListener,
    FinishedListener,
    PlaceFreedListener,
    VersionClosingListener,
    VersionListener,
)
from sfl.server.pricing import price_round, price_version
from sfl.server.watchdog import TickOutcome
from sfl.state.aws import AwsClients
from sfl.state.model_store import ModelStore
from sfl.state.rounds import Round

if TYPE_CHECKING:
    import torch

    from sfl.server.notifications import UpdateEvent
    from sfl.server.shards import Invoker


class Averager:
    """The handler's dispatch target: an upload, or the tick, for one invocation."""

    def __init__(
        self,
        aws: AwsClients,
        names: ResourceNames,
        config: FederationConfig,
        *,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        invoke_shard: Invoker | None = None,
        on_round_closing: Sequence[ClosingListener] = (price_round,),
        on_round_finished: Sequence[FinishedListener] = (),
        on_version_closing: Sequence[VersionClosingListener] = (price_version,),
        on_version: Sequence[VersionListener] = (),
        on_place_freed: Sequence[PlaceFreedListener] = (),
    ) -> None:
        """``invoke_shard``: how a large round's shards are summed (``sfl.server.shards``;
        None: in this invocation). ``on_round_closing``: figures stored with a round's close
        (its cost). ``on_round_finished``: told of each round this averager finished.
        Buffered mode: ``on_version_closing``: figures stored with a buffer's close (its
        cost); ``on_version`` is told of each buffer it closed (its version written),
        ``on_place_freed`` of each ticket it ended."""
        self.context = AveragerContext.build(
            aws,
            names,
            config,
            clock=clock,
            owner=owner or uuid.uuid4().hex,
            invoke_shard=invoke_shard,
            on_closing=tuple(on_round_closing),
            on_finished=tuple(on_round_finished),
            on_version_closing=tuple(on_version_closing),
            on_version=tuple(on_version),
            on_place_freed=tuple(on_place_freed),
        )
        self.buffered = config.mode == "buffered"

    def handle_update(self, event: UpdateEvent) -> UpdateOutcome:
        if self.buffered:
            return buffered_answers.handle_update(self.context, event)
        return answers.handle_update(self.context, event)

    def tick(self) -> TickOutcome:
        if self.buffered:
            return buffered_watchdog.tick(self.context)
        return watchdog.tick(self.context)

    def round_config(self, round_: Round) -> FederationConfig:
        return self.context.round_config(round_)

    def base_header(self, version: int) -> Header:
        return self.context.models.header(version)

    def base_model(self, version: int) -> dict[str, torch.Tensor]:
        return base_model(self.context.models, version)


def bootstrap_model(
    aws: AwsClients, names: ResourceNames, state: dict[str, Any], *, seed: int
) -> bool:
    """Write global model version 0 unless it exists; True if this call wrote it."""
    body = encode_model(state, version=0, seed=seed)
    return ModelStore(aws.s3, names.models_bucket).put_model(0, body)
