"""What a round, an idle day and a connected fleet cost on AWS, in dollars.

Three steps, each a pure function: ``usage_for_round`` turns what a round measured
(:class:`RoundFigures`) into counts of billed units (:class:`RoundUsage`); ``estimate``
prices those counts with the one price table (:mod:`sfl.core.prices`); ``round_cost_summary`` is
the small dict the averager stores on the round and ``sfl simulate`` writes to history.json.
Buffered mode's versions take the same three steps (``usage_for_version`` from
:class:`VersionFigures`, ``version_cost_summary``), sharing every count the two share.
Torch-free: the averager, the CLI and the tests all import it.

Every count the round does not measure is an assumption named in :class:`CostAssumptions`
and documented in docs/cost.md. A daily bill is ``idle_day + fleet_day + rounds x round``:
the per-round figure is the marginal cost of one round (no schedule ticks, which run whether
or not a round does, and no idle polls or heartbeats, which the fleet pays per day).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sfl.core import lambda_shapes
from sfl.core.lambda_shapes import FunctionShape
from sfl.core.prices import PRICES, Price

GB = 1024**3
DAYS_PER_MONTH = 730 / 24  # AWS bills a month as 730 hours
_WRITE_UNIT = 1024  # DynamoDB bytes per write request unit
_READ_UNIT = 4096  # DynamoDB bytes per (strongly consistent) read request unit
DYNAMODB_ITEM_LIMIT = 400 * 1024  # DynamoDB's maximum item size


class NoPricesError(ValueError):
    """The price table has no prices for this region: no estimate rather than a wrong one."""


def prices_for(region: str) -> Mapping[str, Price]:
    try:
        return PRICES[region]
    except KeyError:
        raise NoPricesError(
            f"no prices for region {region!r}: the price table (sfl/core/prices.py) has "
            f"{', '.join(sorted(PRICES))}; add the region's prices there to estimate it"
        ) from None


def stack_region(env: Mapping[str, str] | None = None, default: str = "us-east-1") -> str:
    """The region the stack runs in: Lambda sets AWS_REGION; the CLI falls back to the
    profile's AWS_DEFAULT_REGION, then ``default``."""
    env = os.environ if env is None else env
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or default


@dataclass(frozen=True)
class StackShape:
    """What the stack is built with that the bill depends on (defaults: the stack's own)."""

    region: str = "us-east-1"
    initiator: FunctionShape = lambda_shapes.INITIATOR
    averager: FunctionShape = lambda_shapes.AVERAGER
    schedule_minutes: int = 5
    log_retention_days: int = 30
    update_expiry_days: int = 30
    poll_seconds: float = 10.0
    heartbeat_seconds: float = 60.0
    # Round notices (push): devices subscribed to the stack's notice topic poll and heartbeat
    # at these slower periods; False prices the fleet as polling alone.
    push: bool = True
    push_poll_seconds: float = 300.0
    push_heartbeat_seconds: float = 600.0
    # infra/stack.py _alarms: errors and throttles of both functions, DLQ, overdue round
    alarms: int = 6
    dashboards: int = 1
    # infra/storage.py: the updates bucket's customer-managed key
    kms_keys: int = 1

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> StackShape:
        """Inside a deployed function: its region and (for the averager) its own memory from
        the variables Lambda sets; the initiator's memory from SFL_INITIATOR_MEMORY_MB if the
        stack passes it, else the stack's default."""
        env = os.environ if env is None else env
        averager_mb = int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE") or cls.averager.memory_mb)
        initiator_mb = int(env.get("SFL_INITIATOR_MEMORY_MB") or cls.initiator.memory_mb)
        return cls(
            region=stack_region(env),
            initiator=dataclasses.replace(cls.initiator, memory_mb=initiator_mb),
            averager=dataclasses.replace(cls.averager, memory_mb=averager_mb),
        )


