"""Local mode signs every request with short-lived credentials from a loopback endpoint that
serves them as Greengrass's token exchange service does: no access keys in code or env."""

from __future__ import annotations

import http.client
import os
from urllib.parse import urlsplit

import pytest

from sfl.local.credentials import TES_PATH, CredentialEndpoint
from sfl.local.emulator import AMBIENT_CREDENTIAL_VARIABLES, LocalAws, lambda_environment
from sfl.local.lambdas import LocalFunction
from tests.conftest import Stack


def _get(url: str, token: str | None) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=5)
    try:
        connection.request("GET", parts.path, headers={"Authorization": token} if token else {})
        return connection.getresponse().status
    finally:
        connection.close()


def test_endpoint_serves_only_the_right_token_on_the_tes_path() -> None:
    with CredentialEndpoint() as endpoint:
        base = endpoint.url.removesuffix(TES_PATH)
        assert _get(endpoint.url, None) == 403
        assert _get(endpoint.url, "wrong-token") == 403
        assert _get(base + "/latest/meta-data/", endpoint.token) == 403
        assert _get(endpoint.url, endpoint.token) == 200
        assert (endpoint.served, endpoint.refused) == (1, 3)


def test_each_endpoint_has_its_own_random_token_and_credentials() -> None:
    with CredentialEndpoint() as a, CredentialEndpoint() as b:
        assert a.token != b.token
        assert a._document()["AccessKeyId"] != b._document()["AccessKeyId"]
        assert a._document()["AccessKeyId"].startswith("ASIA")


def test_local_environment_carries_no_access_keys(local_aws: LocalAws) -> None:
    env = local_aws.env()
    assert not {k for k in env if "KEY" in k or "SESSION_TOKEN" in k or "PROFILE" in k}, env
    assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"].startswith("http://127.0.0.1:")
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == os.devnull


def test_handlers_sign_with_the_endpoint_and_ignore_a_developers_keys(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in AMBIENT_CREDENTIAL_VARIABLES[:3]:
        monkeypatch.setenv(name, "a-developers-own-value")
    served_before = stack.aws.credentials.served

    with lambda_environment(stack.env()):
        assert not {k for k in AMBIENT_CREDENTIAL_VARIABLES if k in os.environ}
        # This stack's names are new, so the handler builds new clients: boto3's default
        # chain must find the credentials endpoint, and the request must reach moto.
        result = LocalFunction("initiator").invoke({"source": "sfl.local"})

    assert "global model version 0 is not in the models bucket" in result["reason"]
    assert stack.aws.credentials.served > served_before
    assert os.environ["AWS_ACCESS_KEY_ID"] == "a-developers-own-value"  # restored afterwards
