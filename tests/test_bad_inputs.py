"""The bad-input catalogue (docs/bad-inputs.md), one case per row.

Every case: an honest client and a bad input in the same round. The bad input is rejected
with its reason in the logs and (where a round exists) on the round record; the round still
closes; the new global model is exactly the honest client's update.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from sfl.core import layout
from sfl.learning import codec
from sfl.local.emulator import lambda_environment
from sfl.local.lambdas import LocalFunction
from sfl.server.initiator import start_round
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import TINY_MODEL, Stack, s3_event

HONEST = {name: t * 3.0 for name, t in TINY_MODEL.items()}


def _meta(client: str = "victim", round_number: int = 1, **fields: Any) -> dict[str, str]:
    values: dict[str, Any] = {
        "round": round_number,
        "client_id": client,
        "base_version": 0,
        "num_examples": 10,
        "metrics": {"loss": 0.5},
    }
    values.update(fields)
    return codec.UpdateMetadata(**values).to_header()


def _encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return codec.encode(tensors, _meta() if metadata is None else metadata)


def _upload(stack: Stack, key: str, body: bytes) -> dict[str, Any]:
    etag = stack.clients.s3.put_object(Bucket=stack.names.updates_bucket, Key=key, Body=body)[
        "ETag"
    ]
    return s3_event(stack.names.updates_bucket, key, len(body), etag)


def _victim(body: bytes) -> Callable[[Stack], dict[str, Any]]:
    return lambda stack: _upload(stack, layout.update_key("victim", 1), body)


def _torch_save() -> bytes:
    buffer = io.BytesIO()
    torch.save(TINY_MODEL, buffer)
    return buffer.getvalue()


def _second_upload(stack: Stack) -> dict[str, Any]:
    averager = LocalFunction("averager")
    first = _encode(HONEST)
    averager.invoke(_upload(stack, layout.update_key("victim", 1), first))
    return _upload(stack, layout.update_key("victim", 1), _encode(TINY_MODEL))


def _key_with_metadata_of_another_client(stack: Stack) -> dict[str, Any]:
    return _upload(
        stack, layout.update_key("victim", 1), _encode(TINY_MODEL, _meta(client="honest"))
    )


def _unicode_key(stack: Stack) -> dict[str, Any]:
    return _upload(stack, "updates/víctim/round-000001.safetensors", _encode(TINY_MODEL))


def _outside_layout(stack: Stack) -> dict[str, Any]:
    return _upload(stack, "updates/victim/model.pt", _encode(TINY_MODEL))


def _header_json(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _honest_header_with(edit: Callable[[str], str]) -> bytes:
    """The honest update with its header JSON text edited (the tensor bytes unchanged)."""
    honest = _encode(HONEST)
    length = codec.header_length(honest)
    text = honest[8 : 8 + length].decode()
    edited = edit(text).encode()
    return _header_json(edited) + honest[8 + length :]


def _oversized_header() -> bytes:
    """A header just over the base model's plus the metadata allowance, in a file no larger
    than an update may be (its tensor bytes left out): refused before its JSON is parsed."""
    base = codec.encode_model(TINY_MODEL, version=0)
    target = codec.header_length(base) + codec.METADATA_ALLOWANCE_BYTES + 10
    skeleton = '{"__metadata__": {"padding": ""}}'
    text = skeleton.replace('""', '"' + "x" * (target - len(skeleton)) + '"')
    return _header_json(text.encode())


def _entry_edit(field: str, value: str) -> Callable[[str], str]:
    """Replace one field of tensor ``w``'s entry with raw JSON ``value``."""

    def edit(text: str) -> str:
        header = json.loads(text)
        header["w"][field] = "@@"
        return json.dumps(header).replace('"@@"', value)

    return edit


@dataclass(frozen=True)
class Case:
    reason: str
    upload: Callable[[Stack], dict[str, Any]]
    selected: tuple[str, ...] = ("honest", "victim")
    recorded: str = "answer"  # answer | other | log
    max_update_bytes: int = 4096