@dataclass(frozen=True)
class CostAssumptions:
    """Counts a round does not measure, each a stated guess (docs/cost.md explains each)."""

    # Lambda durations when the round did not measure them.
    update_handling_seconds: float = 0.3  # one S3 event: read round, GET + validate, write
    initiator_seconds: float = 0.5  # a chained start beyond the measured selection time
    # Cold starts per round and their billed INIT time (Lambda bills INIT since August 2025).
    averager_cold_starts: int = 1
    averager_init_seconds: float = 3.0  # torch import in the container image
    initiator_cold_starts: int = 1
    initiator_init_seconds: float = 0.5
    # CloudWatch Logs bytes per invocation (Lambda's START/END/REPORT + Powertools JSON + EMF).
    log_bytes_per_update: int = 1_500
    log_bytes_per_aggregation: int = 4_000
    log_bytes_per_initiator: int = 2_000
    # DynamoDB item sizes.
    round_item_base_bytes: int = 1_500  # round number, config, deadlines, summary
    selected_id_bytes: int = 40  # one selected client id in the round item
    answer_bytes: int = 450  # one answer inside the round item (today's protocol)
    answer_item_bytes: int = 500  # one answer in its own item (answers-table protocol)
    client_item_bytes: int = 300  # one registry item, read by the initiator's scan
    # Buffered mode: a ticket, its training place and a buffer member are answer-sized items.
    pool_item_bytes: int = 1_000  # the pool: counters and the counts per reason
    buffer_item_bytes: int = 1_500  # a buffer with its closing summary
    # Where answers live: False (this protocol) = each client's slot item, one
    # TransactWriteItems (answer + counters on the round) per answer; True = inside the round
    # item as before issue #11 (each write rewrote the whole item), kept for comparison.
    answers_in_round_item: bool = False
    selected_in_round_item: bool = False
    # Small objects devices fetch.
    assignment_bytes: int = 1_000
    poll_response_bytes: int = 300  # a 304 Not Modified answer to the conditional GET
    # A heartbeat rewrites last_seen, the sort key of the registry's active index: one write
    # to the item and one to the index (DynamoDB bills a GSI's writes like the table's).
    heartbeat_index_writes: int = 1
    # A round notice: IoT Core meters its delivery to each subscribed device and, at QoS 1
    # over MQTT 3.1.1, the device's PUBACK as one more message; the initiator's HTTP publish
    # is one message (its body is under 5 KB).
    messages_per_notice_delivery: int = 2
    messages_per_notice_publish: int = 1


@dataclass(frozen=True)
class RoundFigures:
    """What one round measured (the round record and its summary hold all of it)."""

    selected: int
    accepted: int
    model_bytes: int
    rejected: int = 0  # answers judged and refused: downloaded, validated, recorded
    other_rejections: int = 0  # late, duplicate, not selected: no download, one write
    candidates: int = 0  # registry items the initiator read (0: as many as selected)
    update_bytes: int = 0  # all answers' bytes (0: every answer as big as the model)
    bytes_to_devices: int = 0  # measured model downloads (0: every selected device, once)
    aggregate_seconds: float = 0.0
    update_handling_seconds: float | None = None  # summed over update events; None: assumed
    initiator_seconds: float | None = None  # None: measured selection + assumed rest
    select_seconds: float = 0.0
    stateful_rule: bool = False  # FedAdam & co. read and write server state


@dataclass(frozen=True)
class PoolCounts:
    """What buffered mode's pool has counted since it opened (the pool item's counters, each
    grown by the write that does the thing it counts): a version is charged with the
    difference between these at its step and at the step of the version before it."""

    issue_runs: int = 0  # ticketing runs that issued tickets (one issue transaction each)
    issued: int = 0  # tickets
    candidates: int = 0  # registry items those runs read
    select_seconds: float = 0.0  # those runs' measured time up to the issue
    answered: int = 0  # answers recorded: accepted + rejected + declined
    accepted: int = 0
    rejected: int = 0  # judged and refused (too_stale among them)
    declined: int = 0
    expired: int = 0  # tickets whose lease passed without an answer
    answer_bytes: int = 0  # every recorded answer's object
    handling_seconds: float = 0.0  # the averager's measured judging time, summed

    def since(self, earlier: PoolCounts) -> PoolCounts:
        """What was counted after ``earlier`` (each counter only grows; seconds to the
        microsecond the pool adds them in)."""
        values: dict[str, Any] = {
            f.name: max(f.default, round(getattr(self, f.name) - getattr(earlier, f.name), 6))
            for f in dataclasses.fields(self)
        }
        return PoolCounts(**values)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PoolCounts:
        """Counts as a buffer's summary or the pool item stored them; a counter missing is 0
        (its default's type: a count or seconds)."""
        values: dict[str, Any] = {
            f.name: (float if isinstance(f.default, float) else int)(d.get(f.name) or 0)
            for f in dataclasses.fields(cls)
        }
        return cls(**values)


