"""The client registry: who is out there, when they were last seen, how fast they answer.

Two writers, each with its own attributes. A device writes only its own item and only
``DEVICE_ATTRIBUTES`` (the device role's IAM policy pins both): its key, ``last_seen`` and
``active_shard``, the heartbeat. The server (the averager) writes what selection and liveness
trust, measured from what S3 and the round records say, never from what a device reports:
each client's turnaround EWMA (round start to the S3 time of its upload), its answered /
missed counts, the outcomes of its last picks (``miss_history``, ``sfl.core.liveness``), its
utility and recent picks, when it was first counted (``registered_at``) and when the item
expires (``expires_at``).

Why a device can neither reset nor bloat what the server measured:

- **History survives the device.** The item expires (DynamoDB TTL on ``expires_at``) only
  when the server says: each counted round pushes ``expires_at`` to ``HISTORY_RETENTION``
  past it, and no device may write it. (Before, a device wrote its own expiry, had its item
  deleted, and came back new: unbenched, first in the exploration queue.) An item the server
  never counted has no expiry at all; the registry still cannot grow past one item per
  thing, since a device may write only the item keyed by its own thing name.
- **Typed and bounded where the server reads.** Every attribute a device may write is a key
  DynamoDB types itself: ``client_id`` the table's (and pinned to the thing name),
  ``last_seen`` and ``active_shard`` the active index's, both numbers (``N``: at most 38
  digits). DynamoDB refuses a write that gives an index key attribute another type (the
  PutItem / UpdateItem API reference: "their types must match the index key schema"), so no
  string of any size gets in. (moto does not enforce that on UpdateItem; the tests prove it
  from the template's key schema, not through the emulator.) ``registered_at``, once the
  device's, is the server's now: a device once stored 300 KB there.
- **What it may read back.** The policy's ``dynamodb:ReturnValues`` condition governs the
  ``ReturnValues`` parameter only. IAM has no condition key for
  ``ReturnValuesOnConditionCheckFailure`` (the service authorization reference lists
  ``Attributes``, ``LeadingKeys``, ``ReturnValues``, ``ReturnConsumedCapacity``, ``Select``
  and a few more), and AWS documents no filtering of what it returns by
  ``dynamodb:Attributes``. So it must be taken to get around the condition: a device whose
  condition fails on purpose, asking for ``ALL_OLD``, gets its whole item back, the server's
  figures about itself. It cannot write them, nor read another device's item. No policy
  condition can close this, so we accept it: a device already learns its own standing from
  whether it is picked.

Every item is read defensively: a malformed one is skipped and logged, never a crash, and a
heartbeat from the future is refused rather than keeping a device "active" for ever.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sfl.core.credit import CHANGE_POOL_SIZE
from sfl.core.layout import CLIENT_ID, validate_client_id
from sfl.core.liveness import EMPTY_HISTORY, history_from_streak, record_pick, valid_history
from sfl.core.resources import ACTIVE_INDEX, ACTIVE_SHARDS
from sfl.core.selection import Candidate, decayed_picks
from sfl.state.aws import error_code
from sfl.state.dynamo import from_item, serialize

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

logger = logging.getLogger(__name__)

# A registry item expires (DynamoDB TTL) this long after the last round the server counted
# for it: a benched device is picked again within 32 rounds, so its history outlives any
# bench; a device that left is forgotten after this.
HISTORY_RETENTION_SECONDS = 90 * 86_400
# A heartbeat stamped further ahead of the server's clock than this is refused.
MAX_CLOCK_SKEW_SECONDS = 300.0
# The attributes a device may write (the device role's dynamodb:Attributes condition): each
# a key DynamoDB types (the table's, or the active index's), none the server measured.
DEVICE_ATTRIBUTES = ("client_id", "last_seen", "active_shard")
# The server-only item holding recent rounds' credited changes (sfl.core.credit): no thing
# name holds '#', so no device can write it, and with no shard or heartbeat it is never a
# candidate nor listed.
CHANGES_ITEM_ID = "#changes"
# What the server reads of an item when it counts a round (not even ``registered_at``: an
# item from before it was the server's may hold whatever a device put there).
# The numbers selection reads through the active index, and the two keys.
SERVER_READ = (
    "client_id",
    "last_seen",
    *(name for name in ACTIVE_INDEX.projected or () if name != "registered_at"),
)
# A turnaround sample is clamped to [1 s, a day]: no answer is instant, and the EWMA stays a
# small finite number.
MIN_TURNAROUND_SECONDS = 1.0
MAX_TURNAROUND_SECONDS = 86_400.0
# A reported loss is clamped to [0, this] before it becomes a utility (cross-entropy over ten
# classes starts near 2.3; anything far above is a broken or lying device).
MAX_REPORTED_LOSS = 20.0
# Server-written numbers above these read as unknown: no item can make selection overflow.
MAX_UTILITY = 1e15
MAX_RECENT_PICKS = 1e6


class InvalidRecord(ValueError):
    """A registry item that cannot be read as a client (a device wrote garbage)."""


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    last_seen: float
    registered_at: float
    ewma_turnaround: float | None = None  # server-measured
    rounds_answered: int = 0  # server-counted: accepted updates
    rounds_missed: int = 0  # server-counted: selected, then silent or rejected
    missed_streak: int = 0  # consecutive misses, reset by an accepted update
    last_round: int = 0  # the last round the server counted for this client
    utility: float | None = None  # server-bounded loss x examples of its last accepted update
    recent_picks: float = 0.0  # decayed count of rounds it was picked for, as of last_round
    miss_history: int = EMPTY_HISTORY  # outcomes of its last picks (sfl.core.liveness)

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> ClientRecord:
        """Parse an item; ``InvalidRecord`` if its id or ``last_seen`` is unusable. Other
        server-owned numbers that are not what the server writes read as unknown."""
        try:
            d = from_item(item)
        except Exception as e:  # a shape boto3 cannot even deserialize
            raise InvalidRecord(f"undecodable item: {type(e).__name__}") from e
        client_id = d.get("client_id")
        if not isinstance(client_id, str) or not CLIENT_ID.match(client_id):
            raise InvalidRecord(f"client_id {str(client_id)[:64]!r} is not a client id")
        last_seen = _number(d.get("last_seen"))
        if last_seen is None:
            raise InvalidRecord(f"{client_id}: last_seen is not a number")
        ewma = _number(d.get("ewma_turnaround"))
        utility = _number(d.get("utility"))
        recent_picks = _number(d.get("recent_picks"))
        missed_streak = _count(d.get("missed_streak"))
        history = _number(d.get("miss_history"))
        return cls(
            client_id=client_id,
            last_seen=last_seen,
            registered_at=_number(d.get("registered_at")) or 0.0,
            ewma_turnaround=ewma if ewma is not None and ewma > 0 else None,
            rounds_answered=_count(d.get("rounds_answered")),
            rounds_missed=_count(d.get("rounds_missed")),
            missed_streak=missed_streak,
            miss_history=valid_history(int(history))
            if history is not None and history.is_integer()
            else history_from_streak(missed_streak),
            last_round=_count(d.get("last_round")),
            utility=utility if utility is not None and 0 <= utility <= MAX_UTILITY else None,
            recent_picks=recent_picks
            if recent_picks is not None and 0 <= recent_picks <= MAX_RECENT_PICKS
            else 0.0,
        )

    def candidate(self) -> Candidate:
        """This client as selection sees it: only what the server measured."""
        return Candidate(
            client_id=self.client_id,
            ewma_turnaround=self.ewma_turnaround,
            missed_streak=self.missed_streak,
            last_round=self.last_round,
            utility=self.utility,
            recent_picks=self.recent_picks,
            miss_history=self.miss_history,
        )

    def after_round(
        self,
        round_number: int,
        *,
        answered: bool,
        turnaround: float,
        b: float,
        utility: float | None = None,
        pick_window: int = 10,
    ) -> ClientRecord:
        """This record once the server has counted one more round for it: the arithmetic of
        ``ClientRegistry.record_round``, kept pure so a simulation can replay it."""
        sample = min(max(turnaround, MIN_TURNAROUND_SECONDS), MAX_TURNAROUND_SECONDS)
        picks = 1.0 + decayed_picks(self.recent_picks, self.last_round, round_number, pick_window)
        fresh = utility if answered and utility is not None and math.isfinite(utility) else None
        return replace(
            self,
            ewma_turnaround=round(update_ewma(self.ewma_turnaround, sample, b), 6),
            rounds_answered=self.rounds_answered + int(answered),
            rounds_missed=self.rounds_missed + int(not answered),
            missed_streak=0 if answered else self.missed_streak + 1,
            last_round=round_number,
            utility=self.utility if fresh is None else round(min(max(fresh, 0.0), MAX_UTILITY), 6),
            recent_picks=round(min(picks, MAX_RECENT_PICKS), 6),
            miss_history=record_pick(self.miss_history, missed=not answered),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None and 0 <= number < 2**53 else 0


def statistical_utility(
    metrics: Mapping[str, Any], num_examples: int, max_examples: int
) -> float | None:
    """What an accepted update says about how much its client still has to teach the model:
    its training loss (else its local eval loss) times its example count, Oort's
    ``|B| x loss``. Both are the device's claims, so the loss is clamped to
    ``[0, MAX_REPORTED_LOSS]`` and the count to ``[0, max_examples]``; selection caps the
    result again relative to a typical client's. None without a usable loss."""
    loss = _number(metrics.get("train_loss"))
    if loss is None:
        loss = _number(metrics.get("loss"))
    if loss is None:
        return None
    examples = min(max(num_examples, 0), max(max_examples, 0))
    return min(max(loss, 0.0), MAX_REPORTED_LOSS) * examples


