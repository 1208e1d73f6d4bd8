"""The federation's CloudWatch dashboard: rounds, participants, rejections, aggregation,
global-model accuracy, the functions' errors and throttles, active devices.

Every metric is one the handlers publish (namespace ``sfl.server.runtime.METRICS_NAMESPACE``,
dimension ``service``) or one Lambda publishes for the two functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from sfl.server.runtime import (
    ACTIVE_DEVICES_METRIC,
    AVERAGER_SERVICE,
    GLOBAL_ACCURACY_METRIC,
    INITIATOR_SERVICE,
    METRICS_NAMESPACE,
    PRIVACY_EPSILON_METRIC,
)

PERIOD = Duration.minutes(5)


def federation_metric(
    name: str, service: str, statistic: str = "Sum", label: str | None = None
) -> cloudwatch.Metric:
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name,
        dimensions_map={"service": service},
        statistic=statistic,
        period=PERIOD,
        label=label or name,
    )


class FederationDashboard(Construct):
    """One dashboard; ``dashboard`` is the CloudWatch resource, ``url`` its console address.
    (The alarms' states are on the CloudWatch alarms page and in ``sfl status``.)"""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        initiator: lambda_.IFunction,
        averager: lambda_.IFunction,
        region: str,
    ) -> None:
        super().__init__(scope, construct_id)

        def averager_metric(
            name: str, statistic: str = "Sum", label: str | None = None
        ) -> cloudwatch.Metric:
            return federation_metric(name, AVERAGER_SERVICE, statistic, label)

        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.days(1))
        rejections_by_reason = cloudwatch.MathExpression(
            expression=(
                f"SEARCH('{{{METRICS_NAMESPACE},reason,service}} "
                f"MetricName=\"UpdatesRejectedByReason\"', 'Sum', 300)"
            ),
            label="",
            period=PERIOD,
            using_metrics={},
        )
        self.dashboard.add_widgets(
            _graph(
                "Rounds closed and abandoned",
                [averager_metric("RoundsClosed"), averager_metric("RoundsAbandoned")],
                stacked=True,
            ),
            _graph(
                "Round duration (s)",
                [
                    averager_metric("RoundDuration", "Average"),
                    averager_metric("RoundDuration", "Maximum", "max"),
                ],
            ),
            _graph(
                "Participants and active devices",
                [
                    averager_metric("Participants", "Average"),
                    federation_metric(ACTIVE_DEVICES_METRIC, INITIATOR_SERVICE, "Maximum"),
                ],
            ),
        )
        self.dashboard.add_widgets(
            _graph(
                "Updates accepted, rejected, duplicate",
                [
                    averager_metric("UpdatesAccepted"),
                    averager_metric("UpdatesRejected"),
                    averager_metric("DuplicateDeliveries"),
                    averager_metric("UpdatesRecovered"),
                ],
            ),
            _graph("Rejections by reason", [rejections_by_reason], stacked=True),
            _graph(
                "Global model accuracy (held-out set)",
                [averager_metric(GLOBAL_ACCURACY_METRIC, "Average", "accuracy")],
                left_max=1.0,
            ),
            _graph(
                "Privacy spent (epsilon, with DP on)",
                [averager_metric(PRIVACY_EPSILON_METRIC, "Maximum", "epsilon")],
            ),
        )
        self.dashboard.add_widgets(
            _graph(
                "Aggregation time (s)",
                [
                    averager_metric("AggregationTime", "Average"),
                    averager_metric("AggregationTime", "Maximum", "max"),
                ],
            ),
            _graph(
                "Bytes per round",
                [averager_metric("UpdateBytes"), averager_metric("ModelBytes")],
            ),
            _graph(
                "Lambda errors and throttles",
                [
                    initiator.metric_errors(period=PERIOD, label="initiator errors"),
                    averager.metric_errors(period=PERIOD, label="averager errors"),
                    initiator.metric_throttles(period=PERIOD, label="initiator throttles"),
                    averager.metric_throttles(period=PERIOD, label="averager throttles"),
                    averager_metric("EvaluationFailures"),
                ],
            ),
        )
        self.url = (
            f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
            f"#dashboards:name={self.dashboard.dashboard_name}"
        )


def _graph(
    title: str,
    metrics: Sequence[cloudwatch.IMetric],
    *,
    stacked: bool = False,
    left_max: float | None = None,
) -> cloudwatch.GraphWidget:
    return cloudwatch.GraphWidget(
        title=title,
        left=list(metrics),
        width=8,
        height=6,
        stacked=stacked,
        left_y_axis=cloudwatch.YAxisProps(min=0, max=left_max),
    )
