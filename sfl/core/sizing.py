"""How big the averager must be: its memory, ``/tmp`` and timeout, from the model's size, the
most updates a round aggregates and what the rule asks of it. Pure arithmetic, torch-free.

``cdk synth`` sizes the averager (and the shard function) with :func:`size_averager`; a value
set explicitly in ``sfl_infra`` wins but is checked against the need, and a need beyond
Lambda's maxima (10,240 MB memory, 10,240 MiB ``/tmp``, 900 s) is refused with the numbers.

The formulas (``model`` is the model's size in bytes as stored, ``n`` the updates of one
invocation, ``in_flight`` ``sfl.aggregation_in_flight``):

- memory, a rule that streams (FedAvg, the FedOpt rules): the runtime (Python, torch, boto3:
  ``RUNTIME_MIB``), plus the base model, the float64 running sum (two models), ``in_flight + 1``
  updates being read ahead, the new model, the model the round's score is computed with, and
  for a stateful rule its state (``STATE_MODELS``); the memory does not grow with ``n``;
- memory, a rule that reads all updates at once (median, trimmed mean, Krum): the runtime,
  the base model, one update being spooled (its bytes, decoded, re-encoded: three models),
  the chunk being sorted (``CHUNK_MIB``), the new model and the scoring model;
- ``/tmp``: such a rule spools every update, decoded: ``n * model`` plus ``SPOOL_MARGIN``;
  a streaming rule needs Lambda's minimum, 512 MiB;
- timeout: a cold start (``STARTUP_SECONDS``) plus the bytes read over a rate measured
  on the development machine and divided by ``TIME_MARGIN`` (``STREAM_BYTES_PER_SECOND``,
  ``CHUNKED_BYTES_PER_SECOND``); a sharded round (``sfl.aggregation_shard_above``) counts one
  shard's updates, then the partial sums (two models each);
- memory is at least the stack's historical default (``lambda_shapes.AVERAGER``, 2,048 MB),
  the timeout at least ``MIN_TIMEOUT_SECONDS`` (or the lease, if shorter); every memory
  figure is times ``MEMORY_MARGIN``, rounded up to 64 MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sfl.core import lambda_shapes


class SizingError(ValueError):
    """The averager cannot be sized for this model and round: a need beyond Lambda's maxima,
    or an explicit setting below the need."""


MIB = 1024 * 1024
MB = 1024 * 1024  # Lambda's "MB" of memory is a mebibyte

# Lambda's limits.
MAX_MEMORY_MB = 10_240
MAX_EPHEMERAL_MIB = 10_240
MIN_EPHEMERAL_MIB = 512
MAX_TIMEOUT_SECONDS = 900

# The averager's resident set before any model: Python, torch (CPU), boto3, Powertools and the
# server modules (522 MiB measured on the development machine, Python 3.12), with margin.
RUNTIME_MIB = 640
# A stateful rule's server state, in models (FedAdam: the pseudo-gradient, two moments).
STATE_MODELS = 3
# A chunked rule sorts ``CHUNK_ELEMENTS`` float64 values across all updates (16 MiB); sorting
# needs about three times that, rounded up.
CHUNK_MIB = 64
# Every memory figure is multiplied by this (allocator slack, headers, evaluation's data).
MEMORY_MARGIN = 1.25
# Spooled files carry their header; a few MiB for directory entries and the runtime's files.
SPOOL_MARGIN = 1.05
SPOOL_EXTRA_MIB = 64
# Seconds before the first byte: the image's cold start and torch's import.
STARTUP_SECONDS = 30
# Rates of reading and aggregating updates, then divided by ``TIME_MARGIN``. Measured on the
# 2-core development machine (benchmarks/README.md): FedAvg over 100 resnet18 updates from the
# page cache, 125 to 310 MB/s (aggregate.py --model resnet18); the median over the same,
# spooled, 31 MB/s of CPU time (--rule median), and 24 MB/s at 1 M parameters from the S3
# of local mode (robust_memory.py). S3 in Lambda is slower than the page cache: streaming is
# counted at 100 MB/s.
STREAM_BYTES_PER_SECOND = 100e6
CHUNKED_BYTES_PER_SECOND = 24e6
TIME_MARGIN = 2.0
MIN_TIMEOUT_SECONDS = 300
# The most updates a round is sized for when neither sfl_infra.max_round_updates nor
# sfl.clients_per_round says.
DEFAULT_ROUND_UPDATES = 100

# What each built-in rule asks of the averager, torch-free. The rule classes' ``abilities``
# (sfl.learning.rules) are the definition; tests/test_sizing.py checks these agree with them.
READS_ALL_AT_ONCE = frozenset({"median", "trimmed_mean", "krum", "clamped_mean"})
SUMS_IN_SHARDS = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"})
STATEFUL = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})

# The stored size of each built-in task's model (``codec.encode_model`` of ``build_model()``),
# so a stack of a built-in task is sized without torch (tests/test_sizing.py checks them).
BUILTIN_MODEL_BYTES = {"digits": 153_760, "digits_mlp": 69_392, "mnist": 438_040}


@dataclass(frozen=True)
class RuleNeeds:
    """What a rule asks of the averager's memory and disk."""

    reads_all_at_once: bool
    sums_in_shards: bool
    stateful: bool

    @classmethod
    def of(cls, rule: str) -> RuleNeeds:
        """A built-in rule's needs; a rule named by import path is sized for the worst
        (reads all at once, keeps state): its abilities are not known without importing it."""
        if rule in READS_ALL_AT_ONCE | SUMS_IN_SHARDS:
            return cls(rule in READS_ALL_AT_ONCE, rule in SUMS_IN_SHARDS, rule in STATEFUL)
        return cls(reads_all_at_once=True, sums_in_shards=False, stateful=True)


