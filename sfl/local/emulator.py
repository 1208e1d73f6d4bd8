"""The local AWS endpoint (moto's threaded server on 127.0.0.1) and the stack's resources in it.

Resources come from ``sfl.core.resources``, the same definitions the CDK stack builds from.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import boto3
import botocore.loaders
import botocore.session
from botocore.credentials import ContainerProvider, CredentialResolver

from sfl.core import resources
from sfl.local import moto_transactions
from sfl.local.credentials import CredentialEndpoint
from sfl.state.aws import AwsClients, make_clients

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
#: DynamoDB actions that name their tables inside lists rather than in ``TableName``.
_MULTI_TABLE_ACTIONS = frozenset(
    {"TransactWriteItems", "TransactGetItems", "BatchWriteItem", "BatchGetItem"}
)
_S3_WRITE_METHODS = frozenset({"PUT", "POST", "DELETE"})
_DYNAMODB_WRITE_ACTIONS = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}
)


def table_resource(table: str) -> str:
    """The name ``ChangeFeed`` counts a DynamoDB table's item writes under (key "")."""
    return f"dynamodb:{table}"


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode; a waiting exclusive holder
    goes first (new shared holders wait behind it), so it is never starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._exclusive_waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class ChangeFeed:
    """Counts the writes to each S3 object (and each DynamoDB table's items, under
    ``table_resource``) through the emulator, so local processes can wait for a change
    instead of polling (as a device does on AWS).
    A waiter that compares counts cannot miss a change: one made between its last look
    and its wait ends the wait at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._writes: dict[tuple[str, str], int] = {}

    def changed(self, bucket: str, key: str) -> None:
        with self._cond:
            self._writes[(bucket, key)] = self._writes.get((bucket, key), 0) + 1
            self._cond.notify_all()

    def writes(self, bucket: str, key: str) -> int:
        with self._cond:
            return self._writes.get((bucket, key), 0)

    def wait(
        self,
        bucket: str,
        key: str,
        seen: int,
        timeout: float,
        stop: threading.Event | None = None,
    ) -> int:
        """Wait up to ``timeout`` s for the write count to pass ``seen``, or for ``stop``
        (see ``wake_all``); returns the count then."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    (stop is not None and stop.is_set())
                    or self._writes.get((bucket, key), 0) > seen
                ),
                timeout,
            )
            return self._writes.get((bucket, key), 0)

    def wake_all(self) -> None:
        """Make every waiter look again (call it after setting a waiter's ``stop``)."""
        with self._cond:
            self._cond.notify_all()

    def waiter(
        self, bucket: str, key: str, stop: threading.Event | None = None
    ) -> Callable[[float], None]:
        """A pause for one client: it returns when the object was written since the last
        pause returned (or since now, for the first), after ``timeout`` s, or on ``stop``."""
        seen = self.writes(bucket, key)

        def pause(timeout: float) -> None:
            nonlocal seen
            seen = self.wait(bucket, key, seen, timeout, stop)

        return pause