@dataclass(frozen=True)
class VersionFigures:
    """What one buffered version caused: what the pool counted since the version before
    it (``counts``) and what its own step read and wrote (its buffer's summary)."""

    model_bytes: int
    counts: PoolCounts = PoolCounts()
    members: int = 0  # updates the step read (its buffer's)
    member_bytes: int = 0  # their bytes
    base_versions: int = 0  # distinct versions they trained from, each read by the step
    aggregate_seconds: float = 0.0
    stateful_rule: bool = False


@dataclass(frozen=True)
class LambdaUsage:
    function: str
    architecture: str
    memory_mb: int
    invocations: int
    seconds: float

    @property
    def gb_seconds(self) -> float:
        return self.memory_mb / 1024 * self.seconds


@dataclass(frozen=True)
class RoundUsage:
    """Billed units of one round (or one idle day, or one fleet day)."""

    lambdas: tuple[LambdaUsage, ...] = ()
    s3_put_requests: int = 0  # PUT, COPY, POST, LIST
    s3_get_requests: int = 0  # GET, HEAD, SELECT
    s3_gb_months: float = 0.0
    dynamodb_rru: float = 0.0
    dynamodb_wru: float = 0.0
    dynamodb_gb_months: float = 0.0  # storage + point-in-time recovery
    log_bytes: int = 0
    log_gb_months: float = 0.0
    custom_metric_months: float = 0.0
    alarm_months: float = 0.0
    dashboard_months: float = 0.0
    ecr_gb_months: float = 0.0
    kms_key_months: float = 0.0
    greengrass_device_months: float = 0.0
    iot_messages: float = 0.0  # IoT Core messages (round notices)
    iot_connection_minutes: float = 0.0  # devices' MQTT connections to IoT Core
    bytes_out_internet: int = 0  # S3 -> devices
    bytes_in_internet: int = 0  # devices -> S3 (free)
    bytes_s3_to_lambda: int = 0  # within the region (free)


@dataclass(frozen=True)
class RoundCost:
    """Dollars per line item (every line the table prices, zeros included) and the total."""

    region: str
    items: Mapping[str, float]
    total: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", math.fsum(self.items.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "usd": self.total, "items": dict(self.items)}


def estimate(usage: RoundUsage, prices: Mapping[str, Price], region: str = "") -> RoundCost:
    """Price ``usage`` with ``prices`` (one region's table)."""

    def p(name: str) -> float:
        return prices[name].unit_price

    items: dict[str, float] = {
        "lambda_requests": sum(f.invocations for f in usage.lambdas) * p("lambda_request")
    }
    for f in usage.lambdas:
        items[f"lambda_compute_{f.function}"] = f.gb_seconds * p(
            f"lambda_gb_second_{f.architecture}"
        )
    items |= {
        "s3_put_requests": usage.s3_put_requests * p("s3_put_copy_post_list"),
        "s3_get_requests": usage.s3_get_requests * p("s3_get_select"),
        "s3_storage": usage.s3_gb_months * p("s3_storage_gb_month"),
        "dynamodb_writes": usage.dynamodb_wru * p("dynamodb_write_request_unit"),
        "dynamodb_reads": usage.dynamodb_rru * p("dynamodb_read_request_unit"),
        "dynamodb_storage": usage.dynamodb_gb_months
        * (p("dynamodb_storage_gb_month") + p("dynamodb_pitr_gb_month")),
        "cloudwatch_logs": usage.log_bytes / GB * p("cloudwatch_logs_ingestion_gb")
        + usage.log_gb_months * p("cloudwatch_logs_storage_gb_month"),
        "cloudwatch_metrics": usage.custom_metric_months * p("cloudwatch_custom_metric_month"),
        "cloudwatch_alarms": usage.alarm_months * p("cloudwatch_alarm_month"),
        "cloudwatch_dashboards": usage.dashboard_months * p("cloudwatch_dashboard_month"),
        "ecr_storage": usage.ecr_gb_months * p("ecr_storage_gb_month"),
        "kms_keys": usage.kms_key_months * p("kms_key_month"),
        "greengrass_devices": usage.greengrass_device_months * p("greengrass_core_device_month"),
        "iot_messages": usage.iot_messages * p("iot_core_message"),
        "iot_connectivity": usage.iot_connection_minutes * p("iot_core_connection_minute"),
        "data_transfer_out": usage.bytes_out_internet / GB * p("data_transfer_out_internet_gb"),
        "data_transfer_in": usage.bytes_in_internet / GB * p("data_transfer_in_gb"),
        "data_transfer_s3_to_lambda": usage.bytes_s3_to_lambda
        / GB
        * p("data_transfer_s3_lambda_same_region_gb"),
    }
    return RoundCost(region=region, items=items)