def update_ewma(previous: float | None, sample: float, b: float) -> float:
    """A client's turnaround average: ``b * previous + (1 - b) * sample``; first sample as is."""
    if previous is None:
        return sample
    return b * previous + (1.0 - b) * sample


def active_shard(client_id: str) -> int:
    """The active index's partition a client heartbeats into: a hash of its id, so devices
    spread evenly over ``ACTIVE_SHARDS`` partitions. A device that writes another number
    only moves itself (another shard) or hides itself (out of range: never queried)."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:4], "big") % ACTIVE_SHARDS


class ClientRegistry:
    def __init__(self, dynamodb: DynamoDBClient, table_name: str) -> None:
        self._ddb = dynamodb
        self._table = table_name

    # --- the device's writes --------------------------------------------------------------

    def heartbeat(self, client_id: str, *, now: float, active_window_seconds: float) -> None:
        """Register or refresh a client (a device's own write: ``DEVICE_ATTRIBUTES`` only).
        ``active_window_seconds`` is kept for callers; the item's expiry is the server's."""
        validate_client_id(client_id)
        self._ddb.update_item(
            TableName=self._table,
            Key={"client_id": {"S": client_id}},
            UpdateExpression="SET last_seen = :now, active_shard = :shard",
            ExpressionAttributeValues={
                ":now": serialize(now),
                ":shard": {"N": str(active_shard(client_id))},
            },
        )

    # --- the server's writes ---------------------------------------------------------------

    def record_round(
        self,
        client_id: str,
        round_number: int,
        *,
        answered: bool,
        turnaround: float,
        b: float,
        utility: float | None = None,
        pick_window: int = 10,
        now: float | None = None,
    ) -> bool:
        """Count one round for a client, once: an accepted update that did work
        (``answered``) or a miss (silent, declined, rejected, or a negligible change), and
        fold the server-measured turnaround into its EWMA (a miss counts as the whole round)
        and the outcome into its ``miss_history``. Either way the client was picked: its
        ``recent_picks`` grows by one (decayed over ``pick_window`` rounds); an accepted
        update's ``utility`` (``statistical_utility``) replaces the last one. The item's
        expiry moves to ``HISTORY_RETENTION_SECONDS`` after ``now``. False if the item is
        gone or already counted for this round."""
        counted_at = time.time() if now is None else now
        try:
            item = self._read_item(client_id)
            if not item:
                return False
            try:
                record = ClientRecord.from_item(item)
            except InvalidRecord:  # unreadable server fields count as unknown
                record = ClientRecord(client_id, last_seen=0.0, registered_at=0.0)
            after = record.after_round(
                round_number,
                answered=answered,
                turnaround=turnaround,
                b=b,
                utility=utility,
                pick_window=pick_window,
            )
            counter = "rounds_answered" if answered else "rounds_missed"
            streak = ":zero" if answered else "if_not_exists(missed_streak, :zero) + :one"
            values: dict[str, Any] = {}
            set_utility = ""
            if after.utility is not None and after.utility != record.utility:
                set_utility = ", utility = :utility"
                values[":utility"] = serialize(after.utility)
            self._ddb.update_item(
                TableName=self._table,
                Key={"client_id": {"S": client_id}},
                UpdateExpression=(
                    f"SET ewma_turnaround = :ewma, last_round = :round, missed_streak = {streak}, "
                    f"{counter} = if_not_exists({counter}, :zero) + :one, "
                    "miss_history = :history, expires_at = :expires, "
                    "registered_at = if_not_exists(registered_at, :now), "
                    f"recent_picks = :picks{set_utility}"
                ),
                ConditionExpression=(
                    "attribute_exists(client_id) AND "
                    "(attribute_not_exists(last_round) OR last_round < :round)"
                ),
                ExpressionAttributeValues={
                    **values,
                    ":picks": serialize(after.recent_picks),
                    ":ewma": serialize(after.ewma_turnaround),
                    ":round": {"N": str(round_number)},
                    ":history": {"N": str(after.miss_history)},
                    ":expires": {"N": str(int(counted_at + HISTORY_RETENTION_SECONDS))},
                    ":now": serialize(counted_at),
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                },
            )
        except ClientError as e:
            if error_code(e) in {"ConditionalCheckFailedException", "ValidationException"}:
                # Already counted, gone, or a value of the wrong type in the way.
                logger.info(
                    "client round not counted",
                    extra={"client_id": client_id, "round": round_number, "error": error_code(e)},
                )
                return False
            raise
        return True

    def recent_changes(self) -> tuple[float, ...]:
        """The credited changes of recent rounds (``sfl.core.credit``), oldest first; what
        is not a bounded list of positive finite numbers reads as none."""
        item = self._ddb.get_item(
            TableName=self._table,
            Key={"client_id": {"S": CHANGES_ITEM_ID}},
            ConsistentRead=True,
            ProjectionExpression="norms",
        ).get("Item")
        norms = from_item(item).get("norms") if item else None
        if not isinstance(norms, list):
            return ()
        numbers = [_number(n) for n in norms[-CHANGE_POOL_SIZE:]]
        return tuple(n for n in numbers if n is not None and n > 0)

    def record_changes(self, round_number: int, pool: tuple[float, ...]) -> bool:
        """Store the pool as of this round, once per round (a later round's wins)."""
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key={"client_id": {"S": CHANGES_ITEM_ID}},
                UpdateExpression="SET norms = :norms, last_round = :round",
                ConditionExpression="attribute_not_exists(last_round) OR last_round < :round",
                ExpressionAttributeValues={
                    ":norms": {"L": [serialize(round(n, 9)) for n in pool[-CHANGE_POOL_SIZE:]]},
                    ":round": {"N": str(round_number)},
                },
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    # --- reads -----------------------------------------------------------------------------

    def _read_item(self, client_id: str) -> dict[str, Any] | None:
        item: dict[str, Any] | None = self._ddb.get_item(
            TableName=self._table,
            Key={"client_id": {"S": client_id}},
            ConsistentRead=True,
            ProjectionExpression=", ".join(f"#a{i}" for i in range(len(SERVER_READ))),
            ExpressionAttributeNames={f"#a{i}": name for i, name in enumerate(SERVER_READ)},
        ).get("Item")
        return item

    def get(self, client_id: str) -> ClientRecord | None:
        """A client's record as the server measured it (``SERVER_READ`` only)."""
        item = self._read_item(client_id)
        if not item:
            return None
        try:
            return ClientRecord.from_item(item)
        except InvalidRecord as e:
            logger.warning(
                "registry item unreadable", extra={"client_id": client_id, "error": str(e)}
            )
            return None

    def active(self, *, now: float, active_window_seconds: float) -> list[ClientRecord]:
        """Clients that heartbeated within the window, sorted by id (stable selection input).

        Reads only those: one query per shard of the active index (``last_seen`` is its sort
        key), never the whole registry. The index is eventually consistent (a heartbeat of
        the last second may be missed; the next round sees it). Malformed items and
        heartbeats from the future are skipped and logged."""
        records: list[ClientRecord] = []
        for shard in range(ACTIVE_SHARDS):
            records.extend(
                self._read(
                    now,
                    {
                        "TableName": self._table,
                        "IndexName": ACTIVE_INDEX.name,
                        "KeyConditionExpression": "active_shard = :shard AND last_seen >= :cutoff",
                        "ExpressionAttributeValues": {
                            ":shard": {"N": str(shard)},
                            ":cutoff": serialize(now - active_window_seconds),
                        },
                    },
                    self._ddb.query,
                )
            )
        return sorted(records, key=lambda r: r.client_id)

    def everyone(self, *, now: float, active_window_seconds: float) -> list[ClientRecord]:
        """Every registry item seen within the window, by a full scan: for operators' views
        (a device that never wrote its shard still shows), never for selection."""
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "FilterExpression": "last_seen >= :cutoff",
            "ExpressionAttributeValues": {":cutoff": serialize(now - active_window_seconds)},
            "ConsistentRead": True,
        }
        return sorted(self._read(now, kwargs, self._ddb.scan), key=lambda r: r.client_id)

    def _read(self, now: float, kwargs: dict[str, Any], call: Any) -> list[ClientRecord]:
        records: list[ClientRecord] = []
        while True:
            response = call(**kwargs)
            for item in response.get("Items", []):
                try:
                    record = ClientRecord.from_item(item)
                except InvalidRecord as e:
                    logger.warning("registry item skipped", extra={"error": str(e)})
                    continue
                if record.last_seen > now + MAX_CLOCK_SKEW_SECONDS:
                    logger.warning(
                        "registry item skipped: heartbeat from the future",
                        extra={
                            "client_id": record.client_id,
                            "ahead_s": round(record.last_seen - now, 1),
                        },
                    )
                    continue
                records.append(record)
            if "LastEvaluatedKey" not in response:
                return records
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
