"""boto3 clients, built one way for AWS, the local endpoint and the tests.

The endpoint comes from boto3's own ``AWS_ENDPOINT_URL`` setting or an explicit argument,
so the same code talks to AWS or to the local emulator unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client

# Standard retry mode retries throttling and 5xx with backoff; transient errors never
# reach our code unless they persist.
RETRY_CONFIG = Config(retries={"max_attempts": 6, "mode": "standard"}, max_pool_connections=32)

TRANSIENT_ERROR_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "TransactionConflictException",
    }
)


@dataclass(frozen=True)
class AwsClients:
    s3: S3Client
    dynamodb: DynamoDBClient


def make_clients(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    session: boto3.session.Session | None = None,
) -> AwsClients:
    """S3 and DynamoDB clients; pass a session per thread when clients run concurrently."""
    session = session or boto3.session.Session()
    kwargs: dict[str, Any] = {"config": RETRY_CONFIG}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if region:
        kwargs["region_name"] = region
    return AwsClients(
        s3=session.client("s3", **kwargs),
        dynamodb=session.client("dynamodb", **kwargs),
    )


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def is_transient(error: BaseException) -> bool:
    return isinstance(error, ClientError) and error_code(error) in TRANSIENT_ERROR_CODES


def is_not_found(error: ClientError) -> bool:
    return error_code(error) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
