"""The tables: the shared definitions' keys, on-demand, point-in-time recovery, TTL."""

from __future__ import annotations

from aws_cdk import Stack, assertions

from infra.state import FederationState
from sfl.core.resources import ACTIVE_INDEX, CLIENTS_TABLE, ROUNDS_TABLE, TableSpec


def key_schema(spec: TableSpec) -> list[dict[str, str]]:
    keys = [{"AttributeName": spec.partition_key.name, "KeyType": "HASH"}]
    if spec.sort_key is not None:
        keys.append({"AttributeName": spec.sort_key.name, "KeyType": "RANGE"})
    return keys


def test_tables_follow_the_shared_definitions(bare_stack: Stack):
    FederationState(bare_stack, "State", retain_data=False)
    template = assertions.Template.from_stack(bare_stack)
    template.resource_count_is("AWS::DynamoDB::Table", 2)
    (index,) = CLIENTS_TABLE.indexes
    assert index is ACTIVE_INDEX and index.projected is not None
    template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": key_schema(CLIENTS_TABLE),
            "AttributeDefinitions": assertions.Match.array_equals(
                [
                    {"AttributeName": "client_id", "AttributeType": "S"},
                    {"AttributeName": "active_shard", "AttributeType": "N"},
                    {"AttributeName": "last_seen", "AttributeType": "N"},
                ]
            ),
            # Selection queries the active devices through this index, never a scan, and
            # reads only the attributes it projects.
            "GlobalSecondaryIndexes": [
                {
                    "IndexName": "active",
                    "KeySchema": [
                        {"AttributeName": "active_shard", "KeyType": "HASH"},
                        {"AttributeName": "last_seen", "KeyType": "RANGE"},
                    ],
                    "Projection": {
                        "ProjectionType": "INCLUDE",
                        "NonKeyAttributes": assertions.Match.array_with(list(index.projected)),
                    },
                }
            ],
            "TimeToLiveSpecification": {"AttributeName": "expires_at", "Enabled": True},
        },
    )
    # Round records stay; each round's slot items expire through the same attribute.
    template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": key_schema(ROUNDS_TABLE),
            "GlobalSecondaryIndexes": assertions.Match.absent(),
            "TimeToLiveSpecification": {"AttributeName": "expires_at", "Enabled": True},
        },
    )
    assert CLIENTS_TABLE.ttl_attribute == ROUNDS_TABLE.ttl_attribute == "expires_at"


def test_tables_are_on_demand_recoverable_and_encrypted(bare_stack: Stack):
    FederationState(bare_stack, "State", retain_data=False)
    template = assertions.Template.from_stack(bare_stack)
    for table in template.find_resources("AWS::DynamoDB::Table").values():
        props = table["Properties"]
        assert props["BillingMode"] == "PAY_PER_REQUEST"
        assert "ProvisionedThroughput" not in props
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert props["SSESpecification"] == {"SSEEnabled": True}
        assert table["DeletionPolicy"] == "Delete"


def test_retain_flag_keeps_the_tables(bare_stack: Stack):
    FederationState(bare_stack, "State", retain_data=True)
    template = assertions.Template.from_stack(bare_stack)
    for table in template.find_resources("AWS::DynamoDB::Table").values():
        assert table["DeletionPolicy"] == "Retain"


def test_construct_exposes_both_tables(bare_stack: Stack):
    state = FederationState(bare_stack, "State", retain_data=False)
    resolve = bare_stack.resolve
    ids = {resolve(t.table_name)["Ref"] for t in (state.clients_table, state.rounds_table)}
    assert len(ids) == 2
    assert all(i.startswith("State") for i in ids)