def _wru(size: int, *, transactional: bool = False) -> int:
    return max(1, math.ceil(size / _WRITE_UNIT)) * (2 if transactional else 1)


def _rru(size: int, *, strong: bool = True) -> float:
    return max(1, math.ceil(size / _READ_UNIT)) * (1.0 if strong else 0.5)


def round_item_bytes(selected: int, answers: int, a: CostAssumptions) -> int:
    """The round item's size with ``answers`` recorded in it."""
    size = a.round_item_base_bytes
    if a.selected_in_round_item:
        size += selected * a.selected_id_bytes
    if a.answers_in_round_item:
        size += answers * a.answer_bytes
    return size


@dataclass
class _Tally:
    """Requests, read and write units, bytes and log lines, as a usage function counts them
    (the parts both modes share add to it)."""

    gets: int = 0
    puts: int = 0
    rru: float = 0.0
    wru: float = 0.0
    bytes_out: int = 0  # to devices, over the internet
    bytes_to_lambda: int = 0  # S3 -> the averager, in region
    log_bytes: int = 0

    def registry_read(self, candidates: int, a: CostAssumptions) -> None:
        """The initiator reads ``candidates`` registry items (strongly consistent)."""
        self.rru += max(1, math.ceil(candidates * a.client_item_bytes / _READ_UNIT))

    def devices_picked(
        self, picks: int, model_bytes: int, measured: int, a: CostAssumptions
    ) -> None:
        """Every picked device fetches the assignment and the model once (``measured``: the
        model bytes they reported downloading, 0 for one model each)."""
        self.gets += 2 * picks
        self.bytes_out += (measured or picks * model_bytes) + picks * a.assignment_bytes

    def registry_counted(self, clients: int, a: CostAssumptions) -> None:
        """Each picked client's pick folded into its registry item (GetItem + UpdateItem)."""
        self.rru += clients * _rru(a.client_item_bytes)
        self.wru += clients * _wru(a.client_item_bytes)

    def containers(self, model_bytes: int, a: CostAssumptions) -> None:
        """Each averager container reads the base model's header (2 ranges) and the model."""
        self.gets += 3 * a.averager_cold_starts
        self.bytes_to_lambda += a.averager_cold_starts * model_bytes

    def version_written(self, stateful_rule: bool) -> None:
        """The new version and its lineage written, the evaluation data read (HEAD + GET);
        a stateful rule's state read and written beside it."""
        self.gets += 2
        self.puts += 2
        if stateful_rule:
            self.gets += 1
            self.puts += 1

    def usage(
        self,
        shape: StackShape,
        a: CostAssumptions,
        *,
        initiator_runs: int,
        initiator_seconds: float,
        averager_invocations: int,
        averager_seconds: float,
        update_bytes: int,
    ) -> RoundUsage:
        """The billed units: both functions' runs with the assumed cold starts (none for a
        function that did not run), the updates kept until they expire, the logs kept."""
        initiator_colds = a.initiator_cold_starts if initiator_runs else 0
        averager_colds = a.averager_cold_starts if averager_invocations else 0
        lambdas = (
            LambdaUsage(
                "initiator",
                shape.initiator.architecture,
                shape.initiator.memory_mb,
                initiator_runs,
                initiator_seconds + initiator_colds * a.initiator_init_seconds,
            ),
            LambdaUsage(
                "averager",
                shape.averager.architecture,
                shape.averager.memory_mb,
                averager_invocations,
                averager_seconds + averager_colds * a.averager_init_seconds,
            ),
        )
        months_kept = shape.update_expiry_days / DAYS_PER_MONTH
        return RoundUsage(
            lambdas=lambdas,
            s3_put_requests=self.puts,
            s3_get_requests=self.gets,
            s3_gb_months=update_bytes / GB * months_kept,  # updates until they expire
            dynamodb_rru=self.rru,
            dynamodb_wru=self.wru,
            log_bytes=self.log_bytes,
            log_gb_months=self.log_bytes / GB * shape.log_retention_days / DAYS_PER_MONTH,
            bytes_out_internet=self.bytes_out,
            bytes_in_internet=update_bytes,
            bytes_s3_to_lambda=self.bytes_to_lambda,
        )


