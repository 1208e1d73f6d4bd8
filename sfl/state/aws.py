"""boto3 clients, built one way for AWS, the local endpoint and the tests.

The endpoint comes from boto3's own ``AWS_ENDPOINT_URL`` setting or an explicit argument,
so the same code talks to AWS or to the local emulator unchanged. ``aws_call`` names a failed
call (service, operation, error code) so logs say what failed, not only that something did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client

# Standard retry mode retries throttling and 5xx with backoff; transient errors never
# reach our code unless they persist.
RETRY_CONFIG = Config(retries={"max_attempts": 6, "mode": "standard"}, max_pool_connections=32)
# A device retries in its own loop (with back-off, stoppable by SIGTERM): each call gives up
# sooner than botocore's 60 s connect timeout, so a dead network never pins the client.
EDGE_CONFIG = Config(
    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30
)

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
    config: Config = RETRY_CONFIG,
) -> AwsClients:
    """S3 and DynamoDB clients; pass a session per thread when clients run concurrently.

    Building a client resolves credentials: with the token exchange service down this raises
    ``CredentialRetrievalError`` (a ``BotoCoreError``).
    """
    session = session or boto3.session.Session()
    kwargs: dict[str, Any] = {"config": config}
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


class AwsCallFailed(Exception):
    """An AWS call failed; says which service, which operation and the error code.

    ``code`` is the service's error code for a ``ClientError`` (``AccessDenied``, ``304``) and
    botocore's exception class otherwise (``EndpointConnectionError``,
    ``CredentialRetrievalError``): a stable word to alarm or grep on.
    """

    def __init__(self, service: str, operation: str, error: ClientError | BotoCoreError) -> None:
        self.service = service
        self.operation = operation
        self.error = error
        self.code = error_code(error) if isinstance(error, ClientError) else type(error).__name__
        super().__init__(f"{service} {operation} failed: {self.code}: {error}")

    @property
    def not_found(self) -> bool:
        return isinstance(self.error, ClientError) and is_not_found(self.error)

    @property
    def not_modified(self) -> bool:
        return self.code in {"304", "NotModified"}


@contextmanager
def aws_call(service: str, operation: str) -> Iterator[None]:
    """Turn a botocore failure inside the block into ``AwsCallFailed(service, operation, ...)``."""
    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise AwsCallFailed(service, operation, e) from e
