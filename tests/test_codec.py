"""The wire format: safetensors in, safetensors out; anything else is refused, never unpickled."""

from __future__ import annotations

import io
import pickle
import struct

import pytest
import torch

from sfl.learning import codec

TENSORS = {"w": torch.arange(4, dtype=torch.float32).reshape(2, 2), "b": torch.tensor([1.5, -2.0])}


def _update(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "round": 3,
        "client_id": "client-07",
        "base_version": 2,
        "num_examples": 41,
        "metrics": {"loss": 0.25, "accuracy": 0.9},
        "timings": {"train_s": 1.5},
        "bytes_down": 1234,
        "upload_started_at": 1700000000.5,
    }
    fields.update(overrides)
    return codec.encode(TENSORS, codec.UpdateMetadata(**fields).to_header())  # type: ignore[arg-type]


def test_update_round_trip_keeps_tensors_and_metadata() -> None:
    data = _update()

    tensors = codec.decode(data)
    meta = codec.UpdateMetadata.from_header(codec.parse_header(data).metadata)

    assert set(tensors) == {"w", "b"}
    assert torch.equal(tensors["w"], TENSORS["w"])
    assert torch.equal(tensors["b"], TENSORS["b"])
    assert meta.round == 3 and meta.client_id == "client-07" and meta.base_version == 2
    assert meta.num_examples == 41
    assert meta.metrics == {"loss": 0.25, "accuracy": 0.9}
    assert meta.timings == {"train_s": 1.5}
    assert meta.upload_started_at == 1700000000.5


def test_header_signature_names_dtypes_and_shapes() -> None:
    header = codec.parse_header(_update())
    assert header.signature() == {"w": ("F32", (2, 2)), "b": ("F32", (2,))}


class Exploit:
    """Unpickling this would run a shell command: the codec must never get that far."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch /tmp/sfl-pwned",))


def _torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(TENSORS, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(pickle.dumps(Exploit()), "not_safetensors", id="pickle-exploit"),
        pytest.param(pickle.dumps(TENSORS), "not_safetensors", id="pickled-tensors"),
        pytest.param(_torch_save_bytes(), "not_safetensors", id="torch-save-zip"),
        pytest.param(b"hello", "truncated", id="five-bytes"),
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(struct.pack("<Q", 2**40) + b"{}", "not_safetensors", id="huge-header-length"),
        pytest.param(struct.pack("<Q", 100) + b"{}", "not_safetensors", id="header-past-end"),
        pytest.param(struct.pack("<Q", 4) + b"[1] ", "not_safetensors", id="header-not-object"),
        pytest.param(struct.pack("<Q", 3) + b"\xff\xfe{", "not_safetensors", id="header-not-utf8"),
    ],
)
def test_non_safetensors_bytes_are_rejected(payload: bytes, reason: str) -> None:
    with pytest.raises(codec.CodecError) as caught:
        codec.decode(payload)
    assert caught.value.reason == reason


def test_header_over_the_limit_is_rejected_before_parsing() -> None:
    data = _update()
    with pytest.raises(codec.CodecError) as caught:
        codec.decode(data, max_header_bytes=64)
    assert caught.value.reason == "header_too_large"


def test_truncated_tensor_data_is_rejected() -> None:
    data = _update()
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.decode(data[:-4])


def test_header_lying_about_offsets_is_rejected() -> None:
    header = b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}'
    data = struct.pack("<Q", len(header)) + header + b"\0" * 8
    with pytest.raises(codec.CodecError, match="offsets disagree"):
        codec.decode(data)


BASE_META = {
    "format": "sfl-update/1",
    "round": "1",
    "client_id": "c",
    "base_version": "0",
    "num_examples": "2",
}


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({}, "metadata_missing"),
        ({"format": "sfl-update/1", "round": "1"}, "metadata_missing"),
        (
            {**BASE_META, "num_examples": "1.5"},
            "metadata_malformed",
        ),
        (
            {**BASE_META, "round": "x"},
            "metadata_malformed",
        ),
        (
            {
                "format": "sfl-update/1", "round": "1", "client_id": "c", "base_version": "0",
                "num_examples": "2", "metrics": '{"loss": "NaN"}',
            },
            "metadata_malformed",
        ),
    ],
)  # fmt: skip
def test_bad_metadata_is_named(metadata: dict[str, str], reason: str) -> None:
    with pytest.raises(codec.CodecError) as caught:
        codec.UpdateMetadata.from_header(metadata)
    assert caught.value.reason == reason
