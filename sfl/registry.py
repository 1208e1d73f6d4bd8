"""The client registry: who is out there, when they were last seen, how fast they answer.

Each client writes only its own item (a device's IAM policy pins the partition key to its
thing name): registration, heartbeats and its own EWMA of round turnaround, which the
``fast_clients`` selection strategy reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sfl.dynamo import from_item, serialize
from sfl.layout import validate_client_id

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

# Registry items expire (DynamoDB TTL) this many heartbeat-windows after the last one.
EXPIRY_WINDOWS = 4


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    last_seen: float
    registered_at: float
    ewma_turnaround: float | None = None
    rounds_answered: int = 0

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> ClientRecord:
        d = from_item(item)
        ewma = d.get("ewma_turnaround")
        return cls(
            client_id=d["client_id"],
            last_seen=float(d.get("last_seen", 0.0)),
            registered_at=float(d.get("registered_at", 0.0)),
            ewma_turnaround=None if ewma is None else float(ewma),
            rounds_answered=int(d.get("rounds_answered", 0)),
        )


def update_ewma(previous: float | None, sample: float, b: float) -> float:
    """The seed's turnaround average: ``b * previous + (1 - b) * sample``; first sample as is."""
    if previous is None:
        return sample
    return b * previous + (1.0 - b) * sample


class ClientRegistry:
    def __init__(self, dynamodb: DynamoDBClient, table_name: str) -> None:
        self._ddb = dynamodb
        self._table = table_name

    def heartbeat(
        self,
        client_id: str,
        *,
        now: float,
        active_window_seconds: float,
        ewma_turnaround: float | None = None,
        answered_round: bool = False,
    ) -> None:
        """Register or refresh a client; optionally report its new EWMA after a round."""
        validate_client_id(client_id)
        sets = [
            "last_seen = :now",
            "expires_at = :expires",
            "registered_at = if_not_exists(registered_at, :now)",
        ]
        values: dict[str, Any] = {
            ":now": serialize(now),
            ":expires": {"N": str(int(now + EXPIRY_WINDOWS * active_window_seconds))},
        }
        if ewma_turnaround is not None:
            sets.append("ewma_turnaround = :ewma")
            values[":ewma"] = serialize(float(ewma_turnaround))
        expression = "SET " + ", ".join(sets)
        if answered_round:
            expression += " ADD rounds_answered :one"
            values[":one"] = {"N": "1"}
        self._ddb.update_item(
            TableName=self._table,
            Key={"client_id": {"S": client_id}},
            UpdateExpression=expression,
            ExpressionAttributeValues=values,
        )

    def get(self, client_id: str) -> ClientRecord | None:
        item = self._ddb.get_item(
            TableName=self._table, Key={"client_id": {"S": client_id}}, ConsistentRead=True
        ).get("Item")
        return ClientRecord.from_item(dict(item)) if item else None

    def active(self, *, now: float, active_window_seconds: float) -> list[ClientRecord]:
        """Clients that heartbeated within the window, sorted by id (stable selection input)."""
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "FilterExpression": "last_seen >= :cutoff",
            "ExpressionAttributeValues": {":cutoff": serialize(now - active_window_seconds)},
            "ConsistentRead": True,
        }
        records: list[ClientRecord] = []
        while True:
            response = self._ddb.scan(**kwargs)
            records.extend(ClientRecord.from_item(dict(i)) for i in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                break
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return sorted(records, key=lambda r: r.client_id)
