"""Finding a federation: a deployed stack by name (CloudFormation outputs), or local mode.

The operator's own AWS settings apply (``AWS_PROFILE``, ``AWS_REGION``, ...; ``--profile``
and ``--region`` override them). Local mode is the same lookup against the endpoint that
``sfl local up`` prints (``--endpoint`` or boto3's own ``AWS_ENDPOINT_URL``): local mode
registers its resources as a CloudFormation stack of the same name in the emulator. Every
failure to connect becomes an ``OpsError`` that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import boto3
import botocore.session
from botocore.credentials import CredentialResolver
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
)

from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.ops import local_endpoint
from sfl.ops.defaults import DEFAULT_STACK, STACK_ENV
from sfl.state.aws import RETRY_CONFIG, AwsClients, error_code

#: Stack outputs the commands read (the stack and local mode both provide them).
OUTPUT_NAMES = {
    "models_bucket": "ModelsBucketName",
    "updates_bucket": "UpdatesBucketName",
    "clients_table": "ClientsTableName",
    "rounds_table": "RoundsTableName",
}
INITIATOR_OUTPUT = "InitiatorFunctionName"
AVERAGER_OUTPUT = "AveragerFunctionName"
ALARMS_OUTPUT = "AlarmNames"
DASHBOARD_OUTPUT = "DashboardUrl"
LOCAL_OUTPUT = "LocalMode"  # present only in local mode's stack

T = TypeVar("T")


class OpsError(RuntimeError):
    """The command cannot reach the federation; the message says why and what to do."""


@dataclass
class Federation:
    """A deployed (or local) federation: clients, resource names and stack outputs."""

    stack: str
    session: boto3.session.Session
    outputs: dict[str, str]
    endpoint_url: str | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.outputs.get(LOCAL_OUTPUT) == "true"

    @property
    def region(self) -> str:
        return str(self.session.region_name)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            kwargs: dict[str, Any] = {"config": RETRY_CONFIG}
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            self._clients[service] = self.session.client(service, **kwargs)  # type: ignore[call-overload]
        return self._clients[service]

    @cached_property
    def aws(self) -> AwsClients:
        return AwsClients(s3=self.client("s3"), dynamodb=self.client("dynamodb"))

    @cached_property
    def names(self) -> ResourceNames:
        missing = [o for o in OUTPUT_NAMES.values() if o not in self.outputs]
        if missing:
            raise OpsError(
                f"stack {self.stack!r} has no output(s) {', '.join(missing)}: is it a federation "
                "stack (made by this repository's 'make deploy')?"
            )
        return ResourceNames(**{attr: self.outputs[o] for attr, o in OUTPUT_NAMES.items()})

    @cached_property
    def deployed_config(self) -> FederationConfig:
        """The configuration the functions were deployed with (the initiator's environment)."""
        function = self.output(INITIATOR_OUTPUT)
        response = call(
            "lambda",
            "GetFunctionConfiguration",
            lambda: self.client("lambda").get_function_configuration(FunctionName=function),
        )
        return FederationConfig.from_env(response.get("Environment", {}).get("Variables", {}))

    @property
    def experiment(self) -> str:
        return self.deployed_config.experiment

    def output(self, name: str) -> str:
        value = self.outputs.get(name)
        if not value:
            raise OpsError(f"stack {self.stack!r} has no output {name!r}; redeploy it")
        return value

    @property
    def alarm_names(self) -> list[str]:
        return [n for n in self.outputs.get(ALARMS_OUTPUT, "").split(",") if n]


def connect(
    stack: str | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
) -> Federation:
    """Find the federation stack ``stack`` (default: ``$SFL_STACK`` or ``Sfl-Federation``)."""
    stack = stack or os.environ.get(STACK_ENV) or DEFAULT_STACK
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # botocore reads AWS_DEFAULT_REGION and profiles; the AWS CLI v2 also reads AWS_REGION.
    region = region or os.environ.get("AWS_REGION") or None
    if endpoint_url and local_endpoint.is_local(endpoint_url):
        session, stack = _local_session(endpoint_url, stack, region, profile)
    else:
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except ProfileNotFound as e:
            raise OpsError(f"AWS profile {profile!r} not found in your AWS config: {e}") from e
    if session.region_name is None:
        raise OpsError("no AWS region: set AWS_REGION (or a profile's region), or pass --region")
    kwargs: dict[str, Any] = {"config": RETRY_CONFIG}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    cloudformation = session.client("cloudformation", **kwargs)
    try:
        with translated("cloudformation", "DescribeStacks", endpoint_url):
            stacks = cloudformation.describe_stacks(StackName=stack)["Stacks"]
    except OpsError as e:
        cause = e.__cause__
        if isinstance(cause, ClientError) and error_code(cause) == "ValidationError":
            where = f"at {endpoint_url}" if endpoint_url else f"in region {session.region_name}"
            raise OpsError(
                f"stack {stack!r} not found {where}: deploy it ('make deploy'), name it with "
                f"--stack or ${STACK_ENV}, or for local mode start 'sfl local up' and pass the "
                "--endpoint it prints"
            ) from cause
        raise
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}
    return Federation(stack=stack, session=session, outputs=outputs, endpoint_url=endpoint_url)


