"""Update compression: each codec gives back the update within its stated error, a hostile
compressed update is rejected with a reason, and a round runs end to end in a codec.

The same fixtures as the acceptance fuzzers: a small base model with float tensors and an
integer counter, and a client's update trained from it.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.client import Assignment, AssignmentUnreadable
from sfl.core import layout
from sfl.core.config import ConfigError, FederationConfig
from sfl.learning import codec
from sfl.learning.compression import UpdateCodec, decode_update, encode_update
from sfl.learning.rules.aggregation import as_rows
from sfl.learning.tasks.base import ArrayDataset, ClientData
from sfl.server.acceptance import AcceptedUpdate, Expected, UpdateRejected, validate_update
from sfl.server.answers import UpdateOutcome
from sfl.server.averager import Averager, bootstrap_model
from sfl.server.notifications import UpdateEvent
from sfl.server.round_updates import Entry, RoundUpdates
from tests.conftest import TRAINED as TINY_TRAINED
from tests.conftest import Stack
from tests.test_deadlines import _setup
from tests.test_edge_client import _device, _picked
from tests.test_fedprox_and_attacks import _assignment_with

_gen = torch.Generator().manual_seed(7)
BASE = {
    "conv.weight": torch.randn(4, 3, 3, 3, generator=_gen),
    "fc.bias": torch.randn(10, generator=_gen),
    "steps": torch.tensor(7, dtype=torch.int64),
}
DELTA = {k: 0.05 * torch.randn(v.shape, generator=_gen) for k, v in BASE.items() if k != "steps"}
TRAINED = {**{k: BASE[k] + d for k, d in DELTA.items()}, "steps": torch.tensor(9)}
BASE_HEADER = codec.parse_header(codec.encode_model(BASE, version=4))
METADATA = codec.UpdateMetadata(
    round=9, client_id="device-1", base_version=4, num_examples=120
).to_header()
CODECS = {
    "none": UpdateCodec("none"),
    "fp16": UpdateCodec("fp16"),
    "int8": UpdateCodec("int8"),
    "topk": UpdateCodec("topk", 0.25),
}


def _expected(update_codec: UpdateCodec) -> Expected:
    return Expected(
        round=9,
        client_id="device-1",
        base_version=4,
        base_header=BASE_HEADER,
        max_bytes=1 << 20,
        max_num_examples=100_000,
        codec=update_codec,
    )


def _judge(data: bytes, update_codec: UpdateCodec) -> AcceptedUpdate | UpdateRejected:
    """What the averager makes of ``data`` in a round of ``update_codec``: the two outcomes."""
    try:
        return validate_update(data, _expected(update_codec), BASE)
    except UpdateRejected as e:
        rejection = e
    assert rejection.reason.replace("_", "").isalpha(), rejection.reason  # a stable code
    return rejection


def _encoded(name: str) -> bytes:
    return encode_update(TRAINED, BASE, CODECS[name], METADATA)


# --- round trips --------------------------------------------------------------------------


def test_none_is_todays_format_and_exact() -> None:
    data = _encoded("none")
    header, today = codec.parse_header(data), codec.parse_header(codec.encode(TRAINED, METADATA))
    assert header.metadata == today.metadata and "update_codec" not in header.metadata
    assert header.signature() == today.signature() == BASE_HEADER.signature()
    decoded = decode_update(data, BASE, codec=CODECS["none"])
    assert all(torch.equal(decoded[k], TRAINED[k]) for k in BASE)


def test_fp16_keeps_the_change_to_float16_precision() -> None:
    decoded = decode_update(_encoded("fp16"), BASE, codec=CODECS["fp16"])
    for name, delta in DELTA.items():
        error = (decoded[name] - TRAINED[name]).abs()
        assert bool((error <= delta.abs() * 2**-11 + 1e-6).all()), name
    assert torch.equal(decoded["steps"], TRAINED["steps"])


def test_int8_is_within_half_a_step_of_the_tensors_scale() -> None:
    decoded = decode_update(_encoded("int8"), BASE, codec=CODECS["int8"])
    for name, delta in DELTA.items():
        step = float(delta.abs().max()) / 127
        assert float((decoded[name] - TRAINED[name]).abs().max()) <= step / 2 + 1e-6, name
    assert torch.equal(decoded["steps"], TRAINED["steps"])


def test_topk_keeps_the_largest_changes_exactly_and_drops_the_rest() -> None:
    decoded = decode_update(_encoded("topk"), BASE, codec=CODECS["topk"])
    for name, delta in DELTA.items():
        kept = math.ceil(0.25 * delta.numel())
        changed = (decoded[name] - BASE[name]).flatten()
        largest = set(torch.topk(delta.flatten().abs(), kept).indices.tolist())
        assert set(torch.nonzero(changed).flatten().tolist()) == largest, name
        index = torch.tensor(sorted(largest))
        assert torch.allclose(changed[index], delta.flatten()[index], atol=1e-6)
    assert torch.equal(decoded["steps"], TRAINED["steps"])


def test_compressed_updates_are_smaller_by_the_codecs_factor() -> None:
    big = {"w": torch.randn(256, 256, generator=_gen)}
    moved = {"w": big["w"] + 0.01}
    size = {n: len(encode_update(moved, big, c, METADATA)) for n, c in CODECS.items()}
    assert size["fp16"] < 0.51 * size["none"]
    assert size["int8"] < 0.26 * size["none"]
    assert size["topk"] < 0.51 * size["none"]  # a quarter of the entries, 8 bytes each


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_is_accepted_with_the_norm_of_its_decoded_change(name: str) -> None:
    data = _encoded(name)
    result = _judge(data, CODECS[name])
    assert isinstance(result, AcceptedUpdate), result
    decoded = decode_update(data, BASE)
    norm = math.sqrt(
        sum(float(((decoded[k].double() - BASE[k].double()) ** 2).sum()) for k in DELTA)
    )
    assert result.delta_norm == pytest.approx(norm)
    assert result.delta_norm < 2.0  # the change, not the int8 steps or the raw values
    assert all(torch.equal(result.tensors[k], decoded[k]) for k in BASE)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_an_update_fits_its_codecs_size_limit(name: str) -> None:
    assert len(_encoded(name)) <= _expected(CODECS[name]).size_limit


def test_a_compressed_round_accepts_fewer_bytes() -> None:
    big = codec.parse_header(codec.encode_model({"w": torch.zeros(512, 512)}, version=4))
    limits = {
        n: Expected(9, "device-1", 4, big, 1 << 30, 100, codec=c).size_limit
        for n, c in CODECS.items()
    }
    assert limits["int8"] < 0.3 * limits["none"] and limits["fp16"] < 0.55 * limits["none"]


# --- hostile compressed updates ------------------------------------------------------------


def _tampered(name: str, **changes: Any) -> bytes:
    """A valid update in codec ``name`` with tensors replaced (None: removed)."""
    tensors = dict(codec.decode(_encoded(name)))
    for key, value in changes.items():
        key = key.replace("__", "#").replace("_DOT_", ".")
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return codec.encode(tensors, {**METADATA, "update_codec": name})


W, B = "conv_DOT_weight", "fc_DOT_bias"
_q = torch.zeros(10, dtype=torch.int8)
BAD: dict[str, tuple[str, bytes, str]] = {
    "an unknown codec": (
        "none",
        codec.encode(TRAINED, {**METADATA, "update_codec": "zip"}),
        "unknown_codec",
    ),
    "a plain update in an int8 round": ("int8", codec.encode(TRAINED, METADATA), "wrong_codec"),
    "fp16 in an int8 round": ("int8", _tampered("fp16"), "wrong_codec"),
    "a scale missing": ("int8", _tampered("int8", **{f"{B}__scale": None}), "tensor_names"),
    "an extra tensor": ("int8", _tampered("int8", extra=torch.zeros(2)), "tensor_names"),
    "int16 values": ("int8", _tampered("int8", **{B: _q.to(torch.int16)}), "tensor_dtype"),
    "values of another shape": ("int8", _tampered("int8", **{B: _q[:9]}), "tensor_shape"),
    "a scale of shape [1]": (
        "int8",
        _tampered("int8", **{f"{B}__scale": torch.ones(1)}),
        "tensor_shape",
    ),
    "a zero scale": ("int8", _tampered("int8", **{f"{B}__scale": torch.tensor(0.0)}), "bad_scale"),
    "a negative scale": (
        "int8",
        _tampered("int8", **{f"{B}__scale": torch.tensor(-1.0)}),
        "bad_scale",
    ),
    "a NaN scale": (
        "int8",
        _tampered("int8", **{f"{B}__scale": torch.tensor(math.nan)}),
        "bad_scale",
    ),
    "a scale that overflows the values": (
        "int8",
        _tampered(
            "int8",
            **{B: torch.full((10,), 127, dtype=torch.int8), f"{B}__scale": torch.tensor(3e38)},
        ),
        "non_finite",
    ),
    "an infinite fp16 change": (
        "fp16",
        _tampered("fp16", **{B: torch.full((10,), math.inf).half()}),
        "non_finite",
    ),
    "float indices": (
        "topk",
        _tampered("topk", **{f"{B}__indices": torch.tensor([0.0, 1.0, 2.0])}),
        "tensor_dtype",
    ),
    "float64 values": (
        "topk",
        _tampered("topk", **{f"{B}__values": torch.zeros(3, dtype=torch.float64)}),
        "tensor_dtype",
    ),
    "2-D indices": (
        "topk",
        _tampered("topk", **{f"{B}__indices": torch.zeros(1, 3, dtype=torch.int32)}),
        "tensor_shape",
    ),
    "more indices than values": (
        "topk",
        _tampered("topk", **{f"{B}__indices": torch.tensor([0, 1], dtype=torch.int32)}),
        "tensor_shape",
    ),
    "more entries than topk_fraction allows": (
        "topk",
        _tampered(
            "topk",
            **{f"{B}__indices": torch.arange(4, dtype=torch.int32), f"{B}__values": torch.ones(4)},
        ),
        "topk_too_many",
    ),
    "an index past the end": (
        "topk",
        _tampered("topk", **{f"{B}__indices": torch.tensor([0, 1, 10], dtype=torch.int32)}),
        "index_out_of_range",
    ),
    "a negative index": (
        "topk",
        _tampered("topk", **{f"{B}__indices": torch.tensor([-1, 1, 2], dtype=torch.int64)}),
        "index_out_of_range",
    ),
    "a repeated index": (
        "topk",
        _tampered("topk", **{f"{B}__indices": torch.tensor([3, 1, 3], dtype=torch.int32)}),
        "duplicate_index",
    ),
    "NaN values": (
        "topk",
        _tampered("topk", **{f"{B}__values": torch.tensor([0.0, math.nan, 1.0])}),
        "non_finite",
    ),
    "the trained tensor instead of the top-k": (
        "topk",
        _tampered(
            "topk", **{f"{W}__indices": None, f"{W}__values": None, W: TRAINED["conv.weight"]}
        ),
        "tensor_names",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_compressed_update_is_rejected_with_its_reason(case: str) -> None:
    round_codec, data, reason = BAD[case]
    result = _judge(data, CODECS[round_codec])
    assert isinstance(result, UpdateRejected), case
    assert result.reason == reason, result


FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_INDEX = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_FLOAT = st.floats(width=32)


@FUZZ
@given(
    indices=st.lists(_INDEX, max_size=12),
    values=st.lists(_FLOAT, max_size=12),
    scale=_FLOAT,
    wide=st.booleans(),
)
def test_arbitrary_topk_and_int8_contents_are_valid_or_rejected(
    indices: list[int], values: list[float], scale: float, wide: bool
) -> None:
    index_dtype = torch.int64 if wide else torch.int32
    topk = _tampered(
        "topk",
        **{
            f"{B}__indices": torch.tensor(indices, dtype=index_dtype),
            f"{B}__values": torch.tensor(values, dtype=torch.float32),
        },
    )
    int8 = _tampered("int8", **{f"{B}__scale": torch.tensor(scale, dtype=torch.float32)})
    for data, name in ((topk, "topk"), (int8, "int8")):
        result = _judge(data, CODECS[name])
        if isinstance(result, AcceptedUpdate):
            assert set(result.tensors) == set(BASE)
            assert all(result.tensors[k].shape == BASE[k].shape for k in BASE)
            assert all(bool(torch.isfinite(t).all()) for t in result.tensors.values())


@pytest.mark.parametrize("name", ["fp16", "int8", "topk"])
def test_mutation_fuzzer_over_compressed_updates(name: str) -> None:
    rng = random.Random(20261130)
    valid = _encoded(name)
    reasons = set()
    for _ in range(200):
        out = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        if rng.random() < 0.2:
            out = out[: rng.randrange(len(out))]
        result = _judge(bytes(out), CODECS[name])
        if isinstance(result, UpdateRejected):
            reasons.add(result.reason)
        else:
            assert all(bool(torch.isfinite(t).all()) for t in result.tensors.values())
    assert "not_safetensors" in reasons, reasons


# --- config, assignment, the averager -------------------------------------------------------


def test_the_codec_travels_in_the_assignment() -> None:
    assignment = Assignment.from_json(
        _assignment_with({"update_codec": "topk", "topk_fraction": 0.05})
    )
    assert assignment.update_codec == UpdateCodec("topk", 0.05)
    assert Assignment.from_json(_assignment_with({})).update_codec == UpdateCodec("none")


@pytest.mark.parametrize(
    "fields", [{"update_codec": "zip"}, {"update_codec": 3}, {"topk_fraction": 2.0}]
)
def test_a_bad_codec_makes_the_assignment_unreadable(fields: dict[str, object]) -> None:
    with pytest.raises(AssignmentUnreadable):
        Assignment.from_json(_assignment_with(fields))


def test_a_round_in_int8_runs_from_the_assignment_to_the_next_model(
    stack: Stack, tmp_path: Path
) -> None:
    stack.config = stack.config.replace(update_codec="int8", quorum="all_answered", local_epochs=1)
    client = _device(stack, tmp_path)
    full = client.task.load_client_data(client.settings.data_dir)
    small = ClientData(  # a tenth of the digits: the codec, not the training, is tested
        ArrayDataset(full.train.x[:150], full.train.y[:150]), full.eval
    )
    client.task.load_client_data = lambda data_dir: small  # type: ignore[method-assign]
    base = client.task.build_model(seed=0).state_dict()
    bootstrap_model(stack.clients, stack.names, base, seed=0)
    assignment = _picked(stack, client)
    assert assignment.update_codec.name == "int8"

    client.answer(assignment)

    key = layout.update_key("c1", 1)
    body = stack.clients.s3.get_object(Bucket=stack.names.updates_bucket, Key=key)["Body"].read()
    assert codec.parse_header(body).metadata["update_codec"] == "int8"
    averager = Averager(stack.clients, stack.names, stack.config)
    assert _deliver(averager, stack, key).result == "accepted"
    model = codec.decode(
        stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.model_key(1))[
            "Body"
        ].read()
    )
    expected = decode_update(body, base)  # one client: the next model is its decoded update
    assert all(torch.allclose(model[k], expected[k], atol=1e-6) for k in base)
    assert not all(torch.equal(model[k], base[k]) for k in base)


def test_a_plain_update_in_a_topk_round_is_rejected_by_the_averager(stack: Stack) -> None:
    averager, _, _ = _setup(stack, "a", update_codec="topk", topk_fraction=0.5)
    stack.upload_update("a", 1, TINY_TRAINED)

    outcome = _deliver(averager, stack, layout.update_key("a", 1))

    assert outcome.result == "rejected" and outcome.reason.startswith("wrong_codec"), outcome


def _deliver(averager: Averager, stack: Stack, key: str) -> UpdateOutcome:
    """The averager's handling of the S3 event for ``key``, as Lambda would deliver it."""
    head = stack.clients.s3.head_object(Bucket=stack.names.updates_bucket, Key=key)
    event = UpdateEvent(
        bucket=stack.names.updates_bucket,
        key=key,
        size=int(head["ContentLength"]),
        etag=head["ETag"].strip('"'),
    )
    return averager.handle_update(event)