def usage_for_round(
    figures: RoundFigures, shape: StackShape, assumptions: CostAssumptions | None = None
) -> RoundUsage:
    """The billed units of one round, from what it measured and the stated assumptions.

    Per round: one chained initiator run (selection, round record, assignment); every
    selected device fetches the assignment and the model once; every answer is an upload
    and one averager invocation (judged answers download the update and write the answer,
    other rejections only write); one aggregation re-reads the accepted updates, writes the
    model, its lineage (and state), closes the round and scores the model; the registry
    counts the round for every selected client (one GetItem, one UpdateItem each).
    """
    a = assumptions or CostAssumptions()
    f = figures
    t = _Tally()
    judged = f.accepted + f.rejected
    events = judged + f.other_rejections
    closing_size = round_item_bytes(f.selected, events, a)
    previous_size = closing_size  # the previous round had the same shape

    # --- DynamoDB ---------------------------------------------------------------------------
    t.rru += _rru(previous_size)  # latest round (query)
    t.rru += 1  # runtime configuration (sfl.state.control)
    t.registry_read(f.candidates or f.selected, a)
    # Create: ConditionCheck on round n + Put of round n+1, in one transaction.
    t.wru += _wru(previous_size, transactional=True) + _wru(
        round_item_bytes(f.selected, 0, a), transactional=True
    )
    for i in range(events):
        before = round_item_bytes(f.selected, i, a)
        t.rru += _rru(before)  # the averager reads the round
        if a.answers_in_round_item:
            # An update is billed on the larger of the item before and after it.
            t.wru += _wru(round_item_bytes(f.selected, i + 1, a))
        else:
            t.wru += _wru(a.answer_item_bytes, transactional=True)
            t.wru += _wru(round_item_bytes(f.selected, 0, a), transactional=True)
    # Aggregation: read the round, take the lease, close with the summary, the evaluation.
    t.rru += _rru(closing_size)
    t.wru += 3 * _wru(closing_size)
    t.registry_counted(f.selected, a)

    # --- S3 ---------------------------------------------------------------------------------
    t.gets += 1  # initiator: does the base model exist (HEAD)
    t.puts += 1  # initiator: the assignment
    t.devices_picked(f.selected, f.model_bytes, f.bytes_to_devices, a)
    t.puts += events  # devices: every answer is an upload
    t.gets += judged  # averager: each judged update, once to validate
    t.containers(f.model_bytes, a)
    t.gets += f.accepted  # aggregation reads the accepted updates again
    t.version_written(f.stateful_rule)
    update_bytes = f.update_bytes or events * f.model_bytes
    mean_update = update_bytes / events if events else 0.0
    # Judged updates are read to validate, accepted ones again to aggregate.
    t.bytes_to_lambda += int((judged + f.accepted) * mean_update)

    # --- Lambda -----------------------------------------------------------------------------
    handling = (
        f.update_handling_seconds
        if f.update_handling_seconds is not None
        else events * a.update_handling_seconds
    )
    initiator_run = (
        f.initiator_seconds
        if f.initiator_seconds is not None
        else f.select_seconds + a.initiator_seconds
    )
    t.log_bytes += (
        events * a.log_bytes_per_update + a.log_bytes_per_aggregation + a.log_bytes_per_initiator
    )
    return t.usage(
        shape,
        a,
        initiator_runs=1,
        initiator_seconds=initiator_run,
        averager_invocations=events + 1,
        averager_seconds=handling + f.aggregate_seconds,
        update_bytes=update_bytes,
    )