NAN = {"w": torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), "b": torch.zeros(2)}
INF = {"w": torch.tensor([[1.0, float("inf")], [0.0, 0.0]]), "b": torch.zeros(2)}

CASES = {
    "bytes that are not safetensors": Case("not_safetensors", _victim(b"GIF89a" + b"\0" * 64)),
    "a pickle": Case("not_safetensors", _victim(pickle.dumps({"w": [[1.0, 2.0]]}))),
    "a torch.save zip": Case("not_safetensors", _victim(_torch_save())),
    "a truncated file": Case("truncated", _victim(_encode(TINY_MODEL)[:-5])),
    "an oversized header length": Case(
        "not_safetensors", _victim(struct.pack("<Q", 2**50) + b"{}")
    ),
    "a header that is not JSON": Case("not_safetensors", _victim(_header_json(b"{not json}"))),
    "wrong tensor names": Case(
        "tensor_names", _victim(_encode({"weight": TINY_MODEL["w"], "b": TINY_MODEL["b"]}))
    ),
    "wrong tensor shapes": Case(
        "tensor_shape", _victim(_encode({"w": torch.ones(3, 3), "b": TINY_MODEL["b"]}))
    ),
    "wrong tensor dtypes": Case(
        "tensor_dtype", _victim(_encode({"w": TINY_MODEL["w"].double(), "b": TINY_MODEL["b"]}))
    ),
    "NaN values": Case("non_finite", _victim(_encode(NAN))),
    "Inf values": Case("non_finite", _victim(_encode(INF))),
    "num_examples of zero": Case(
        "bad_num_examples", _victim(_encode(TINY_MODEL, _meta(num_examples=0)))
    ),
    "negative num_examples": Case(
        "bad_num_examples", _victim(_encode(TINY_MODEL, _meta(num_examples=-5)))
    ),
    "non-integer num_examples": Case(
        "metadata_malformed",
        _victim(_encode(TINY_MODEL, {**_meta(), "num_examples": "2.5"})),
    ),
    "num_examples above the cap": Case(
        "bad_num_examples", _victim(_encode(TINY_MODEL, _meta(num_examples=10**7)))
    ),
    "an object over the size limit": Case("too_large", _victim(b"\0" * 5000)),
    "metadata missing": Case("metadata_missing", _victim(codec.encode(TINY_MODEL, {}))),
    "metadata malformed": Case(
        "metadata_malformed", _victim(_encode(TINY_MODEL, {**_meta(), "metrics": "[1, 2"}))
    ),
    "metadata naming another round": Case(
        "wrong_round", _victim(_encode(TINY_MODEL, _meta(round_number=2)))
    ),
    "trained from another model version": Case(
        "wrong_base_version", _victim(_encode(TINY_MODEL, _meta(base_version=7)))
    ),
    "a key outside the client's own prefix (metadata names another client)": Case(
        "wrong_client", _key_with_metadata_of_another_client
    ),
    "an unselected client": Case(
        "not_selected", _victim(_encode(TINY_MODEL)), ("honest",), "other"
    ),
    "a duplicate (second, different upload)": Case("duplicate", _second_upload, recorded="other"),
    "a round that does not exist": Case(
        "unknown_round",
        lambda stack: _upload(
            stack, layout.update_key("victim", 9), _encode(TINY_MODEL, _meta(round_number=9))
        ),
        ("honest",),
        recorded="log",
    ),
    "a unicode key": Case("malformed_key", _unicode_key, ("honest",), recorded="log"),
    # Headers that crashed the averager (issue 8): each a rejection now.
    "a dtype that is a JSON list": Case(
        "not_safetensors", _victim(_honest_header_with(_entry_edit("dtype", '["F32"]')))
    ),
    "a dtype that is a JSON object": Case(
        "not_safetensors", _victim(_honest_header_with(_entry_edit("dtype", '{"F32": 4}')))
    ),
    "Infinity in a shape": Case(
        "not_safetensors", _victim(_honest_header_with(_entry_edit("shape", "[Infinity, 2]")))
    ),
    "a 5,000-digit integer in data_offsets": Case(
        "not_safetensors",
        _victim(_honest_header_with(_entry_edit("data_offsets", f"[0, {'9' * 5000}]"))),
        max_update_bytes=1 << 20,
    ),
    "a deeply nested header": Case(
        "not_safetensors",
        _victim(_honest_header_with(_entry_edit("shape", "[" * 5000 + "]" * 5000))),
        max_update_bytes=1 << 20,
    ),
    "a header far larger than the base model's": Case(
        "header_too_large", _victim(_oversized_header()), max_update_bytes=1 << 20
    ),
    # Metadata DynamoDB cannot store (crashed the averager, or close() after aggregation).
    "a loss of 1e300": Case(
        "metadata_malformed", _victim(_encode(HONEST, _meta(metrics={"loss": 1e300})))
    ),
    "bytes_down of 1e40": Case(
        "metadata_malformed", _victim(_encode(HONEST, {**_meta(), "bytes_down": str(10**40)}))
    ),
    "upload_started_at of -inf": Case(
        "metadata_malformed", _victim(_encode(HONEST, {**_meta(), "upload_started_at": "-inf"}))
    ),
    "a hundred metrics": Case(
        "metadata_malformed",
        _victim(_encode(HONEST, _meta(metrics={f"m{i}": 1.0 for i in range(100)}))),
    ),
    "the base model unchanged (a free rider)": Case("no_change", _victim(_encode(TINY_MODEL))),
    "a key outside the bucket layout": Case("malformed_key", _outside_layout, ("honest",), "log"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_rejected_recorded_and_the_round_closes_on_the_honest_update(
    stack: Stack, case: Case, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.config = stack.config.replace(
        max_update_bytes=case.max_update_bytes, max_num_examples=100_000
    )
    with lambda_environment(stack.env()):
        stack.put_model(0, TINY_MODEL)
        stack.register(*case.selected)
        assert start_round(stack.clients, stack.names, stack.config).started
        stack.register("victim")
        averager = LocalFunction("averager")
        # The handler sends sfl.* records through its own logger only; caplog listens at the root.
        monkeypatch.setattr(logging.getLogger("sfl"), "propagate", True)
        caplog.set_level(logging.WARNING, logger="sfl")

        result = averager.invoke(case.upload(stack))
        averager.invoke(stack.upload_update("honest", 1, HONEST))

    outcome = result["outcomes"][0]
    assert outcome["result"] == "rejected"
    assert outcome["reason"].split(":")[0] == case.reason
    logged = [r for r in caplog.records if getattr(r, "reason", "").split(":")[0] == case.reason]
    assert logged, f"no log line with reason {case.reason}"
    round_ = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    honest_only = ["honest", "victim"] if case.reason == "duplicate" else ["honest"]
    assert list(round_.accepted) == honest_only  # a duplicate's first upload was honest
    if case.recorded == "answer":
        assert round_.answers["victim"].reason.split(":")[0] == case.reason
    elif case.recorded == "other":  # logged and counted by metric; the round item untouched
        assert round_.rejection_counts == {} and round_.other_rejections == ()
    model = codec.decode(
        stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.model_key(1))[
            "Body"
        ].read()
    )
    assert torch.equal(model["w"], HONEST["w"]) and torch.equal(model["b"], HONEST["b"])


def test_url_encoded_keys_are_decoded_and_accepted(stack: Stack) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("thing:with:colons")
    start_round(stack.clients, stack.names, stack.config)

    event = stack.upload_update("thing:with:colons", 1, HONEST)
    assert "%3A" in event["Records"][0]["s3"]["object"]["key"]
    result = LocalFunction("averager").invoke(event)

    assert result["outcomes"][0]["result"] == "accepted"
    assert result["outcomes"][0]["finished_round"] == 1
