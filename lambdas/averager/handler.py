"""Averager Lambda: accept client updates (S3 events) and aggregate rounds that reach quorum.

Also takes ``{"sfl": "tick"}`` (the schedule's watchdog: deadlines, expired leases) and
``{"sfl": "bootstrap"}`` (write global model version 0 if it is missing). Bad updates are
recorded and answered with a result; only AWS errors raise, so Lambda retries those.

``shard_handler`` is the shard function's entry point (same image, its own function and
role): it sums one shard of a large round and writes the partial sum once (``sfl.server.shards``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from sfl.core.events import BOOTSTRAP, TICK, control_action
from sfl.server.answers import UpdateOutcome, UpdateResult
from sfl.server.averager import Averager, bootstrap_model
from sfl.server.evaluation import after_buffer, after_round
from sfl.server.notifications import s3_updates
from sfl.server.runtime import (
    AVERAGER_SERVICE,
    GLOBAL_ACCURACY_METRIC,
    INITIATOR_FUNCTION_ENV,
    METRICS_NAMESPACE,
    PRIVACY_EPSILON_METRIC,
    SHARD_FUNCTION_ENV,
    annotate_round,
    function_tracer,
    services,
    traced,
)
from sfl.server.shards import Invoker, Shard, lambda_invoker, sum_shard
from sfl.state.aws import RETRY_CONFIG
from sfl.state.buffers import Buffer
from sfl.state.rounds import Round, RoundState

logger = Logger(service=AVERAGER_SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=AVERAGER_SERVICE)
# X-Ray: the S3, DynamoDB and Lambda calls, one subsegment per update judged, annotated with
# the round (and the update's client and result).
tracer = function_tracer(AVERAGER_SERVICE)
# The framework's (sfl.*) records go out through this logger's handler, format and level.
copy_config_to_registered_loggers(source_logger=logger, include={"sfl"})


def deployed_shard_invoker() -> Invoker | None:
    """The shard function the stack deployed (``SFL_SHARD_FUNCTION``), its client made once
    per container; None when the stack deployed none."""
    function = os.environ.get(SHARD_FUNCTION_ENV)
    return _lambda_invoker(function) if function else None


_lambda_invoker = cache(lambda_invoker)

#: How this function has a large round's shards summed. Local mode, which runs this module
#: in-process, sets its own in-process call when it loads it (``sfl.local.lambdas``).
shard_invoker: Callable[[], Invoker | None] = deployed_shard_invoker


def chain_initiator(finished: Round) -> None:
    """Start the next round right away instead of waiting for the schedule."""
    function = os.environ.get(INITIATOR_FUNCTION_ENV)
    if not function:
        return
    boto3.client("lambda", config=RETRY_CONFIG).invoke(
        FunctionName=function,
        InvocationType="Event",
        Payload=json.dumps(
            {"source": "sfl.server.averager", "finished_round": finished.round}
        ).encode(),
    )


def chain_initiator_for_places(freed: list[int]) -> None:
    """Buffered mode: fill the training places this invocation freed right away (one
    initiator invocation however many tickets ended)."""
    function = os.environ.get(INITIATOR_FUNCTION_ENV)
    if not function or not freed:
        return
    boto3.client("lambda", config=RETRY_CONFIG).invoke(
        FunctionName=function,
        InvocationType="Event",
        Payload=json.dumps({"source": "sfl.server.averager", "ended_tickets": freed}).encode(),
    )


def score_new_model(made: Round | Buffer) -> None:
    """Score and record a new model version, a closed round's or a buffer's
    (``sfl.server.evaluation``: held-out accuracy, lineage). Scoring never fails the
    invocation: the round or buffer is closed already, and a retried event would not score
    it again."""
    aws, names, config = services()
    try:
        if isinstance(made, Buffer):
            scores = after_buffer(aws, names, config, made)
        else:
            scores = after_round(aws, names, config, made)
    except Exception:
        logger.exception("recording the new model's evaluation and lineage failed")
        metrics.add_metric(name="EvaluationFailures", unit=MetricUnit.Count, value=1)
    else:
        if scores is not None and isinstance(scores.get("accuracy"), float):
            metrics.add_metric(
                name=GLOBAL_ACCURACY_METRIC, unit=MetricUnit.NoUnit, value=scores["accuracy"]
            )


# Responses name clients and reasons: they stay in the log lines, not in the trace.
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    aws, names, config = services()
    freed: list[int] = []
    averager = Averager(
        aws,
        names,
        config,
        invoke_shard=shard_invoker(),
        on_round_finished=(score_new_model, chain_initiator),
        on_version=(score_new_model,),
        on_place_freed=(freed.append,),
    )
    try:
        return _handle(averager, event)
    finally:
        chain_initiator_for_places(freed)


def _handle(averager: Averager, event: dict[str, Any]) -> dict[str, Any]:
    """One invocation's work: bootstrap, the tick, or its S3 records."""
    aws, names, config = services()
    action = control_action(event)
    if action == BOOTSTRAP:
        from sfl.learning.tasks import configured_task

        model = configured_task(config).build_model(seed=config.seed)
        wrote = bootstrap_model(aws, names, model.state_dict(), seed=config.seed)
        return {"bootstrap": "written" if wrote else "already present"}
    if action == TICK:
        tick = averager.tick()
        annotate_round(tracer, config.experiment, tick.round)
        if tick.finished is not None:
            record_round_metrics(tick.finished)
        recovered = tick.details.get("recovered", [])
        if recovered:
            metrics.add_metric(name="UpdatesRecovered", unit=MetricUnit.Count, value=len(recovered))
        return {"tick": tick.action, "round": tick.round, "status": tick.status}
    if action is not None:
        raise ValueError(f"unknown control event {action!r}; expected {TICK!r} or {BOOTSTRAP!r}")

    outcomes = []
    for update in s3_updates(event):
        logger.append_keys(key=update.key)
        with traced(tracer, "## update"):
            outcome = averager.handle_update(update)
            annotate_round(
                tracer,
                config.experiment,
                outcome.round,
                client=outcome.client_id,
                result=outcome.result.value,
            )
        outcomes.append(outcome)
        record_update_metrics(outcome)
        if outcome.finished is not None:
            record_round_metrics(outcome.finished)
    logger.remove_keys(["key"])
    return {"outcomes": [o.to_dict() for o in outcomes]}