def usage_for_version(
    figures: VersionFigures, shape: StackShape, assumptions: CostAssumptions | None = None
) -> RoundUsage:
    """The billed units of one buffered version (docs/buffered.md, "Costs"), from what
    happened since the version before it and its own step.

    Each ticketing run that issued tickets: the pool, the configuration, the registry's
    active devices, the open tickets (before and after), one issue transaction (the pool and
    two items a ticket), the assignment written. Every ticket's device fetches the
    assignment and the model once. Every answer: an upload and one averager invocation that
    reads the ticket (an accepted one also the pool and the newest buffer), judges the
    update (one GET), ends the ticket in one transaction (ticket, place, pool; an accepted
    one also the buffer and its member item), then reads the pool and the next buffer. Every
    expired ticket: that transaction without the buffer. Every ended ticket: its device's
    registry item. The step: the lease and the close (two transactions over the pool and the
    buffer), the members read (query, then each update), the current model and each base
    version they trained from, the new version, its lineage (and state) and scoring.
    """
    a = assumptions or CostAssumptions()
    f, c = figures, figures.counts
    t = _Tally()
    pool_read, buffer_read = _rru(a.pool_item_bytes), _rru(a.buffer_item_bytes)
    item_read = _rru(a.answer_item_bytes)
    pool_write = _wru(a.pool_item_bytes, transactional=True)
    buffer_write = _wru(a.buffer_item_bytes, transactional=True)
    item_write = _wru(a.answer_item_bytes, transactional=True)

    # --- ticketing --------------------------------------------------------------------------
    runs = c.issue_runs
    per_run = math.ceil(c.candidates / runs) if runs else 0
    for _ in range(runs):
        t.rru += 2 * pool_read + 1 + 2 * item_read  # pool twice, configuration, places twice
        t.registry_read(per_run, a)
    t.wru += runs * pool_write + c.issued * 2 * item_write  # the ticket and its place
    t.puts += runs  # the assignment, with the OPEN tickets
    t.log_bytes += runs * a.log_bytes_per_initiator
    t.devices_picked(c.issued, f.model_bytes, 0, a)

    # --- answers and expiries ---------------------------------------------------------------
    answered = c.answered
    t.puts += answered  # devices: every answer is an upload
    t.gets += answered  # averager: each answer read once to judge it
    t.rru += answered * (item_read + pool_read + buffer_read)  # ticket; pool + next buffer
    t.rru += c.accepted * (pool_read + buffer_read)  # which buffer is filling
    t.wru += (answered + c.expired) * (2 * item_write + pool_write)  # ticket, place, pool
    t.wru += c.accepted * (buffer_write + item_write)  # the buffer, its member item
    t.registry_counted(answered + c.expired, a)
    t.log_bytes += answered * a.log_bytes_per_update
    update_bytes = c.answer_bytes or answered * f.model_bytes
    t.bytes_to_lambda += update_bytes

    # --- the step ---------------------------------------------------------------------------
    t.rru += 4 * buffer_read + pool_read  # the lease's, the previous, after the close; pricing
    t.rru += max(1, math.ceil(f.members * a.answer_item_bytes / _READ_UNIT))  # members
    t.wru += 2 * (pool_write + buffer_write)  # the lease, then the close
    t.containers(f.model_bytes, a)
    t.gets += 1 + f.base_versions + f.members  # current model, members' bases, the updates
    t.bytes_to_lambda += (1 + f.base_versions) * f.model_bytes + f.member_bytes
    t.version_written(f.stateful_rule)
    t.log_bytes += a.log_bytes_per_aggregation

    handling = c.handling_seconds or answered * a.update_handling_seconds
    return t.usage(
        shape,
        a,
        initiator_runs=runs,
        initiator_seconds=c.select_seconds + runs * a.initiator_seconds,
        # The step runs in the invocation of the answer that filled the buffer, or a tick's.
        averager_invocations=max(1, answered),
        averager_seconds=handling + f.aggregate_seconds,
        update_bytes=update_bytes,
    )


