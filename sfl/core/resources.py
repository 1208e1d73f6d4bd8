"""The stack's stateful resources, defined once.

The CDK constructs build their tables and buckets from these specs, the local mode creates
the same tables and buckets in the emulator from them, and the Lambdas and clients find the
deployed names through ``ResourceNames`` (environment variables or flags), never hard-coded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sfl.core import layout


@dataclass(frozen=True)
class KeyAttribute:
    name: str
    type: str  # "S" | "N"


@dataclass(frozen=True)
class IndexSpec:
    """A global secondary index; ``projected`` non-key attributes (INCLUDE), or all if None."""

    name: str
    partition_key: KeyAttribute
    sort_key: KeyAttribute | None = None
    projected: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TableSpec:
    logical_id: str
    partition_key: KeyAttribute
    sort_key: KeyAttribute | None = None
    ttl_attribute: str | None = None
    indexes: tuple[IndexSpec, ...] = ()


@dataclass(frozen=True)
class BucketSpec:
    logical_id: str
    versioned: bool
    notify_prefix: str | None = None
    notify_suffix: str | None = None
    # Encrypted with a customer-managed KMS key of its own (the stack's key policy says who
    # may encrypt and decrypt; local mode mirrors the bucket's default encryption).
    own_key: bool = False


# Selection reads active clients from this index, never the whole registry: a heartbeat
# writes its client's shard (a hash of its id, 0..ACTIVE_SHARDS-1) beside last_seen, and
# the initiator queries each shard for last_seen >= now - window (sfl.state.registry). Only what
# selection reads is projected.
ACTIVE_SHARDS = 8
ACTIVE_INDEX = IndexSpec(
    name="active",
    partition_key=KeyAttribute("active_shard", "N"),
    sort_key=KeyAttribute("last_seen", "N"),
    projected=(
        "registered_at",
        "ewma_turnaround",
        "rounds_answered",
        "rounds_missed",
        "missed_streak",
        "miss_history",
        "last_round",
        "utility",
        "recent_picks",
    ),
)
# Client registry: one item per client; heartbeats refresh last_seen and push expires_at.
CLIENTS_TABLE = TableSpec(
    logical_id="ClientsTable",
    partition_key=KeyAttribute("client_id", "S"),
    ttl_attribute="expires_at",
    indexes=(ACTIVE_INDEX,),
)
# Round records: one item per (experiment, round); the newest round is a reverse query.
# The same table holds each round's slots (one item per selected client, under the partition
# ``<experiment>#slots#<round>``, sfl.state.rounds), which expire through expires_at; round
# records and control items have no expires_at and stay.
ROUNDS_TABLE = TableSpec(
    logical_id="RoundsTable",
    partition_key=KeyAttribute("experiment", "S"),
    sort_key=KeyAttribute("round", "N"),
    ttl_attribute="expires_at",
)
TABLES = (CLIENTS_TABLE, ROUNDS_TABLE)

MODELS_BUCKET = BucketSpec(logical_id="ModelsBucket", versioned=True)
UPDATES_BUCKET = BucketSpec(
    logical_id="UpdatesBucket",
    versioned=False,
    notify_prefix=layout.UPDATES_PREFIX,
    notify_suffix=layout.UPDATE_SUFFIX,
    own_key=True,
)
BUCKETS = (MODELS_BUCKET, UPDATES_BUCKET)


@dataclass(frozen=True)
class ResourceNames:
    """Deployed names of the buckets and tables (they differ per stack and per account)."""

    models_bucket: str
    updates_bucket: str
    clients_table: str
    rounds_table: str

    ENV = {
        "models_bucket": "SFL_MODELS_BUCKET",
        "updates_bucket": "SFL_UPDATES_BUCKET",
        "clients_table": "SFL_CLIENTS_TABLE",
        "rounds_table": "SFL_ROUNDS_TABLE",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ResourceNames:
        env = os.environ if env is None else env
        missing = [var for var in cls.ENV.values() if not env.get(var)]
        if missing:
            raise KeyError(f"environment variable(s) not set: {', '.join(missing)}")
        return cls(**{attr: env[var] for attr, var in cls.ENV.items()})

    def to_env(self) -> dict[str, str]:
        return {var: getattr(self, attr) for attr, var in self.ENV.items()}


def create_table_request(spec: TableSpec, table_name: str) -> dict[str, Any]:
    """The DynamoDB CreateTable request for a spec (on-demand billing, as deployed)."""
    keys = _key_schema(spec.partition_key, spec.sort_key)
    attributes = {k.name: k.type for k, _ in keys}
    request: dict[str, Any] = {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "KeySchema": [{"AttributeName": k.name, "KeyType": kind} for k, kind in keys],
    }
    indexes = []
    for index in spec.indexes:
        index_keys = _key_schema(index.partition_key, index.sort_key)
        attributes.update({k.name: k.type for k, _ in index_keys})
        projection: dict[str, Any] = {"ProjectionType": "ALL"}
        if index.projected is not None:
            projection = {
                "ProjectionType": "INCLUDE",
                "NonKeyAttributes": list(index.projected),
            }
        indexes.append(
            {
                "IndexName": index.name,
                "KeySchema": [{"AttributeName": k.name, "KeyType": kind} for k, kind in index_keys],
                "Projection": projection,
            }
        )
    request["AttributeDefinitions"] = [
        {"AttributeName": name, "AttributeType": kind} for name, kind in attributes.items()
    ]
    if indexes:
        request["GlobalSecondaryIndexes"] = indexes
    return request


def _key_schema(
    partition: KeyAttribute, sort: KeyAttribute | None
) -> list[tuple[KeyAttribute, str]]:
    keys = [(partition, "HASH")]
    if sort is not None:
        keys.append((sort, "RANGE"))
    return keys
