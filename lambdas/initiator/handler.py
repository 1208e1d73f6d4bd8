"""Initiator Lambda: start the next round (schedule, manual invoke, or chained after a round).

Zip-packaged with boto3 and Powertools only; nothing it imports pulls in torch.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from sfl.aws import AwsClients, make_clients
from sfl.config import FederationConfig
from sfl.initiator import start_round
from sfl.resources import ResourceNames

logger = Logger(service="sfl-initiator")
metrics = Metrics(namespace="ServerlessFederatedLearning", service="sfl-initiator")


@lru_cache(maxsize=8)
def _services(
    env_key: tuple[tuple[str, str], ...],
) -> tuple[AwsClients, ResourceNames, FederationConfig]:
    env = dict(env_key)
    core_logger = logging.getLogger("sfl")
    if not core_logger.handlers:  # route the core's logs through Powertools' JSON formatter
        for handler in logger.handlers:
            core_logger.addHandler(handler)
        core_logger.setLevel(logger.log_level)
    return make_clients(), ResourceNames.from_env(env), FederationConfig.from_env(env)


def services() -> tuple[AwsClients, ResourceNames, FederationConfig]:
    """Clients, names and config from the environment, built once per distinct environment."""
    keys = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("SFL_") or k in keys))
    return _services(env)


@metrics.log_metrics
@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    aws, names, config = services()
    result = start_round(aws, names, config)
    metrics.add_metric(name="RoundsStarted", unit=MetricUnit.Count, value=int(result.started))
    # 0 when no round is running; alarms fire when a round outlives its hard deadline,
    # which only happens if the averager's watchdog tick is not doing its job
    metrics.add_metric(
        name="OpenRoundAge", unit=MetricUnit.Seconds, value=result.open_for_seconds or 0.0
    )
    logger.info("initiator finished", extra=result.to_dict())
    return result.to_dict()
