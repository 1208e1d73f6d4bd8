"""Sharded aggregation: a round's updates summed in parallel shard invocations, one reduce.

Above ``aggregation_shard_above`` accepted updates, a rule whose input is the weighted mean
(FedAvg and the FedOpt family) does not read every update in one invocation: the averager
that holds the round's aggregation lease splits its sorted entries into contiguous shards of
``aggregation_shard_size``, invokes the shard function once per shard (synchronously, all at
once), and each shard writes its float64 partial sum to the models bucket under a key that
names the round, the shard and a digest of exactly what it sums. The averager then reduces
the partial sums in shard order and goes on as for an unsharded round (state, model, close:
each written once). Robust rules (median, trimmed mean, Krum) need every update's value of
a coordinate at once and stay in one invocation.

Exactly-once: a shard's key is a function of its inputs (round, base version, entries with
their ETags, weights and clip scales, all fixed once the round is AGGREGATING), and its sum
is deterministic (entry order, float64), so any two runs of a shard write the same bytes.
It is written with ``If-None-Match: *``: a duplicated or retried shard finds it written and
stops; a shard killed before writing left nothing, and its re-run writes it. The reduce
reads only these keys; a reduce retried after the model was written finds the model (and a
stateful rule's state) written once already, as the unsharded path does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.events import CONTROL_KEY
from sfl.learning.codec import Header, decode, encode, parse_header
from sfl.learning.rules.aggregation import AggregationError, FedAvg, PartialSum, PartialSums
from sfl.server.round_updates import Entry, RoundUpdates
from sfl.state.aws import error_code, is_not_found

if TYPE_CHECKING:
    from sfl.core.config import FederationConfig
    from sfl.core.resources import ResourceNames
    from sfl.learning.rules.aggregation import AggregationRule
    from sfl.state.rounds import Round

logger = logging.getLogger(__name__)

PARTIALS_PREFIX = layout.PARTIALS_PREFIX
SHARD_ACTION = "shard"
PARTIAL_FORMAT = "sfl-partial/1"
_DTYPES = {
    str(d): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class ShardFailed(RuntimeError):
    """A shard invocation failed; the aggregation is retried under its lease."""


@dataclass(frozen=True)
class Shard:
    """What one shard invocation sums: a contiguous run of the round's sorted entries."""

    experiment: str
    round: int
    base_version: int
    index: int
    entries: tuple[Entry, ...]
    in_flight: int = 4

    def digest(self) -> str:
        spec = [
            self.base_version,
            [[e.client, e.key, e.etag, e.weight, e.scale] for e in self.entries],
        ]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    @property
    def key(self) -> str:
        return (
            f"{PARTIALS_PREFIX}{self.experiment}/round-{self.round:06d}/"
            f"shard-{self.index:05d}-{self.digest()}.safetensors"
        )

    def to_event(self) -> dict[str, Any]:
        return {
            CONTROL_KEY: SHARD_ACTION,
            "experiment": self.experiment,
            "round": self.round,
            "base_version": self.base_version,
            "index": self.index,
            "in_flight": self.in_flight,
            "entries": [[e.client, e.key, e.etag, e.weight, e.scale] for e in self.entries],
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Shard:
        """The shard an event names (from our averager; still checked field by field)."""
        try:
            entries = tuple(
                Entry(str(c), str(k), str(t), float(w), float(s))
                for c, k, t, w, s in event["entries"]
            )
            return cls(
                experiment=str(event["experiment"]),
                round=int(event["round"]),
                base_version=int(event["base_version"]),
                index=int(event["index"]),
                entries=entries,
                in_flight=int(event.get("in_flight", 4)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a shard event: {e}") from e


def shardable(rule: AggregationRule) -> bool:
    """A rule that declares it sums in shards (its input is the weighted mean)."""
    return rule.abilities.sums_in_shards


def plan(
    experiment: str,
    round_number: int,
    base_version: int,
    entries: Sequence[Entry],
    size: int,
    in_flight: int = 4,
) -> list[Shard]:
    """Contiguous shards of at most ``size`` entries, in the entries' (sorted) order."""
    size = max(1, size)
    return [
        Shard(experiment, round_number, base_version, i, tuple(entries[at : at + size]), in_flight)
        for i, at in enumerate(range(0, len(entries), size))
    ]


# --- one shard (the shard function's work) ----------------------------------------------


def partial_exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if is_not_found(e) or error_code(e) in {"404", "NotFound"}:
            return False
        raise
    return True


def sum_shard(
    s3: Any,
    updates_bucket: str,
    models_bucket: str,
    base: Mapping[str, torch.Tensor],
    base_header: Header,
    shard: Shard,
) -> dict[str, Any]:
    """Sum one shard's updates and write the partial sum once; a no-op if it is written."""
    key = shard.key
    if partial_exists(s3, models_bucket, key):
        return {"key": key, "written": False}
    aggregator = FedAvg()
    with RoundUpdates(
        s3, updates_bucket, shard.entries, base, base_header, in_flight=shard.in_flight
    ) as updates:
        for tensors, weight in updates.stream():
            aggregator.add(tensors, weight)
        read, excluded = list(updates.read), dict(updates.excluded)
    partial = aggregator.partial()
    metadata = {
        "format": PARTIAL_FORMAT,
        "digest": shard.digest(),
        "weight": repr(partial.weight),
        "count": str(partial.count),
        "dtypes": json.dumps({n: str(d) for n, d in partial.dtypes.items()}),
        "read": json.dumps(read),
        "excluded": json.dumps(excluded),
    }
    body = encode(partial.sums, metadata)
    try:
        s3.put_object(Bucket=models_bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as e:
        if error_code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
            return {"key": key, "written": False}  # a duplicate run wrote the same sum
        raise
    return {"key": key, "written": True, "read": len(read)}


# --- the reduce (in the averager) ----------------------------------------------------------

Invoker = Callable[[Shard], Any]


class ShardedUpdates(PartialSums):
    """The ``UpdateSet`` a sharded round hands its rule: runs the shards, then offers their
    partial sums (``partial_sums``), in shard order; ``read`` and ``excluded`` as
    ``RoundUpdates`` has them."""

    def __init__(self, s3: Any, models_bucket: str, shards: Sequence[Shard], invoke: Invoker):
        self.s3 = s3
        self.models_bucket = models_bucket
        self.shards = list(shards)
        self.invoke = invoke
        self.read: list[str] = []
        self.excluded: dict[str, str] = {}

    def run_shards(self) -> None:
        """Every shard, all at once; returns when each has written its partial sum."""
        with ThreadPoolExecutor(max_workers=min(64, len(self.shards)) or 1) as pool:
            for shard, done in zip(
                self.shards, pool.map(self._invoke_checked, self.shards), strict=True
            ):
                if not done:
                    raise ShardFailed(f"shard {shard.index} wrote no partial sum")

    def _invoke_checked(self, shard: Shard) -> bool:
        self.invoke(shard)
        return partial_exists(self.s3, self.models_bucket, shard.key)

    def partial_sums(self) -> Iterator[PartialSum]:
        self.run_shards()
        self.read, self.excluded = [], {}
        for shard in self.shards:
            obj = self.s3.get_object(Bucket=self.models_bucket, Key=shard.key)
            body = obj["Body"].read()
            meta = parse_header(body).metadata
            if meta.get("format") != PARTIAL_FORMAT or meta.get("digest") != shard.digest():
                raise AggregationError(f"{shard.key} is not this shard's partial sum")
            self.read.extend(json.loads(meta["read"]))
            self.excluded.update(json.loads(meta["excluded"]))
            dtypes = {n: _DTYPES[d] for n, d in json.loads(meta["dtypes"]).items()}
            yield PartialSum(decode(body), float(meta["weight"]), int(meta["count"]), dtypes)

    def stream(self, indices: Sequence[int] | None = None) -> Iterator[Any]:
        raise AggregationError("a sharded round offers partial sums only (FedAvg, FedOpt)")

    def chunks(self, max_elements: int = 0) -> Iterator[Any]:
        raise AggregationError("a sharded round offers partial sums only (FedAvg, FedOpt)")

    def weights(self) -> list[float]:
        raise AggregationError("a sharded round offers partial sums only (FedAvg, FedOpt)")

    def clients(self) -> list[str]:
        raise AggregationError("a sharded round offers partial sums only (FedAvg, FedOpt)")

    def close(self) -> None:
        """Partial sums stay: a retried reduce reads them (a lifecycle rule expires them)."""

    def __enter__(self) -> ShardedUpdates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sharded_updates(
    s3: Any,
    names: ResourceNames,
    round_: Round,
    rule: AggregationRule,
    entries: Sequence[Entry],
    config: FederationConfig,
    invoke: Invoker | None,
) -> ShardedUpdates | None:
    """The round's updates as shards, if it is to be sharded (else None: read them here).

    ``invoke``: how a shard is summed, given by the handler (None: no shard function)."""
    above = config.aggregation_shard_above
    if not (above > 0 and len(entries) > above and shardable(rule)):
        return None
    if invoke is None:
        logger.warning("aggregation_shard_above is set but no shard function is deployed")
        return None
    shards = plan(
        round_.experiment,
        round_.round,
        round_.base_version,
        entries,
        config.aggregation_shard_size,
        config.aggregation_in_flight,
    )
    return ShardedUpdates(s3, names.models_bucket, shards, invoke)


# --- invoking the shard function --------------------------------------------------------


def lambda_invoker(function: str) -> Invoker:
    """The deployed shard function, invoked synchronously (the averager's handler passes it;
    local mode passes its in-process call, ``sfl.local.lambdas``)."""
    import boto3
    from botocore.config import Config

    # A shard may run for minutes: wait for it; a timed-out call retried once is a duplicate
    # shard, which finds its partial sum written.
    config = Config(
        read_timeout=900, connect_timeout=10, retries={"max_attempts": 2, "mode": "standard"}
    )
    client = boto3.client("lambda", config=config)

    def invoke(shard: Shard) -> Any:
        response = client.invoke(
            FunctionName=function,
            InvocationType="RequestResponse",
            Payload=json.dumps(shard.to_event()).encode(),
        )
        payload = response["Payload"].read()
        if response.get("FunctionError"):
            raise ShardFailed(f"shard {shard.index}: {payload[:500]!r}")
        return json.loads(payload or b"null")

    return invoke
