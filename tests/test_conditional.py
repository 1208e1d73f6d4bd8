"""One conditional write: a refused condition is an outcome (nothing written), any other error
goes up unchanged. Against the local DynamoDB and S3, so the codes are the services' own."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from sfl.state.conditional import Write, conditional
from tests.conftest import Stack


def _item(stack: Stack, number: int) -> dict[str, Any] | None:
    item: dict[str, Any] | None = stack.clients.dynamodb.get_item(
        TableName=stack.names.rounds_table,
        Key={"experiment": {"S": "cond"}, "round": {"N": str(number)}},
        ConsistentRead=True,
    ).get("Item")
    return item


def _put_once(stack: Stack, number: int, note: str) -> Any:
    return conditional(
        stack.clients.dynamodb.put_item,
        TableName=stack.names.rounds_table,
        Item={"experiment": {"S": "cond"}, "round": {"N": str(number)}, "note": {"S": note}},
        ConditionExpression="attribute_not_exists(#r)",
        ExpressionAttributeNames={"#r": "round"},
    )


def test_a_write_whose_condition_holds_is_written(stack: Stack) -> None:
    write = _put_once(stack, 1, "first")

    assert write.outcome is Write.WRITTEN and write.written and write.refusal is None
    assert _item(stack, 1) == {
        "experiment": {"S": "cond"},
        "round": {"N": "1"},
        "note": {"S": "first"},
    }


def test_a_failed_condition_is_an_outcome_and_writes_nothing(stack: Stack) -> None:
    _put_once(stack, 1, "first")

    write = _put_once(stack, 1, "second")

    assert write.outcome is Write.CONDITION_FAILED and not write.written
    assert write.reasons == [] and not write.retryable
    assert _item(stack, 1)["note"] == {"S": "first"}  # type: ignore[index]


def test_a_cancelled_transaction_says_which_item_refused(stack: Stack) -> None:
    _put_once(stack, 1, "first")
    put = {"TableName": stack.names.rounds_table, "ConditionExpression": "attribute_not_exists(#r)"}

    write = conditional(
        stack.clients.dynamodb.transact_write_items,
        TransactItems=[
            {
                "Put": {
                    **put,
                    "Item": {"experiment": {"S": "cond"}, "round": {"N": "2"}},
                    "ExpressionAttributeNames": {"#r": "round"},
                }
            },
            {
                "Put": {
                    **put,
                    "Item": {"experiment": {"S": "cond"}, "round": {"N": "1"}},
                    "ExpressionAttributeNames": {"#r": "round"},
                }
            },
        ],
    )

    assert write.outcome is Write.CANCELLED and not write.written
    assert [r.get("Code") for r in write.reasons] == ["None", "ConditionalCheckFailed"]
    assert "ConditionalCheckFailed" in write.codes and not write.retryable
    assert _item(stack, 2) is None  # the transaction wrote neither item
    with pytest.raises(ClientError) as raised:
        write.raise_refusal()
    assert raised.value.response["Error"]["Code"] == "TransactionCanceledException"


def test_an_s3_put_that_finds_the_object_is_refused(stack: Stack) -> None:
    def put(body: bytes) -> Any:
        return conditional(
            stack.clients.s3.put_object,
            Bucket=stack.names.models_bucket,
            Key="cond/once",
            Body=body,
            IfNoneMatch="*",
        )

    assert put(b"first").written
    assert put(b"second").outcome is Write.CONDITION_FAILED
    body = stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key="cond/once")["Body"]
    assert body.read() == b"first"


def test_any_other_error_goes_up_as_it_came(stack: Stack) -> None:
    with pytest.raises(ClientError) as raised:
        conditional(
            stack.clients.dynamodb.put_item,
            TableName="no-such-table",
            Item={"experiment": {"S": "cond"}, "round": {"N": "1"}},
            ConditionExpression="attribute_not_exists(#r)",
            ExpressionAttributeNames={"#r": "round"},
        )
    assert raised.value.response["Error"]["Code"] == "ResourceNotFoundException"
