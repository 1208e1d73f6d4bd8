"""The local AWS endpoint (moto's threaded server on 127.0.0.1) and the stack's resources in it.

Resources come from ``sfl.resources``, the same definitions the CDK stack builds from.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3

from sfl import resources
from sfl.aws import AwsClients, make_clients

REGION = "us-east-1"
# moto accepts any credentials; these never leave this machine.
_LOCAL_CREDENTIALS = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}


class LocalAws:
    """A running moto server; start with ``with LocalAws() as aws:``."""

    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self.endpoint_url = ""
        self._server: Any = None

    def __enter__(self) -> LocalAws:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def session(self) -> boto3.session.Session:
        return boto3.session.Session(
            aws_access_key_id=_LOCAL_CREDENTIALS["aws_access_key_id"],
            aws_secret_access_key=_LOCAL_CREDENTIALS["aws_secret_access_key"],
            region_name=self.region,
        )

    def clients(self) -> AwsClients:
        """Fresh S3 + DynamoDB clients on their own session (one per thread)."""
        return make_clients(endpoint_url=self.endpoint_url, session=self.session())

    def client(self, service: str) -> Any:
        return self.session().client(service, endpoint_url=self.endpoint_url)  # type: ignore[call-overload]

    def env(self) -> dict[str, str]:
        """What a Lambda or device process needs to reach this endpoint with boto3."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": _LOCAL_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": _LOCAL_CREDENTIALS["aws_secret_access_key"],
        }


@dataclass(frozen=True)
class LocalDeployment:
    names: resources.ResourceNames
    queue_url: str


def provision(aws: LocalAws, *, prefix: str = "sfl-local") -> LocalDeployment:
    """Create the tables, buckets and the updates bucket's event wiring (S3 -> SQS)."""
    suffix = uuid.uuid4().hex[:8]
    names = resources.ResourceNames(
        models_bucket=f"{prefix}-models-{suffix}",
        updates_bucket=f"{prefix}-updates-{suffix}",
        clients_table=f"{prefix}-clients-{suffix}",
        rounds_table=f"{prefix}-rounds-{suffix}",
    )
    ddb = aws.client("dynamodb")
    table_names = {
        resources.CLIENTS_TABLE.logical_id: names.clients_table,
        resources.ROUNDS_TABLE.logical_id: names.rounds_table,
    }
    for spec in resources.TABLES:
        name = table_names[spec.logical_id]
        ddb.create_table(**resources.create_table_request(spec, name))
        if spec.ttl_attribute:
            ddb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": spec.ttl_attribute},
            )
    s3 = aws.client("s3")
    bucket_names = {
        resources.MODELS_BUCKET.logical_id: names.models_bucket,
        resources.UPDATES_BUCKET.logical_id: names.updates_bucket,
    }
    for bucket in resources.BUCKETS:
        name = bucket_names[bucket.logical_id]
        s3.create_bucket(Bucket=name)
        if bucket.versioned:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    sqs = aws.client("sqs")
    queue_url = sqs.create_queue(
        QueueName=f"{prefix}-update-events-{suffix}",
        Attributes={"VisibilityTimeout": "5"},
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    updates = resources.UPDATES_BUCKET
    rules = [
        {"Name": "prefix", "Value": updates.notify_prefix},
        {"Name": "suffix", "Value": updates.notify_suffix},
    ]
    s3.put_bucket_notification_configuration(
        Bucket=names.updates_bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": rules}},
                }
            ]
        },
    )
    return LocalDeployment(names=names, queue_url=queue_url)


@contextmanager
def lambda_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set a Lambda-like process environment for the handlers, restoring it afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