@dataclass(frozen=True)
class IdleAssumptions:
    """What an idle stack holds and does (docs/cost.md, 'The idle stack')."""

    tick_seconds: float = 0.3  # each function's run on a schedule tick with no round
    tick_log_bytes: int = 1_500
    idle_custom_metrics: int = 3  # the initiator's RoundsStarted, OpenRoundAge, ActiveDevices
    ecr_image_gb: float = 1.5  # the averager image, compressed (torch CPU: one to two GB)
    table_gb: float = 0.001  # round records and registry


def idle_usage_per_day(
    shape: StackShape,
    *,
    model_versions: int,
    model_bytes: int,
    assumptions: IdleAssumptions | None = None,
) -> RoundUsage:
    """One day of a deployed stack with no device connected: the schedule's ticks (both
    functions, each reading the latest round; the initiator scans an empty registry),
    alarms, dashboard, the metrics the ticks publish, ``model_versions`` stored models,
    the averager's image, the updates' KMS key. Storage of updates is per round (deleted
    once the round is finished)."""
    a = assumptions or IdleAssumptions()
    ticks = 24 * 60 / shape.schedule_minutes
    month = 1 / DAYS_PER_MONTH
    log_bytes = int(2 * ticks * a.tick_log_bytes)
    return RoundUsage(
        lambdas=(
            LambdaUsage(
                "initiator",
                shape.initiator.architecture,
                shape.initiator.memory_mb,
                int(ticks),
                ticks * a.tick_seconds,
            ),
            LambdaUsage(
                "averager",
                shape.averager.architecture,
                shape.averager.memory_mb,
                int(ticks),
                ticks * a.tick_seconds,
            ),
        ),
        s3_get_requests=0,
        s3_gb_months=model_versions * model_bytes / GB * month,
        # Initiator: latest round, configuration, registry scan; averager: latest round.
        dynamodb_rru=ticks * 4,
        dynamodb_gb_months=a.table_gb * month,
        log_bytes=log_bytes,
        log_gb_months=log_bytes / GB * shape.log_retention_days / DAYS_PER_MONTH,
        custom_metric_months=a.idle_custom_metrics * month,
        alarm_months=shape.alarms * month,
        dashboard_months=shape.dashboards * month,
        ecr_gb_months=a.ecr_image_gb * month,
        kms_key_months=shape.kms_keys * month,
    )


def fleet_usage_per_day(
    shape: StackShape,
    devices: int,
    assumptions: CostAssumptions | None = None,
    *,
    rounds_per_day: float = 0.0,
) -> RoundUsage:
    """One day of ``devices`` connected devices: each polls the assignment (a conditional
    GET, billed even when it answers 304) and writes a heartbeat (the item and the active
    index); Greengrass bills each active core device monthly and IoT Core its connection's
    minutes. Without push they poll every ``poll_seconds`` and heartbeat every
    ``heartbeat_seconds``; with push (``shape.push``) every ``push_poll_seconds`` and
    ``push_heartbeat_seconds``, and each of the ``rounds_per_day`` rounds sends every device
    a notice, whether the round picked it or not."""
    a = assumptions or CostAssumptions()
    poll = shape.push_poll_seconds if shape.push else shape.poll_seconds
    heartbeat = shape.push_heartbeat_seconds if shape.push else shape.heartbeat_seconds
    polls = int(devices * 86_400 / poll)
    heartbeats = devices * 86_400 / heartbeat
    notices = rounds_per_day if shape.push else 0.0
    return RoundUsage(
        s3_get_requests=polls,
        dynamodb_wru=heartbeats * (_wru(a.client_item_bytes) + a.heartbeat_index_writes),
        bytes_out_internet=polls * a.poll_response_bytes,
        greengrass_device_months=devices / DAYS_PER_MONTH,
        iot_messages=notices
        * (devices * a.messages_per_notice_delivery + a.messages_per_notice_publish),
        iot_connection_minutes=devices * 24 * 60,
    )


# --- the figure a round or a version records (the averager and simulate call these) ---------


