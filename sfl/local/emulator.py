"""The local AWS endpoint (moto's threaded server on 127.0.0.1) and the stack's resources in it.

Resources come from ``sfl.resources``, the same definitions the CDK stack builds from.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import boto3
import botocore.session
from botocore.credentials import ContainerProvider, CredentialResolver

from sfl import resources
from sfl.aws import AwsClients, make_clients
from sfl.local import moto_transactions
from sfl.local.credentials import CredentialEndpoint

REGION = "us-east-1"

#: Variables through which a developer's own credentials could reach local processes;
#: a local Lambda environment never has them (credentials come from the local endpoint).
AMBIENT_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",  # botocore prefers it to the token itself
)

# The signing scope of a SigV4 request names its service: ``Credential=<key>/<date>/<region>/
# <service>/aws4_request``.
_SIGNED_SERVICE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")
_PRESIGNED_SERVICE = re.compile(r"X-Amz-Credential=[^/&]+/[^/&]+/[^/&]+/([^/&]+)/aws4_request")
#: Services whose requests run concurrently (see ``AtomicRequests``).
CONCURRENT_SERVICES = frozenset({"sqs"})


class AtomicRequests:
    """WSGI middleware: requests run one at a time, except SQS's.

    Real S3 and DynamoDB apply a conditional write atomically: of two concurrent
    ``PutObject(IfNoneMatch="*")`` or ``UpdateItem`` with the same condition, exactly one
    succeeds. moto's server checks the condition and then writes, on parallel request threads,
    without a lock, so both can succeed. The round protocol's guarantees (one aggregation per
    round, each model version written once) rest on that atomicity, so local mode restores it.
    SQS stays concurrent: its long polls would hold everything else up. A request is known by
    its SigV4 scope (header or presigned query); one without a signature is serialised too.
    The request body is read under the lock: a client stalling mid-upload would hold up the
    others, which on one machine with local clients does not happen.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        scope = environ.get("HTTP_AUTHORIZATION", "") or unquote(environ.get("QUERY_STRING", ""))
        match = _SIGNED_SERVICE.search(scope) or _PRESIGNED_SERVICE.search(scope)
        if match is not None and match.group(1) in CONCURRENT_SERVICES:
            return self.app(environ, start_response)
        with self._lock:
            # The whole body is produced, and the response closed, under the lock: nothing
            # of it is computed while another request changes the same state.
            response = self.app(environ, start_response)
            try:
                return list(response)
            finally:
                close = getattr(response, "close", None)
                if close is not None:
                    close()


class LocalAws:
    """A running moto server, and the credentials endpoint every local process signs its
    requests with; start with ``with LocalAws() as aws:``."""

    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self.endpoint_url = ""
        self._server: Any = None
        self._credentials: CredentialEndpoint | None = None

    def __enter__(self) -> LocalAws:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        # Before any request: werkzeug reads ``server.app`` per request.
        self._server._server.app = AtomicRequests(self._server._server.app)
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        try:
            self._credentials = CredentialEndpoint().__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._credentials is not None:
            self._credentials.__exit__(*exc)
            self._credentials = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def credentials(self) -> CredentialEndpoint:
        if self._credentials is None:
            raise RuntimeError("LocalAws is not running: use `with LocalAws() as aws:`")
        return self._credentials

    def session(self) -> boto3.session.Session:
        """A session whose only credential source is the local credentials endpoint."""
        core = botocore.session.Session()
        core.register_component(
            "credential_provider",
            CredentialResolver([ContainerProvider(environ=self.credentials.env())]),
        )
        return boto3.session.Session(botocore_session=core, region_name=self.region)

    def clients(self) -> AwsClients:
        """Fresh S3 + DynamoDB clients on their own session (one per thread)."""
        return make_clients(endpoint_url=self.endpoint_url, session=self.session())

    def client(self, service: str) -> Any:
        return self.session().client(service, endpoint_url=self.endpoint_url)  # type: ignore[call-overload]

    def env(self) -> dict[str, str]:
        """What a Lambda or device process needs to reach this endpoint with boto3:
        endpoint, region, and the credentials endpoint (as a Greengrass device has it).
        No shared config or credentials files: a developer's profiles stay out of it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            **self.credentials.env(),
        }


@dataclass(frozen=True)
class LocalDeployment:
    names: resources.ResourceNames
    queue_url: str


def provision(aws: LocalAws, *, prefix: str = "sfl-local") -> LocalDeployment:
    """Create the tables, buckets and the updates bucket's event wiring (S3 -> SQS)."""
    # The server runs in this process: transactions cost what their items cost, as on AWS.
    moto_transactions.install()
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
    """Set a Lambda-like process environment for the handlers, restoring it afterwards.
    Ambient credential variables are removed for the duration."""
    saved = {k: os.environ.get(k) for k in (*values, *AMBIENT_CREDENTIAL_VARIABLES)}
    for name in AMBIENT_CREDENTIAL_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