def _request_body(environ: dict[str, Any]) -> bytes | None:
    """Read the request body and put it back for the application to read again; None
    (nothing read) when its length is not declared."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _dynamodb_tables(environ: dict[str, Any]) -> list[str] | None:
    """The tables a DynamoDB request touches, from its JSON body; None if unknown."""
    action = environ.get("HTTP_X_AMZ_TARGET", "").rpartition(".")[2]
    body = _request_body(environ)
    if body is None:
        return None
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    if action in _MULTI_TABLE_ACTIONS:
        tables: set[str] = set()
        items = request.get("RequestItems")
        if isinstance(items, dict):
            tables.update(str(t) for t in items)
        for item in request.get("TransactItems") or []:
            if isinstance(item, dict):
                for part in item.values():
                    if isinstance(part, dict) and isinstance(part.get("TableName"), str):
                        tables.add(part["TableName"])
        return sorted(tables) or None
    table = request.get("TableName")
    return [table] if isinstance(table, str) and table else None


def _s3_location(environ: dict[str, Any]) -> tuple[str, str] | None:
    """(bucket, key) of a path-style S3 request (boto3 uses path style for an IP
    endpoint); None when the bucket is not in the path (virtual-hosted style, ListBuckets)."""
    host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0]
    if host not in {"127.0.0.1", "localhost", "[::1]"}:
        return None
    bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
    return (bucket, key) if bucket else None


class AtomicRequests:
    """WSGI middleware: requests to one S3 bucket or DynamoDB table run one at a time.

    Real S3 and DynamoDB apply a conditional write atomically: of two concurrent
    ``PutObject(IfNoneMatch="*")`` or ``UpdateItem`` with the same condition, exactly one
    succeeds. moto's server checks the condition and then writes, on parallel request threads,
    without a lock, so both can succeed. The round protocol's guarantees (one aggregation per
    round, each model version written once) rest on that atomicity, so local mode restores it:
    every request to a bucket or table (reads too: an item is never seen half-updated) holds
    that resource's lock, a multi-table transaction holds all its tables' locks (taken in
    name order, so two transactions never deadlock), and any other request of another
    service holds that service's lock. Requests to different resources run concurrently, as
    on AWS. A request whose resource is not known (virtual-hosted S3, ListBuckets, a
    DynamoDB body without a table) holds every lock at once: it runs alone, as all requests
    did before. SQS stays concurrent: its long polls would hold everything else up. A
    request is known by its SigV4 scope (header or presigned query); one without a
    signature runs alone too. A DynamoDB body is read before the lock is taken (it names
    the table); an S3 body is read under its bucket's lock. (A ``CopyObject`` holds only the
    destination bucket's lock: it reads the source key in one step, as a ``GetObject`` would.)

    ``feed`` (if given) is told of every successful write to an S3 object or a table.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], feed: ChangeFeed | None = None) -> None:
        self.app = app
        self.feed = feed
        self._all = SharedExclusiveLock()
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def _lock(self, service: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((service, name), threading.Lock())

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        scope = environ.get("HTTP_AUTHORIZATION", "") or unquote(environ.get("QUERY_STRING", ""))
        match = _SIGNED_SERVICE.search(scope) or _PRESIGNED_SERVICE.search(scope)
        service = match.group(1) if match is not None else ""
        if service in CONCURRENT_SERVICES:
            return self.app(environ, start_response)
        location: tuple[str, str] | None = None
        resources_: list[str] | None
        if service == "s3":
            location = _s3_location(environ)
            resources_ = [location[0]] if location is not None else None
        elif service == "dynamodb":
            resources_ = _dynamodb_tables(environ)
        else:
            resources_ = [""] if service else None
        status: list[str] = []

        def record_status(status_line: str, *args: Any) -> Any:
            status.append(status_line)
            return start_response(status_line, *args)

        with ExitStack() as held:
            if resources_ is None:
                held.enter_context(self._all.exclusive())
            else:
                held.enter_context(self._all.shared())
                for name in resources_:
                    held.enter_context(self._lock(service, name))
            body = self._respond(environ, record_status)
        if self.feed is not None and status and status[-1].startswith("2"):
            if (
                location is not None
                and location[1]
                and environ.get("REQUEST_METHOD") in _S3_WRITE_METHODS
            ):
                self.feed.changed(*location)  # PATH_INFO is already unquoted
            elif (
                service == "dynamodb"
                and resources_
                and environ.get("HTTP_X_AMZ_TARGET", "").rpartition(".")[2]
                in _DYNAMODB_WRITE_ACTIONS
            ):
                for table in resources_:
                    self.feed.changed(table_resource(table), "")
        return body

    def _respond(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        # The whole body is produced, and the response closed, under the lock: nothing
        # of it is computed while another request changes the same state.
        response = self.app(environ, start_response)
        try:
            return list(response)
        finally:
            close = getattr(response, "close", None)
            if close is not None:
                close()


#: Read-only once loaded: the service models and endpoint data every local session uses.
_LOADER = botocore.loaders.create_loader()


class LocalAws:
    """A running moto server, and the credentials endpoint every local process signs its
    requests with; start with ``with LocalAws() as aws:``."""

    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self.endpoint_url = ""
        self._server: Any = None
        self._credentials: CredentialEndpoint | None = None
        #: Writes to S3 objects through this endpoint, for local waiters (``ChangeFeed``).
        self.feed = ChangeFeed()

    def __enter__(self) -> LocalAws:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        # Before any request: werkzeug reads ``server.app`` per request.
        self._server._server.app = AtomicRequests(self._server._server.app, self.feed)
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
        """A session whose only credential source is the local credentials endpoint. Its
        service models come from one loader shared by every local session: parsing them
        again is most of what a new client costs, and a local federation makes hundreds."""
        core = botocore.session.Session()
        core.register_component("data_loader", _LOADER)
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
        if bucket.own_key:
            # As deployed: SSE-KMS with a key of its own and an S3 Bucket Key. (moto records
            # the encryption on each object; it enforces no key policy.)
            key = aws.client("kms").create_key(Description=f"{name}: client updates")
            s3.put_bucket_encryption(
                Bucket=name,
                ServerSideEncryptionConfiguration={
                    "Rules": [
                        {
                            "ApplyServerSideEncryptionByDefault": {
                                "SSEAlgorithm": "aws:kms",
                                "KMSMasterKeyID": key["KeyMetadata"]["Arn"],
                            },
                            "BucketKeyEnabled": True,
                        }
                    ]
                },
            )
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
