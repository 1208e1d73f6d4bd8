"""History survives the device (issue 20): nothing a device may write to its registry item
resets what the server measured about it, not even by having the item expire.

The device writes as its role allows (``DEVICE_ATTRIBUTES``, its own item; the IAM proof is
in tests/infra), every attribute, with values real DynamoDB accepts there (numbers, since
each is an index key of type N; REMOVE too). DynamoDB's TTL is played by ``_ttl_sweep``:
moto does not expire items, the real service deletes those whose TTL attribute holds an
epoch time in the past (at most five years back)."""

from __future__ import annotations

import time
from typing import Any

from sfl.server.initiator import start_round
from sfl.state.registry import DEVICE_ATTRIBUTES, HISTORY_RETENTION_SECONDS, ClientRegistry
from tests.conftest import Stack
from tests.test_deadlines import _deliver, _setup
from tests.test_hostile_devices import _moved

FIVE_YEARS = 5 * 365 * 86_400


def _ttl_sweep(stack: Stack, now: float) -> list[str]:
    """What DynamoDB's TTL does, eventually: delete the items whose expiry has passed."""
    table = stack.names.clients_table
    gone = []
    for item in stack.clients.dynamodb.scan(TableName=table)["Items"]:
        expires = item.get("expires_at", {}).get("N")
        if expires is not None and now - FIVE_YEARS < float(expires) < now:
            stack.clients.dynamodb.delete_item(
                TableName=table, Key={"client_id": item["client_id"]}
            )
            gone.append(item["client_id"]["S"])
    return gone


def _device_write(stack: Stack, client: str, expression: str, values: dict[str, Any]) -> None:
    stack.clients.dynamodb.update_item(
        TableName=stack.names.clients_table,
        Key={"client_id": {"S": client}},
        UpdateExpression=expression,
        **({"ExpressionAttributeValues": values} if values else {}),
    )


def _everything_a_device_may_write(stack: Stack, client: str, now: float) -> None:
    """Each attribute its role lets it write but its key: huge, tiny, negative numbers,
    removed, and last a time already past (an expiry, were it one)."""
    for attribute in DEVICE_ATTRIBUTES:
        if attribute == "client_id":
            continue
        for value in ("9.9999999999999999999999999999999999999E+125", "-1", "0", "1E-130"):
            _device_write(stack, client, f"SET {attribute} = :v", {":v": {"N": value}})
        _device_write(stack, client, f"REMOVE {attribute}", {})
        _device_write(stack, client, f"SET {attribute} = :v", {":v": {"N": str(int(now - 10))}})


def _measured(stack: Stack, client: str) -> dict[str, Any]:
    record = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table).get(client)
    assert record is not None, f"{client}'s record is gone"
    return {k: v for k, v in record.__dict__.items() if k != "last_seen"}


def test_a_device_writing_everything_it_may_keeps_its_misses_and_its_bench(stack: Stack) -> None:
    averager, clock, _ = _setup(stack, "a", "ghost")  # min_fraction: closes on "a" alone
    for number in (1, 2):
        update = stack.upload_update("a", number, _moved(3.0 * number), base_version=number - 1)
        _deliver(averager, update)
        clock.now += 61  # past the soft deadline: quorum without the ghost
        assert averager.tick().status == "CLOSED"
        stack.register("a", "ghost")
        if number == 1:
            assert start_round(stack.clients, stack.names, stack.config, clock=clock).started
    before = _measured(stack, "ghost")
    assert (before["rounds_missed"], before["last_round"]) == (2, 2)  # benched for round 3

    _everything_a_device_may_write(stack, "ghost", clock.now)
    swept = _ttl_sweep(stack, clock.now)
    stack.register("ghost")  # and it heartbeats as if new

    assert swept == []
    assert _measured(stack, "ghost") == before
    item = stack.clients.dynamodb.get_item(
        TableName=stack.names.clients_table, Key={"client_id": {"S": "ghost"}}
    )["Item"]
    assert float(item["expires_at"]["N"]) >= clock.now + HISTORY_RETENTION_SECONDS - 300
    third = start_round(stack.clients, stack.names, stack.config, clock=clock)
    assert third.started and third.selected == ("a",)


def test_the_server_sets_registered_at_and_the_expiry_when_it_counts_a_round(
    stack: Stack,
) -> None:
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    stack.register("d")
    fresh = stack.clients.dynamodb.get_item(
        TableName=stack.names.clients_table, Key={"client_id": {"S": "d"}}
    )["Item"]
    assert set(fresh) == set(DEVICE_ATTRIBUTES)  # a heartbeat writes nothing else

    counted_at = time.time()
    assert registry.record_round("d", 1, answered=True, turnaround=5.0, b=0.5, now=counted_at)

    item = stack.clients.dynamodb.get_item(
        TableName=stack.names.clients_table, Key={"client_id": {"S": "d"}}
    )["Item"]
    assert float(item["registered_at"]["N"]) == counted_at
    assert int(item["expires_at"]["N"]) == int(counted_at + HISTORY_RETENTION_SECONDS)
