"""What a device may write to its registry item is typed and bounded by DynamoDB itself, and
never the item's expiry (issue 20): proven from the synthesized template, since moto enforces
neither IAM nor an index key's type on UpdateItem.

DynamoDB refuses a write that gives an index key attribute a type other than the index's
key schema (PutItem / UpdateItem API reference), and a number holds at most 38 digits: a
device's attributes, all keys of the table or of the active index, cannot hold a string of
any size. The device role's ``dynamodb:Attributes`` condition is the list it may write."""

from __future__ import annotations

from stack_template import actions_of, logical_id, statements_of

from sfl.core.resources import CLIENTS_TABLE
from sfl.state.registry import DEVICE_ATTRIBUTES


def _device_registry_statement(synthesized) -> dict:
    role = synthesized.stack.edge.device_role
    statements = statements_of(
        synthesized.template_json, logical_id(role.node.find_child("DefaultPolicy"))
    )
    (statement,) = [s for s in statements if actions_of(s)[0].startswith("dynamodb:")]
    return statement


def _clients_table(synthesized) -> dict:
    table = synthesized.stack.state.clients_table
    return synthesized.template_json["Resources"][logical_id(table)]["Properties"]


def test_every_attribute_a_device_may_write_is_a_typed_key(synthesized):
    props = _clients_table(synthesized)
    types = {a["AttributeName"]: a["AttributeType"] for a in props["AttributeDefinitions"]}
    keys = {k["AttributeName"] for k in props["KeySchema"]}
    for index in props["GlobalSecondaryIndexes"]:
        keys |= {k["AttributeName"] for k in index["KeySchema"]}
    allowed = _device_registry_statement(synthesized)["Condition"]["ForAllValues:StringEquals"][
        "dynamodb:Attributes"
    ]

    assert allowed == list(DEVICE_ATTRIBUTES)
    assert set(allowed) <= keys
    assert {name: types[name] for name in allowed} == {
        "client_id": "S",  # the table's key, pinned to the thing name by LeadingKeys
        "last_seen": "N",
        "active_shard": "N",
    }


def test_a_device_cannot_write_the_items_expiry_or_what_the_server_measured(synthesized):
    ttl = _clients_table(synthesized)["TimeToLiveSpecification"]["AttributeName"]
    allowed = set(
        _device_registry_statement(synthesized)["Condition"]["ForAllValues:StringEquals"][
            "dynamodb:Attributes"
        ]
    )

    assert ttl == CLIENTS_TABLE.ttl_attribute == "expires_at"
    assert ttl not in allowed
    server = {
        "registered_at",
        "ewma_turnaround",
        "rounds_answered",
        "rounds_missed",
        "missed_streak",
        "miss_history",
        "last_round",
        "utility",
        "recent_picks",
        "norms",
    }
    assert not server & allowed
