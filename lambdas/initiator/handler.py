"""Initiator Lambda: start the next round (schedule, manual invoke, or chained after a round).

Zip-packaged with boto3, Powertools and the X-Ray SDK only; nothing it imports pulls in torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from sfl.server.initiator import start_round
from sfl.server.notices import NoticePublisher, deployed_notice_publisher
from sfl.server.runtime import (
    ACTIVE_DEVICES_METRIC,
    INITIATOR_SERVICE,
    METRICS_NAMESPACE,
    OPEN_ROUND_AGE_METRIC,
    annotate_round,
    function_tracer,
    services,
)

logger = Logger(service=INITIATOR_SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=INITIATOR_SERVICE)
# X-Ray: this run's S3, DynamoDB and Lambda calls, annotated with the round it opened or found.
tracer = function_tracer(INITIATOR_SERVICE)
# The framework's (sfl.*) records go out through this logger's handler, format and level.
copy_config_to_registered_loggers(source_logger=logger, include={"sfl"})

#: How this function pushes round notices: IoT Core's data plane on the stack's topic. Local
#: mode, which runs this module in-process, sets its own broker's publisher while it runs.
notice_publisher: Callable[[], NoticePublisher | None] = deployed_notice_publisher


# The response (every selected client) stays in the log line, not in the trace.
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    aws, names, config = services()
    result = start_round(aws, names, config, notices=notice_publisher())
    annotate_round(tracer, config.experiment, result.round)
    metrics.add_metric(name="RoundsStarted", unit=MetricUnit.Count, value=int(result.started))
    # 0 when no round is running; alarms fire when a round outlives its hard deadline,
    # which only happens if the averager's watchdog tick is not doing its job
    metrics.add_metric(
        name=OPEN_ROUND_AGE_METRIC, unit=MetricUnit.Seconds, value=result.open_for_seconds or 0.0
    )
    if result.active_clients is not None:
        metrics.add_metric(
            name=ACTIVE_DEVICES_METRIC, unit=MetricUnit.Count, value=result.active_clients
        )
    logger.info("initiator finished", extra=result.to_dict())
    return result.to_dict()
