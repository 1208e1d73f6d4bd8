"""Where a round and its slots live in the rounds table.

The round item is keyed by experiment and round number; a round's slot items share the
partition ``<experiment>#slots#<round>``, one per selected client, so a paginated query reads
them and the experiment's own partition holds round items only. One small item in the
partition ``<experiment>#newest`` names the newest round, so that the newest rounds can be
read by key.
"""

from __future__ import annotations

import hashlib
from typing import Any

SLOTS_MARKER = "#slots#"
NEWEST_SUFFIX = "#newest"
#: The newest round item's number, in the item ``newest_key`` names.
NEWEST_ATTRIBUTE = "newest_round"


def slot_partition(experiment: str, number: int) -> str:
    """The partition key of a round's slot items in the rounds table."""
    return f"{experiment}{SLOTS_MARKER}{number}"


def slot_sort_key(client_id: str) -> int:
    """A slot's numeric sort key (the rounds table's sort key is a number): 120 bits of the
    client id's SHA-256, within DynamoDB's 38 digits. The slot also holds the client id and
    every condition checks it, so even a collision cannot mix two clients' answers."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:15], "big")


def round_key(experiment: str, number: int) -> dict[str, Any]:
    """The round item's key."""
    return {"experiment": {"S": experiment}, "round": {"N": str(number)}}


def slot_key(experiment: str, number: int, client_id: str) -> dict[str, Any]:
    """A client's slot item's key in a round."""
    return {
        "experiment": {"S": slot_partition(experiment, number)},
        "round": {"N": str(slot_sort_key(client_id))},
    }


def newest_key(experiment: str) -> dict[str, Any]:
    """The key of the item that names the experiment's newest round (written with it)."""
    return {"experiment": {"S": f"{experiment}{NEWEST_SUFFIX}"}, "round": {"N": "0"}}
