"""One conditional write, and what came of it: written, or refused by its condition.

Every store writes under a condition (a DynamoDB ``ConditionExpression``, a transaction's
conditions, an S3 ``If-None-Match``), and a refusal is an answer, not an error: another
initiator won, the round moved on, the version exists. ``conditional`` makes the one call
and turns a refusal into a ``ConditionalWrite``; every other error goes up unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, ParamSpec

from botocore.exceptions import ClientError

from sfl.state.aws import error_code

P = ParamSpec("P")

# The error codes that mean "the condition did not hold, nothing was written": DynamoDB's
# for one item; S3's for a put with If-None-Match that found the object (412), or that met
# another conditional put of the same key in flight (409).
CONDITION_FAILED_CODES = frozenset(
    {"ConditionalCheckFailedException", "PreconditionFailed", "412", "ConditionalRequestConflict"}
)
# A cancelled transaction wrote none of its items; its reasons (one per item) say why.
TRANSACTION_CANCELLED_CODE = "TransactionCanceledException"
# Cancellation reasons worth another try: a concurrent transaction on one of the items, or
# throttling of a hot item.
RETRYABLE_CANCELLATIONS = frozenset(
    {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}
)


class Write(enum.Enum):
    """How a conditional write ended (a plain Enum: devices run this module on Python 3.10)."""

    WRITTEN = "written"
    CONDITION_FAILED = "condition_failed"  # one item's condition did not hold
    CANCELLED = "cancelled"  # a transaction was cancelled: see its reasons


@dataclass(frozen=True)
class ConditionalWrite:
    """What one conditional write came to: the call's response when written, else the
    service's refusal (for a transaction's cancellation reasons)."""

    outcome: Write
    response: Mapping[str, Any] = field(default_factory=dict)
    refusal: ClientError | None = None

    @property
    def written(self) -> bool:
        return self.outcome is Write.WRITTEN

    @property
    def reasons(self) -> list[Mapping[str, Any]]:
        """A cancelled transaction's reasons, one per item in request order (botocore parses
        them from real DynamoDB's and moto's error body alike); [] for anything else."""
        if self.refusal is None:
            return []
        reasons = self.refusal.response.get("CancellationReasons")
        return list(reasons) if isinstance(reasons, list) else []

    @property
    def codes(self) -> frozenset[str]:
        """The cancellation reasons' codes (``ConditionalCheckFailed``, ``None``, ...)."""
        return frozenset(str(r.get("Code")) for r in self.reasons)

    @property
    def retryable(self) -> bool:
        """Some item was cancelled by a concurrent transaction or by throttling: another
        try may go through."""
        return bool(self.codes & RETRYABLE_CANCELLATIONS)

    def raise_refusal(self) -> NoReturn:
        """Raise the service's refusal: for a caller that cannot take it as an outcome."""
        if self.refusal is None:
            raise ValueError("the write was not refused")
        raise self.refusal


def conditional(
    call: Callable[P, Mapping[str, Any]], /, *args: P.args, **kwargs: P.kwargs
) -> ConditionalWrite:
    """Make one conditional write, ``call(*args, **kwargs)``: a failed condition or a
    cancelled transaction comes back as a ``ConditionalWrite`` (nothing was written),
    every other error is raised as it came."""
    try:
        response = call(*args, **kwargs)
    except ClientError as e:
        code = error_code(e)
        if code == TRANSACTION_CANCELLED_CODE:
            return ConditionalWrite(Write.CANCELLED, refusal=e)
        if code in CONDITION_FAILED_CODES:
            return ConditionalWrite(Write.CONDITION_FAILED, refusal=e)
        raise
    return ConditionalWrite(Write.WRITTEN, response)