def _local_session(
    endpoint_url: str, stack: str, region: str | None, profile: str | None
) -> tuple[boto3.session.Session, str]:
    """A session for the local federation at ``endpoint_url``: the credentials and region
    ``sfl local up`` recorded for it, else (a federation started by other code) the ones
    this shell has. Nothing there is one line."""
    if not local_endpoint.answers(endpoint_url):
        raise OpsError(
            f"nothing answers at {endpoint_url}: is 'sfl local up' still running? (start it "
            "and pass the --endpoint it prints)"
        )
    found = local_endpoint.recorded()
    if found is None or found.endpoint_url.rstrip("/") != endpoint_url.rstrip("/"):
        return boto3.session.Session(profile_name=profile, region_name=region), stack
    # The user's own AWS files stay out of it; credentials come from the loopback endpoint.
    botocore_session = botocore.session.Session()
    botocore_session.set_config_variable("config_file", os.devnull)
    botocore_session.set_config_variable("credentials_file", os.devnull)
    try:
        botocore_session.register_component(
            "credential_provider", CredentialResolver([found.credential_provider()])
        )
        session = boto3.session.Session(
            botocore_session=botocore_session, region_name=region or found.region
        )
        credentials = session.get_credentials()
        if credentials is None:
            raise ValueError("no credentials served")
        credentials.get_frozen_credentials()
    except (BotoCoreError, ValueError) as e:
        raise OpsError(
            f"the local federation at {endpoint_url} did not give credentials ({e}): is "
            "'sfl local up' still running?"
        ) from e
    return session, stack if stack != DEFAULT_STACK else found.stack


def call(service: str, operation: str, fn: Callable[[], T]) -> T:
    """Run one AWS call, turning its failure into an ``OpsError`` that names it."""
    with translated(service, operation, None):
        return fn()


@contextmanager
def translated(service: str, operation: str, endpoint_url: str | None) -> Iterator[None]:
    try:
        yield
    except NoCredentialsError as e:
        raise OpsError(
            "no AWS credentials found: set AWS_PROFILE or run 'aws configure' (or 'aws sso "
            "login'); for local mode, export the variables 'sfl local up' printed"
        ) from e
    except NoRegionError as e:
        raise OpsError("no AWS region: set AWS_REGION or pass --region") from e
    except EndpointConnectionError as e:
        where = endpoint_url or "AWS"
        raise OpsError(
            f"cannot reach {where} ({e}); for local mode, is 'sfl local up' still running?"
        ) from e
    except ClientError as e:
        code = error_code(e)
        if code in {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}:
            raise OpsError(
                f"access denied to {service}:{operation}; docs/operate.md lists the permissions "
                "each command needs"
            ) from e
        if code in {"ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId"}:
            raise OpsError(f"your AWS credentials were refused ({code}); sign in again") from e
        raise OpsError(f"{service} {operation} failed: {code}: {e}") from e
    except BotoCoreError as e:
        raise OpsError(f"{service} {operation} failed: {e}") from e
