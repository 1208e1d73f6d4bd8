"""What a Lambda handler needs from its environment, built once per distinct environment.

Shared by both handlers (torch-free, so the initiator's zip can carry it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aws_lambda_powertools import Tracer

from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.state.aws import AwsClients, make_clients

Services = tuple[AwsClients, ResourceNames, FederationConfig]

# The handlers' metrics and log identity; the stack's alarms and environment use the same.
METRICS_NAMESPACE = "ServerlessFederatedLearning"
INITIATOR_SERVICE = "sfl-initiator"
AVERAGER_SERVICE = "sfl-averager"
#: Seconds the newest round has been open, published by the initiator on every run.
OPEN_ROUND_AGE_METRIC = "OpenRoundAge"
#: Clients seen recently, published by the initiator when it counted them.
ACTIVE_DEVICES_METRIC = "ActiveDevices"
#: The new model's accuracy on the held-out set, published by the averager (sfl.server.evaluation).
GLOBAL_ACCURACY_METRIC = "GlobalModelAccuracy"
#: With DP on, the epsilon the experiment has spent after each version (docs/privacy.md).
PRIVACY_EPSILON_METRIC = "PrivacyEpsilon"

# Variables the stack sets beside the ``SFL_*`` names and settings (``ResourceNames``,
# ``FederationConfig``): the functions the averager invokes, by name.
#: The initiator, chained as soon as a round finishes.
INITIATOR_FUNCTION_ENV = "SFL_INITIATOR_FUNCTION"
#: The shard function (``sfl.server.shards``), deployed when ``aggregation_shard_above`` is set.
SHARD_FUNCTION_ENV = "SFL_SHARD_FUNCTION"

# X-Ray (Powertools Tracer on every function, ``Tracing.ACTIVE`` in infra/rounds.py). One round
# is followed across functions by annotations, not by one trace: a device's upload starts the
# averager's trace, so X-Ray's ``annotation.round = 7 AND annotation.experiment = "default"``
# finds the initiator run that opened round 7, every averager invocation that judged one of its
# updates (``annotation.client`` names the device) or closed it, and its shards' invocations.
#: Annotation keys (X-Ray indexes annotations, not metadata).
EXPERIMENT_ANNOTATION = "experiment"
ROUND_ANNOTATION = "round"
CLIENT_ANNOTATION = "client"
#: What an update's judgement ended in (accepted, rejected, duplicate, ignored).
RESULT_ANNOTATION = "result"
#: Which shard of a large round a shard function's invocation summed.
SHARD_ANNOTATION = "shard"
#: The libraries whose calls become subsegments: botocore (every S3, DynamoDB and Lambda call);
#: not the X-Ray SDK's default of all it knows (http.client would trace each call twice).
TRACED_MODULES = ("botocore",)

_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",  # local mode: a new endpoint means new clients
)


@lru_cache(maxsize=8)
def _services(env_key: tuple[tuple[str, str], ...]) -> Services:
    env = dict(env_key)
    return make_clients(), ResourceNames.from_env(env), FederationConfig.from_env(env)


def services() -> Services:
    """Clients, names and config from ``SFL_*`` and the AWS endpoint/region variables."""
    env = tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith("SFL_") or k in _ENV_KEYS)
    )
    return _services(env)


def function_tracer(service: str) -> Tracer:
    """The function's Powertools Tracer, patching :data:`TRACED_MODULES`. Powertools turns it
    off outside Lambda (no ``LAMBDA_TASK_ROOT``: local mode, tests) and when
    ``POWERTOOLS_TRACE_DISABLED`` is true; then nothing is patched or sent."""
    from aws_lambda_powertools import Tracer

    return Tracer(service=service, patch_modules=TRACED_MODULES)


def annotate_round(
    tracer: Tracer,
    experiment: str,
    round_number: int | None,
    *,
    client: str = "",
    result: str = "",
    shard: int | None = None,
) -> None:
    """Put the round's annotations (and an update's client and result, or a shard's index,
    when given) on the tracer's current subsegment."""
    annotations: dict[str, str | int | None] = {
        EXPERIMENT_ANNOTATION: experiment,
        ROUND_ANNOTATION: round_number,
        CLIENT_ANNOTATION: client or None,
        RESULT_ANNOTATION: result or None,
        SHARD_ANNOTATION: shard,
    }
    for key, value in annotations.items():
        if value is not None:
            # Powertools types numbers as numbers.Number, which mypy does not match to int.
            tracer.put_annotation(key, value)  # type: ignore[arg-type]


@contextmanager
def traced(tracer: Tracer, name: str) -> Iterator[None]:
    """A subsegment of the current invocation (one update's judgement, say), which
    :func:`annotate_round` then annotates; a no-op stand-in while tracing is off."""
    with tracer.provider.in_subsegment(name):
        yield
