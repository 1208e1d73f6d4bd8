"""Shared fixtures: one moto server per test session, a fresh set of resources per test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning import codec
from sfl.local.emulator import LocalAws, LocalDeployment, lambda_environment, provision
from sfl.local.federation import LocalFederation, handler_environment
from sfl.state.aws import AwsClients
from sfl.state.registry import ClientRegistry


@pytest.fixture(scope="session")
def local_aws() -> Iterator[LocalAws]:
    with LocalAws() as aws:
        yield aws


@dataclass
class Stack:
    """A provisioned local stack plus the conveniences tests use to drive it."""

    aws: LocalAws
    deployment: LocalDeployment
    clients: AwsClients
    config: FederationConfig

    @property
    def names(self) -> ResourceNames:
        return self.deployment.names

    def env(self) -> dict[str, str]:
        return handler_environment(self.aws, self.names, self.config)

    def put_model(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        self.clients.s3.put_object(
            Bucket=self.names.models_bucket,
            Key=layout.model_key(version),
            Body=codec.encode_model(tensors, version=version),
        )

    def register(self, *client_ids: str) -> None:
        """Heartbeat as each device would."""
        registry = ClientRegistry(self.clients.dynamodb, self.names.clients_table)
        for cid in client_ids:
            registry.heartbeat(
                cid, now=time.time(), active_window_seconds=self.config.active_window_seconds
            )

    def upload_update(
        self,
        client_id: str,
        round_number: int,
        tensors: dict[str, torch.Tensor],
        *,
        num_examples: int = 10,
        base_version: int = 0,
        metrics: dict[str, float] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        """Upload an update; returns the S3 event the bucket notification would carry."""
        if body is None:
            meta = codec.UpdateMetadata(
                round=round_number,
                client_id=client_id,
                base_version=base_version,
                num_examples=num_examples,
                metrics=metrics or {"loss": 1.0, "accuracy": 0.5},
            )
            body = codec.encode(tensors, meta.to_header())
        key = layout.update_key(client_id, round_number)
        response = self.clients.s3.put_object(Bucket=self.names.updates_bucket, Key=key, Body=body)
        return s3_event(self.names.updates_bucket, key, len(body), response["ETag"])


def s3_event(bucket: str, key: str, size: int, etag: str) -> dict[str, Any]:
    """An S3 ObjectCreated notification in AWS's shape (key URL-encoded, as S3 sends it)."""
    from urllib.parse import quote_plus

    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {
                        "key": quote_plus(key, safe="/"),
                        "size": size,
                        "eTag": etag.strip('"'),
                    },
                },
            }
        ]
    }


TINY_MODEL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
# An update trained from TINY_MODEL: it must differ from the base (an unchanged model is a
# free rider's upload, and rejected).
TRAINED = {name: t * 2.0 for name, t in TINY_MODEL.items()}


def _test_config() -> FederationConfig:
    return FederationConfig(
        experiment="test",
        selection="all",
        round_deadline_seconds=600,
        aggregation_lease_seconds=30,
    )


@pytest.fixture
def stack(local_aws: LocalAws) -> Iterator[Stack]:
    """Fresh resources and the handlers' environment; the test drives the handlers itself."""
    deployment = provision(local_aws)
    stack = Stack(local_aws, deployment, local_aws.clients(), _test_config())
    with lambda_environment(stack.env()):
        yield stack


@pytest.fixture
def federation(local_aws: LocalAws, tmp_path: Path) -> Iterator[LocalFederation]:
    """A running federation (handlers, S3-event delivery, model version 0) on fresh resources."""
    with LocalFederation(
        _test_config(), aws=local_aws, log_path=tmp_path / "lambda-logs.jsonl"
    ) as running:
        yield running
