"""Where everything lives in the two buckets: the one definition of every key.

models bucket (versioned; every object version kept)
    models/global/v000000.safetensors   the global model, one key per version
    models/global/v000000.json          that version's lineage (round, parent, metrics)
    models/global/promoted.safetensors  the version promoted for inference (a copy)
    rounds/current.json                 the current assignment, polled by clients
    state/v000001.safetensors           a stateful rule's server state beside that version
                                        (optimiser moments; never readable by devices)
    state/v000001.privacy.json          a DP version's privacy record (clip, noise, epsilon)
    eval/heldout.safetensors            optional held-out evaluation set (x, y)
updates bucket
    updates/<client_id>/round-000001.safetensors   one update per client and round

Updates sit under a per-client prefix so a device's IAM policy can allow writes under
``updates/${credentials-iot:ThingName}/`` and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODELS_PREFIX = "models/global/"
ASSIGNMENT_KEY = "rounds/current.json"
# The most of an assignment anyone reads: 10,000 client ids of at most 128 characters are
# ~1.3 MB; devices and the initiator read up to 4 MB.
MAX_ASSIGNMENT_BYTES = 4 * 1024 * 1024
STATE_PREFIX = "state/"
UPDATES_PREFIX = "updates/"
# Partial sums of sharded aggregations (sfl.server.shards), in the models bucket.
PARTIALS_PREFIX = "partials/"
UPDATE_SUFFIX = ".safetensors"
MODEL_SUFFIX = ".safetensors"
#: The version devices should use for inference (``sfl models promote``): a stable key
#: beside the versions, which devices may read already.
PROMOTED_MODEL_KEY = f"{MODELS_PREFIX}promoted.safetensors"
#: The optional held-out evaluation set the averager scores each new model on.
EVAL_DATA_KEY = "eval/heldout.safetensors"

# AWS IoT thing names: letters, digits, ':', '_', '-' (at most 128 characters).
# Anchored with \Z, not $ (which would also match before a trailing newline).
CLIENT_ID = re.compile(r"^[A-Za-z0-9:_-]{1,128}\Z")
_UPDATE_KEY = re.compile(
    r"^"
    + re.escape(UPDATES_PREFIX)
    + r"(?P<client>[^/]+)/round-(?P<round>[0-9]{6,12})"
    + re.escape(UPDATE_SUFFIX)
    + r"\Z"
)


_MODEL_KEY = re.compile(
    r"^" + re.escape(MODELS_PREFIX) + r"v(?P<version>[0-9]{6,12})\.safetensors\Z"
)


class MalformedKeyError(ValueError):
    """An object key does not follow the bucket layout."""


@dataclass(frozen=True)
class UpdateKey:
    client_id: str
    round: int


def model_key(version: int) -> str:
    if version < 0:
        raise ValueError(f"model version must be >= 0, got {version}")
    return f"{MODELS_PREFIX}v{version:06d}{MODEL_SUFFIX}"


def model_key_pattern() -> str:
    """Every global model version's key as an IAM resource pattern: the versions only,
    not their lineage records beside them."""
    return f"{MODELS_PREFIX}v*{MODEL_SUFFIX}"


def lineage_key(version: int) -> str:
    """One JSON record per model version (round, parent, participants, config, metrics),
    beside it: written once, like the version."""
    if version < 0:
        raise ValueError(f"model version must be >= 0, got {version}")
    return f"{MODELS_PREFIX}v{version:06d}.json"


def model_version_of(key: str) -> int | None:
    """The version a global model key names, or None for any other key."""
    match = _MODEL_KEY.match(key)
    return int(match["version"]) if match else None


def state_key(version: int) -> str:
    """The server state a stateful aggregation rule kept beside model ``version``."""
    if version < 0:
        raise ValueError(f"model version must be >= 0, got {version}")
    return f"{STATE_PREFIX}v{version:06d}.safetensors"


def privacy_key(version: int) -> str:
    """The privacy record a DP version's step wrote beside it (``sfl.core.privacy_ledger``)."""
    if version < 0:
        raise ValueError(f"model version must be >= 0, got {version}")
    return f"{STATE_PREFIX}v{version:06d}.privacy.json"


def update_key(client_id: str, round_number: int) -> str:
    validate_client_id(client_id)
    if round_number < 1:
        raise ValueError(f"round numbers start at 1, got {round_number}")
    return f"{UPDATES_PREFIX}{client_id}/round-{round_number:06d}{UPDATE_SUFFIX}"


def update_key_pattern(client: str) -> str:
    """Every round's update key of one client, as an IAM resource pattern (``client`` may be
    a policy variable such as ``${credentials-iot:ThingName}``)."""
    return f"{UPDATES_PREFIX}{client}/round-*{UPDATE_SUFFIX}"


def parse_update_key(key: str) -> UpdateKey:
    """Client and round named by an (already URL-decoded) update key."""
    match = _UPDATE_KEY.match(key)
    if match is None:
        raise MalformedKeyError(
            f"key {key!r} is not '{UPDATES_PREFIX}<client_id>/round-<NNNNNN>{UPDATE_SUFFIX}'"
        )
    client_id = match["client"]
    if not CLIENT_ID.match(client_id):
        raise MalformedKeyError(
            f"key {key!r}: client id {client_id!r} is not 1-128 of [A-Za-z0-9:_-]"
        )
    parsed = UpdateKey(client_id=client_id, round=int(match["round"]))
    if parsed.round < 1:  # a device may store round-000000 under its own prefix
        raise MalformedKeyError(f"key {key!r}: round numbers start at 1")
    if key != update_key(parsed.client_id, parsed.round):
        raise MalformedKeyError(f"key {key!r} is not the round's key for {client_id!r}")
    return parsed


def validate_client_id(client_id: str) -> str:
    if not CLIENT_ID.match(client_id):
        raise ValueError(f"client id {client_id!r} is not 1-128 of [A-Za-z0-9:_-]")
    return client_id