@dataclass(frozen=True)
class AveragerNeed:
    """What one averager invocation needs, and how it was worked out (for messages)."""

    memory_mb: int
    ephemeral_mib: int
    timeout_seconds: int
    basis: str  # "<model> MiB model, <n> updates, rule <r> (...)"


@dataclass(frozen=True)
class AveragerSize:
    """The averager's (and the shard function's) size as deployed, and the need behind it."""

    memory_mb: int
    ephemeral_mib: int
    timeout_seconds: int
    need: AveragerNeed


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def averager_need(
    *,
    model_bytes: int,
    updates: int,
    rule: str,
    in_flight: int,
    shard_above: int = 0,
    shard_size: int = 0,
) -> AveragerNeed:
    """The memory (MB), ``/tmp`` (MiB) and time (s) one aggregation of ``updates`` updates of
    a ``model_bytes`` model needs under ``rule`` (the module docstring has the formulas)."""
    if model_bytes <= 0 or updates <= 0:
        raise ValueError("model_bytes and updates must be positive")
    needs = RuleNeeds.of(rule)
    model_mib = model_bytes / MIB
    sharded = needs.sums_in_shards and 0 < shard_above < updates and shard_size > 0
    per_invocation = min(updates, shard_size) if sharded else updates
    if needs.reads_all_at_once:
        models = 1 + 3 + 1 + 1
        memory = RUNTIME_MIB + models * model_mib + CHUNK_MIB
        ephemeral = per_invocation * model_mib * SPOOL_MARGIN + SPOOL_EXTRA_MIB
        seconds = per_invocation * model_bytes / CHUNKED_BYTES_PER_SECOND
    else:
        models = 1 + 2 + (in_flight + 1) + 1 + 1 + (STATE_MODELS if needs.stateful else 0)
        memory = RUNTIME_MIB + models * model_mib
        ephemeral = 0.0
        read = per_invocation * model_bytes
        if sharded:  # then the partial sums, float64: two models each
            read += math.ceil(updates / shard_size) * 2 * model_bytes
        seconds = read / STREAM_BYTES_PER_SECOND
    shape = "reads all updates at once" if needs.reads_all_at_once else "streams"
    shards = f", shards of {shard_size}" if sharded else ""
    return AveragerNeed(
        memory_mb=_round_up(memory * MEMORY_MARGIN, 64),
        ephemeral_mib=max(MIN_EPHEMERAL_MIB, _round_up(ephemeral, 1)),
        timeout_seconds=math.ceil(STARTUP_SECONDS + seconds * TIME_MARGIN),
        basis=f"a {model_mib:.1f} MiB model, {updates} updates a round{shards}, "
        f"rule {rule!r} ({shape})",
    )


def size_averager(
    need: AveragerNeed,
    *,
    memory_mb: int = 0,
    ephemeral_mib: int = 0,
    timeout_seconds: int = 0,
    lease_seconds: int = MAX_TIMEOUT_SECONDS,
    label: str = "sfl_infra",
) -> AveragerSize:
    """The averager's size: each explicit value (non-zero) if it covers the need, else the
    need (at least the stack's defaults); ``SizingError`` with the numbers otherwise. The
    timeout stays within the aggregation lease (a second aggregation must not start while
    the first may still be writing)."""
    problems: list[str] = []
    for what, need_value, limit, unit in (
        ("memory", need.memory_mb, MAX_MEMORY_MB, "MB"),
        ("ephemeral storage (/tmp)", need.ephemeral_mib, MAX_EPHEMERAL_MIB, "MiB"),
        ("time", need.timeout_seconds, MAX_TIMEOUT_SECONDS, "s"),
    ):
        if need_value > limit:
            problems.append(f"{what} {need_value} {unit} (Lambda's most: {limit} {unit})")
    if problems:
        raise SizingError(
            f"the averager cannot be sized for {need.basis}: it needs {'; '.join(problems)}. "
            "Use a streaming rule (fedavg) with sharding (sfl.aggregation_shard_above), fewer "
            "updates a round (sfl.clients_per_round), or a smaller model (an update codec "
            "shrinks the upload, not the decoded update)"
        )
    explicit = (
        ("averager_memory_mb", memory_mb, need.memory_mb, "MB"),
        ("averager_ephemeral_mib", ephemeral_mib, need.ephemeral_mib, "MiB"),
        ("averager_timeout_seconds", timeout_seconds, need.timeout_seconds, "s"),
    )
    for key, given, need_value, unit in explicit:
        if given and given < need_value:
            raise SizingError(
                f"config key {label}.{key}: {given} {unit} is less than the averager needs "
                f"for {need.basis}: {need_value} {unit}; set it to at least {need_value}, or "
                "to 0 to have it derived"
            )
    if need.timeout_seconds > lease_seconds:
        raise SizingError(
            f"the averager needs {need.timeout_seconds} s for {need.basis}, longer than "
            f"sfl.aggregation_lease_seconds ({lease_seconds}); raise the lease to at least "
            f"{need.timeout_seconds}"
        )
    return AveragerSize(
        memory_mb=memory_mb or max(need.memory_mb, lambda_shapes.AVERAGER.memory_mb),
        ephemeral_mib=ephemeral_mib or need.ephemeral_mib,
        timeout_seconds=timeout_seconds
        or max(need.timeout_seconds, min(MIN_TIMEOUT_SECONDS, lease_seconds)),
        need=need,
    )