def round_cost_summary(
    figures: RoundFigures,
    shape: StackShape,
    assumptions: CostAssumptions | None = None,
) -> dict[str, Any]:
    """The cost a closing round records (round summary ``cost``, history.json ``cost``).

    Never raises for a region without prices: the round must close regardless, so the
    summary then says why it has no dollars (``usd`` None, ``unpriced``)."""
    return cost_summary(usage_for_round(figures, shape, assumptions), shape.region)


def version_cost_summary(
    figures: VersionFigures,
    shape: StackShape,
    assumptions: CostAssumptions | None = None,
) -> dict[str, Any]:
    """The cost a buffered version records (its buffer's summary ``cost``, history.json
    ``cost``): a round's shape, plus ``counted``, what it was charged with."""
    return {
        **cost_summary(usage_for_version(figures, shape, assumptions), shape.region),
        "counted": {
            **figures.counts.to_dict(),
            "members": figures.members,
            "member_bytes": figures.member_bytes,
            "base_versions": figures.base_versions,
        },
    }


def cost_summary(usage: RoundUsage, region: str) -> dict[str, Any]:
    """What a round or a version records of its cost: the billed units and, where the price
    table has the region, the dollars per line and in all (else ``usd`` None and why)."""
    base: dict[str, Any] = {
        "region": region,
        "prices_read_on": sorted({p.read_on for t in PRICES.values() for p in t.values()}),
        "usage": {
            "lambda_invocations": {f.function: f.invocations for f in usage.lambdas},
            "lambda_gb_seconds": {f.function: round(f.gb_seconds, 6) for f in usage.lambdas},
            "s3_put_requests": usage.s3_put_requests,
            "s3_get_requests": usage.s3_get_requests,
            "dynamodb_rru": usage.dynamodb_rru,
            "dynamodb_wru": usage.dynamodb_wru,
            "bytes_out_internet": usage.bytes_out_internet,
            "bytes_in_internet": usage.bytes_in_internet,
        },
    }
    try:
        prices = prices_for(region)
    except NoPricesError as e:
        return {**base, "usd": None, "items": {}, "unpriced": str(e)}
    cost = estimate(usage, prices, region)
    return {**base, "usd": cost.total, "items": {k: v for k, v in cost.items.items() if v}}


def figures_from_round(
    *,
    selected: int,
    accepted: int,
    rejected: int,
    other_rejections: int,
    candidates: int,
    summary: Mapping[str, Any],
    select_seconds: float,
    update_handling_seconds: float | None = None,
    stateful_rule: bool = False,
) -> RoundFigures:
    """RoundFigures from a closed round's record and summary (model_bytes, bytes_up,
    bytes_down, aggregate_seconds as the averager writes them)."""
    return RoundFigures(
        selected=selected,
        accepted=accepted,
        rejected=rejected,
        other_rejections=other_rejections,
        candidates=candidates,
        model_bytes=int(summary.get("model_bytes", 0)),
        update_bytes=int(summary.get("bytes_up", 0)),
        bytes_to_devices=int(summary.get("bytes_down", 0)),
        aggregate_seconds=float(summary.get("aggregate_seconds", 0.0)),
        update_handling_seconds=update_handling_seconds,
        select_seconds=select_seconds,
        stateful_rule=stateful_rule,
    )


def figures_from_version(
    *,
    counts: PoolCounts,
    previous: PoolCounts,
    summary: Mapping[str, Any],
) -> VersionFigures:
    """VersionFigures from a buffer's step summary (``model_bytes``, ``participants``,
    ``excluded``, ``bytes_up``, ``staleness``, ``aggregate_seconds``, ``stateful_rule`` as
    ``sfl.server.buffer_step`` writes them) and the pool's counts at this step and at the
    previous version's."""
    staleness = summary.get("staleness")
    excluded = summary.get("excluded")
    return VersionFigures(
        model_bytes=int(summary.get("model_bytes", 0)),
        counts=counts.since(previous),
        members=int(summary.get("participants") or 0)
        + (len(excluded) if isinstance(excluded, Mapping) else 0),
        member_bytes=int(summary.get("bytes_up", 0)),
        base_versions=len(staleness) if isinstance(staleness, Mapping) else 0,
        aggregate_seconds=float(summary.get("aggregate_seconds", 0.0)),
        stateful_rule=bool(summary.get("stateful_rule", False)),
    )