def _put(stack: Stack, client: str, data: bytes) -> Entry:
    key = layout.update_key(client, 1)
    etag = stack.clients.s3.put_object(Bucket=stack.names.updates_bucket, Key=key, Body=data)
    return Entry(client=client, key=key, etag=etag["ETag"], weight=1.0)


def test_the_aggregation_reads_compressed_updates_decoded_streamed_and_chunked(
    stack: Stack,
) -> None:
    entries = [_put(stack, "a", _encoded("topk")), _put(stack, "b", _encoded("int8"))]
    want = [decode_update(_encoded("topk"), BASE), decode_update(_encoded("int8"), BASE)]
    for decoded in want:  # the reader gives every rule the base model's integer tensors
        decoded["steps"] = BASE["steps"]
    with RoundUpdates(
        stack.clients.s3, stack.names.updates_bucket, entries, BASE, BASE_HEADER
    ) as updates:
        streamed = [tensors for tensors, _ in updates.stream()]
        chunks = list(updates.chunks())
    assert updates.excluded == {}
    for got, expected in zip(streamed, want, strict=True):
        assert all(torch.equal(got[k], expected[k]) for k in BASE)
    for chunk in chunks:
        rows = torch.stack([as_rows(w[chunk.name])[chunk.rows] for w in want])
        assert torch.allclose(chunk.values, rows.to(torch.float64))


def test_the_codec_keys_are_checked_config_keys() -> None:
    assert FederationConfig().update_codec == "none"
    with pytest.raises(ConfigError, match="one of none, fp16, int8, topk"):
        FederationConfig(update_codec="zip")
    with pytest.raises(ConfigError, match="topk_fraction"):
        FederationConfig(topk_fraction=0.0)
