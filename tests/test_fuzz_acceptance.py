"""Fuzzing what parses device input: valid, or a rejection with a reason, and nothing else.

Three fuzzers with fixed budgets and seeds (the same cases on every run, so CI is stable):
hypothesis over arbitrary bytes and over arbitrary JSON headers, hypothesis over arbitrary
metadata maps, and a mutation fuzzer that starts from a valid update and breaks it the ways
a hostile device would (byte flips, splices, truncation, and hand-picked hostile values
spliced into the header: ``Infinity``, 5,000-digit integers, deep nesting, lists for
strings, DynamoDB-unstorable numbers). Every case goes through the same function the
averager calls, ``validate_update``; anything but an ``AcceptedUpdate`` or an
``UpdateRejected`` fails the test.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfl.learning import codec
from sfl.server.acceptance import AcceptedUpdate, Expected, UpdateRejected, validate_update

BASE = {
    "conv.weight": torch.linspace(-1.0, 1.0, 24).reshape(2, 3, 2, 2),
    "fc.bias": torch.tensor([0.25, -0.5, 0.75]),
    "steps": torch.tensor(7, dtype=torch.int64),
}
TRAINED = {k: (v * 1.5 if v.dtype.is_floating_point else v) for k, v in BASE.items()}
BASE_FILE = codec.encode_model(BASE, version=4)
BASE_HEADER = codec.parse_header(BASE_FILE)
EXPECTED = Expected(
    round=9,
    client_id="device-1",
    base_version=4,
    base_header=BASE_HEADER,
    max_bytes=1 << 20,
    max_num_examples=100_000,
)
METADATA = codec.UpdateMetadata(
    round=9,
    client_id="device-1",
    base_version=4,
    num_examples=120,
    metrics={"loss": 0.4, "accuracy": 0.8},
    timings={"train_s": 2.5},
    bytes_down=len(BASE_FILE),
    upload_started_at=1_790_000_000.0,
).to_header()
VALID = codec.encode(TRAINED, METADATA)
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def judge(data: bytes) -> AcceptedUpdate | UpdateRejected:
    """What the averager's acceptance makes of ``data``: the only two allowed outcomes."""
    try:
        return validate_update(data, EXPECTED, BASE)
    except UpdateRejected as e:
        rejection = e
    assert rejection.reason.replace("_", "").isalpha(), rejection.reason  # a stable code
    return rejection


def framed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def test_the_valid_update_is_accepted() -> None:
    result = judge(VALID)

    assert isinstance(result, AcceptedUpdate)
    assert result.metadata.num_examples == 120
    assert result.delta_norm == pytest.approx(
        0.5
        * math.sqrt(
            sum(float((v.double() ** 2).sum()) for v in BASE.values() if v.dtype.is_floating_point)
        )
    )


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_valid_or_rejected(data: bytes) -> None:
    assert isinstance(judge(data), UpdateRejected)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
TENSOR_ENTRIES = st.fixed_dictionaries(
    {"dtype": JSON_VALUES | st.sampled_from(["F32", "I64", "F16"])},
    optional={"shape": JSON_VALUES, "data_offsets": JSON_VALUES, "extra": JSON_VALUES},
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*BASE, "__metadata__", "other"]),
        TENSOR_ENTRIES | JSON_VALUES,
        max_size=4,
    ),
    st.binary(max_size=256),
)
def test_arbitrary_json_headers_are_valid_or_rejected(header: dict[str, Any], tail: bytes) -> None:
    raw = json.dumps(header, allow_nan=True).encode()
    assert isinstance(judge(framed(raw) + tail), UpdateRejected)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*METADATA, "extra"]),
        st.text(max_size=40)
        | st.sampled_from(["NaN", "-inf", "1e400", "9" * 5000, "[]", "{}", '{"loss": 1e300}']),
        max_size=10,
    )
)
def test_arbitrary_metadata_is_valid_or_rejected(changes: dict[str, str]) -> None:
    result = judge(codec.encode(TRAINED, {**METADATA, **changes}))

    if isinstance(result, AcceptedUpdate):
        # Whatever was accepted is storable: finite, bounded numbers only.
        meta = result.metadata
        for value in [*meta.metrics.values(), *meta.timings.values(), meta.upload_started_at]:
            assert math.isfinite(value) and abs(value) <= 1e12
        assert 0 < meta.num_examples <= EXPECTED.max_num_examples


# Hostile values a device could splice into the header's JSON.
HOSTILE_TOKENS = [
    b"Infinity",
    b"-Infinity",
    b"NaN",
    b"1e400",
    b"9" * 5000,
    b"-1",
    b"18446744073709551616",
    b'["F32"]',
    b'{"F32": 1}',
    b"[" * 5000 + b"]" * 5000,
    b"{" * 3000,
    b"null",
    b"true",
    b'"\\ud800"',
    b"1.5",
    b'"' + b"A" * 70_000 + b'"',
]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 16:
        return data + rng.randbytes(rng.randint(1, 64))
    header_end = min(8 + codec.header_length(VALID), len(data))
    kind = rng.randrange(7)
    out = bytearray(data)
    if kind == 0:  # flip bits anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # truncate or extend
        cut = rng.randrange(len(out))
        return bytes(out[:cut]) if rng.random() < 0.5 else bytes(out) + bytes(rng.randbytes(cut))
    if kind == 2:  # a lying header length
        length = rng.choice([0, 1, header_end - 9, header_end - 7, 2**63, 2**32, 16 << 20])
        return struct.pack("<Q", length) + bytes(out[8:])
    header = bytes(out[8:header_end])
    body = bytes(out[header_end:])
    if kind == 3:  # a hostile token in place of one JSON value
        spans = [i for i, c in enumerate(header) if c in b":,["] or [0]
        at = rng.choice(spans) + 1
        end = at
        while end < len(header) and header[end] not in b",]}":
            end += 1
        header = header[:at] + rng.choice(HOSTILE_TOKENS) + header[end:]
    elif kind == 4:  # swap two bytes of the header
        i, j = rng.randrange(len(header)), rng.randrange(len(header))
        mutable = bytearray(header)
        mutable[i], mutable[j] = mutable[j], mutable[i]
        header = bytes(mutable)
    elif kind == 5:  # repeat a slice of the header (duplicate keys, nesting)
        i = rng.randrange(len(header))
        j = rng.randrange(i, len(header))
        header = header[:j] + header[i:j] + header[j:]
    else:  # splice in another file's bytes
        return bytes(out[: rng.randrange(len(out))]) + BASE_FILE[rng.randrange(len(BASE_FILE)) :]
    return framed(header) + body


def test_mutation_fuzzer_over_a_valid_update() -> None:
    rng = random.Random(20261129)
    outcomes: dict[str, int] = {}
    for _ in range(3000):
        data = VALID
        for _ in range(rng.randint(1, 3)):
            data = _mutate(data, rng)
        result = judge(data)
        key = "accepted" if isinstance(result, AcceptedUpdate) else result.reason
        outcomes[key] = outcomes.get(key, 0) + 1
        if isinstance(result, AcceptedUpdate):
            assert set(result.tensors) == set(BASE)
            assert all(bool(torch.isfinite(t).all()) for t in result.tensors.values())
    # The fuzzer reached deep into the checks, not just the first one.
    assert {"not_safetensors", "truncated", "metadata_malformed"} <= set(outcomes), outcomes
