"""The one price table the cost model reads: list prices per region, each with its source.

Every figure is the published on-demand list price, without free tiers, volume tiers beyond
the first, Savings Plans or credits (so an estimate is an upper bound for a small account).
``source`` says where the figure was read and ``basis`` how sure it is:

- ``"quoted"``: read on a stored copy of the AWS pricing page or on a page quoting it, with
  the date that page states;
- ``"commonly published"``: the machine that wrote this table could not reach AWS's pricing
  pages and found no stored page stating the figure; it is the figure commonly published for
  the region, to be checked against the AWS page named in ``source``.

``read_on`` is the date the figure was entered here. To add a region, copy the us-east-1
block and replace every figure from that region's pricing pages (prices differ by region).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

READ_ON: Final = "2026-11-29"


@dataclass(frozen=True)
class Price:
    """``usd`` dollars per ``per`` ``unit`` (e.g. 0.20 per 1,000,000 requests)."""

    usd: float
    per: float
    unit: str
    source: str
    basis: str  # "quoted" | "commonly published"
    note: str = ""
    read_on: str = READ_ON

    @property
    def unit_price(self) -> float:
        """Dollars for one ``unit``."""
        return self.usd / self.per


_LAMBDA = "https://aws.amazon.com/lambda/pricing/"
_S3 = "https://aws.amazon.com/s3/pricing/"
_DDB = "https://aws.amazon.com/dynamodb/pricing/on-demand/"
_CW = "https://aws.amazon.com/cloudwatch/pricing/"
_DTO = "https://aws.amazon.com/ec2/pricing/on-demand/#Data_Transfer"

US_EAST_1: Final[dict[str, Price]] = {
    # --- Lambda -----------------------------------------------------------------------------
    "lambda_request": Price(
        0.20, 1_000_000, "request",
        f"{_LAMBDA} (as quoted on git.mcrn.ar lambda_local_runner docs, lambda-13-cost.md)",
        "quoted",
    ),
    "lambda_gb_second_x86_64": Price(
        0.0000166667, 1, "GB-second",
        f"{_LAMBDA} (as quoted on cloudchipr.com/blog/aws-lambda-pricing, 2024: first 6 "
        "billion GB-s per month)",
        "quoted",
    ),
    "lambda_gb_second_arm64": Price(
        0.0000133334, 1, "GB-second",
        f"{_LAMBDA} (as quoted on cloudchipr.com/blog/aws-lambda-pricing, 2024: first 7.5 "
        "billion GB-s per month)",
        "quoted",
    ),
    "lambda_ephemeral_gb_second": Price(
        0.0000000309, 1, "GB-second",
        _LAMBDA, "commonly published",
        "ephemeral storage configured above the free 512 MB only",
    ),
    # --- S3 Standard --------------------------------------------------------------------------
    "s3_put_copy_post_list": Price(
        0.005, 1_000, "request",
        f"{_S3} (as quoted on devnotes.tech 'Understanding AWS S3 Pricing')",
        "quoted",
    ),
    "s3_get_select": Price(
        0.0004, 1_000, "request",
        f"{_S3} (as quoted on devnotes.tech 'Understanding AWS S3 Pricing')",
        "quoted",
        "S3 bills every GET, a 304 Not Modified answer to a conditional GET included",
    ),
    "s3_storage_gb_month": Price(
        0.023, 1, "GB-month",
        f"{_S3} (as quoted on cloudburn.io/blog/amazon-s3-pricing, March 2026: first 50 TB)",
        "quoted",
    ),
    # --- DynamoDB on-demand (standard table class) --------------------------------------------
    "dynamodb_write_request_unit": Price(
        0.625, 1_000_000, "WRU",
        f"{_DDB} (as quoted on airbyte.com/data-engineering-resources/dynamodb-pricing)",
        "quoted",
        "the November 2024 on-demand price; one WRU per 1 KB written, two in a transaction",
    ),
    "dynamodb_read_request_unit": Price(
        0.125, 1_000_000, "RRU",
        f"{_DDB} (as quoted on airbyte.com/data-engineering-resources/dynamodb-pricing)",
        "quoted",
        "one RRU per 4 KB strongly consistent, half for eventually consistent, two in a "
        "transaction",
    ),
    "dynamodb_storage_gb_month": Price(
        0.25, 1, "GB-month", _DDB, "commonly published", "the first 25 GB per month are free"
    ),
    "dynamodb_pitr_gb_month": Price(
        0.20, 1, "GB-month", _DDB, "commonly published",
        "continuous backups (point-in-time recovery), on both tables",
    ),
    # --- SQS (the failure queue: a message only when an invocation finally fails) -----------
    "sqs_request": Price(
        0.40, 1_000_000, "request",
        "https://aws.amazon.com/sqs/pricing/", "commonly published", "standard queue",
    ),
    # --- EventBridge --------------------------------------------------------------------------
    "eventbridge_scheduled_rule_event": Price(
        0.0, 1, "event",
        "https://aws.amazon.com/eventbridge/pricing/ (wring.co/blog/aws-eventbridge-pricing-"
        "guide: 'AWS Service Events: Free')",
        "commonly published",
        "a schedule rule on the default bus emits AWS events, which are not charged",
    ),
    # --- CloudWatch ---------------------------------------------------------------------------
    "cloudwatch_logs_ingestion_gb": Price(
        0.50, 1, "GB",
        f"{_CW} (as quoted on factualminds.com CloudWatch pricing, June 2026)",
        "quoted",
        "standard log class; Powertools' EMF metrics arrive as log lines too",
    ),
    "cloudwatch_logs_storage_gb_month": Price(
        0.03, 1, "GB-month", _CW, "commonly published", "archived (stored) logs"
    ),
    "cloudwatch_alarm_month": Price(
        0.10, 1, "alarm-month",
        f"{_CW} (as quoted on c3x.dev aws_cloudwatch_metric_alarm)",
        "quoted",
        "standard resolution, one metric",
    ),
    "cloudwatch_dashboard_month": Price(
        3.00, 1, "dashboard-month",
        f"{_CW} (as quoted on factualminds.com CloudWatch pricing, June 2026)",
        "quoted",
    ),
    "cloudwatch_custom_metric_month": Price(
        0.30, 1, "metric-month",
        f"{_CW} (as quoted on signoz.io/guides/cloudwatch-pricing, February 2026: first 10,000)",
        "quoted",
        "prorated by the hour a metric is published in",
    ),
    # --- Data transfer ------------------------------------------------------------------------
    "data_transfer_out_internet_gb": Price(
        0.09, 1, "GB",
        f"{_DTO} (as quoted on wring.co/blog/aws-data-transfer-pricing-guide, 2026: up to "
        "10 TB per month)",
        "quoted",
        "devices download models over the internet; the first 100 GB per month are free",
    ),
    "data_transfer_in_gb": Price(
        0.0, 1, "GB",
        "https://aws.amazon.com/about-aws/global-infrastructure/global-network/faqs",
        "quoted",
        "'When your resources on the public internet send data into resources residing "
        "within AWS, there is no charge'",
    ),
    "data_transfer_s3_lambda_same_region_gb": Price(
        0.0, 1, "GB",
        "https://aws.amazon.com/about-aws/global-infrastructure/global-network/faqs (and "
        "wring.co/blog/aws-data-transfer-pricing-guide, 2026: 'S3 -> Same-region services: "
        "Free')",
        "quoted",
        "S3 to Lambda in the same region is not charged",
    ),
    # --- IoT Core (round notices) --------------------------------------------------------------
    "iot_core_message": Price(
        1.00, 1_000_000, "messages",
        "https://aws.amazon.com/iot-core/pricing/ (metering rules quoted from "
        "https://aws.amazon.com/iot-core/pricing/additional-details/: messages are metered in "
        "5 KB increments; 'MQTT PUBLISH (sent by service)' is metered; 'MQTT PUBACK (received "
        "from device)' is metered as a single 5 KB message unless MQTT5; PUBACK sent by the "
        "service, SUBACK, PINGREQ/PINGRESP are not)",
        "commonly published",
        "first billion messages a month; an HTTP publish to the data plane is metered by its "
        "body, in 5 KB messages",
    ),
    "iot_core_connection_minute": Price(
        0.08, 1_000_000, "connection-minutes",
        "https://aws.amazon.com/iot-core/pricing/ ('Connectivity is metered in one-minute "
        "increments and is based on the total time your devices are connected')",
        "commonly published",
        "a Greengrass core device holds its connection whether or not it hears notices",
    ),
    # --- Greengrass, ECR ------------------------------------------------------------------------
    "greengrass_core_device_month": Price(
        0.16, 1, "active core device-month",
        "https://aws.amazon.com/greengrass/pricing/ (the stored page confirms billing per core "
        "device that connects in a month; the figure is not in the stored copy)",
        "commonly published",
        "a device is billed in a month it authenticates with AWS; first 10,000 devices",
    ),
    "kms_key_month": Price(
        1.00, 1, "key-month",
        "https://aws.amazon.com/kms/pricing/ (stored copy: each KMS key you create costs "
        "$1/month; none while scheduled for deletion)",
        "quoted",
        "the updates bucket's customer-managed key; each yearly rotation's new key material "
        "adds $1/month (the first two, since April 2024); requests $0.03 per 10,000 beyond "
        "20,000 free a month, few with an S3 Bucket Key",
        read_on="2026-12-08",
    ),
    "ecr_storage_gb_month": Price(
        0.10, 1, "GB-month",
        "https://aws.amazon.com/ecr/pricing/ (as quoted on cloudburn.io/blog/amazon-ecr-"
        "pricing, March 2026)",
        "quoted",
        "the averager's image (compressed layers); pulls in the same region are free",
    ),
}  # fmt: skip

#: Region -> price name -> price. A region missing here has no estimate (NoPricesError).
PRICES: Final[dict[str, dict[str, Price]]] = {"us-east-1": US_EAST_1}