@tracer.capture_lambda_handler(capture_response=False)
@logger.inject_lambda_context
def shard_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Sum one shard of a round's updates (invoked by the averager that holds the lease)."""
    aws, names, config = services()
    shard = Shard.from_event(event)
    logger.append_keys(round=shard.round, shard=shard.index)
    annotate_round(tracer, shard.experiment, shard.round, shard=shard.index)
    averager = Averager(aws, names, config)
    return sum_shard(
        aws.s3,
        names.updates_bucket,
        names.models_bucket,
        averager.base_model(shard.base_version),
        averager.base_header(shard.base_version),
        shard,
    )


def record_update_metrics(outcome: UpdateOutcome) -> None:
    if outcome.result is UpdateResult.ACCEPTED:
        metrics.add_metric(name="UpdatesAccepted", unit=MetricUnit.Count, value=1)
    elif outcome.result is UpdateResult.DUPLICATE:
        metrics.add_metric(name="DuplicateDeliveries", unit=MetricUnit.Count, value=1)
    elif outcome.result is UpdateResult.REJECTED:
        metrics.add_metric(name="UpdatesRejected", unit=MetricUnit.Count, value=1)
        # One extra data point per reason, so alarms and dashboards can split by it: its own
        # metric set (a dimension of its own), flushed now; honours POWERTOOLS_METRICS_DISABLED.
        by_reason = EphemeralMetrics(namespace=metrics.namespace, service=metrics.service)
        by_reason.add_dimension(name="reason", value=outcome.reason.split(":")[0])
        by_reason.add_metric(name="UpdatesRejectedByReason", unit=MetricUnit.Count, value=1)
        by_reason.flush_metrics()


def record_round_metrics(finished: Round) -> None:
    name = "RoundsClosed" if finished.status is RoundState.CLOSED else "RoundsAbandoned"
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
    if finished.finished_at is not None:
        metrics.add_metric(
            name="RoundDuration",
            unit=MetricUnit.Seconds,
            value=finished.finished_at - finished.created_at,
        )
    summary = finished.summary
    if "aggregate_seconds" in summary:
        metrics.add_metric(
            name="AggregationTime", unit=MetricUnit.Seconds, value=summary["aggregate_seconds"]
        )
        metrics.add_metric(name="UpdateBytes", unit=MetricUnit.Bytes, value=summary["bytes_up"])
        metrics.add_metric(name="ModelBytes", unit=MetricUnit.Bytes, value=summary["model_bytes"])
        metrics.add_metric(
            name="Participants", unit=MetricUnit.Count, value=summary["participants"]
        )
    spent = summary.get("privacy") or {}
    if isinstance(spent.get("epsilon"), int | float):  # DP on: what the experiment has spent
        metrics.add_metric(
            name=PRIVACY_EPSILON_METRIC, unit=MetricUnit.NoUnit, value=float(spent["epsilon"])
        )
