"""The safetensors header and an update's metadata: parsed and bounds-checked, torch-free.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor names,
dtypes, shapes, byte offsets, and a ``__metadata__`` map of strings), then raw bytes. The
header is parsed here with bounds checks before anything else is trusted, so a pickle, a
zip from ``torch.save``, a truncated file or a lying header is rejected with a reason.
This half of the codec imports no torch, so boto3-only code (the initiator's zip, the
model store) can read headers; ``sfl.learning.codec`` adds the tensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT = "sfl-update/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
# What an update's header may add to the base model's header: its metadata (round, client,
# metrics, timings). Checked from the first 8 bytes, before any JSON is parsed.
METADATA_ALLOWANCE_BYTES = 16 * 1024
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_INT_DIGITS = 18  # every integer in a header fits in 60 bits; longer ones are refused
_MAX_DIMS = 16
_MAX_DIM = 2**48
# Metadata a client reports: a few named numbers each, in a range DynamoDB can store.
MAX_REPORTED_KEYS = 16
_REPORTED_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_REPORTED_VALUE = 1e12
_SMALLEST_REPORTED = 1e-12  # smaller magnitudes are stored as 0 (DynamoDB stops at 1e-130)
MAX_BYTES_DOWN = 2**50
_MAX_TIMESTAMP = 1e11  # seconds since the epoch (year 5138)


class CodecError(ValueError):
    """Bytes are not an acceptable safetensors file; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    data_start: int  # offset of the first tensor byte in the file
    data_length: int = 0  # bytes of tensor data after the header

    @property
    def header_length(self) -> int:
        return self.data_start - 8

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_length

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (t.dtype, t.shape) for name, t in self.tensors.items()}


def dtype_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return _DTYPE_SIZES[dtype]


def header_length(prefix: bytes) -> int:
    if len(prefix) < 8:
        raise CodecError("truncated", f"{len(prefix)} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    return int(length)


def _looks_like(data: bytes) -> str | None:
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "this looks like a Python pickle, which is never loaded"
    if data[:4] == b"PK\x03\x04":
        return "this looks like a zip archive (torch.save?)"
    return None


def parse_header(
    data: bytes, *, total_size: int | None = None, max_header_bytes: int = MAX_HEADER_BYTES
) -> Header:
    """Parse and bounds-check a safetensors header from the file's first bytes.

    ``data`` may hold only the beginning of the file; ``total_size`` is then the file size.
    Whatever the bytes, the result is a ``Header`` or a ``CodecError``: nothing else.
    """
    try:
        return _parse_header(data, total_size, max_header_bytes)
    except CodecError as e:
        kind = _looks_like(data)
        if kind is None:
            raise
        raise CodecError("not_safetensors", f"{kind}; only safetensors is accepted") from e


def _parse_header(data: bytes, total_size: int | None, max_header_bytes: int) -> Header:
    size = len(data) if total_size is None else total_size
    length = header_length(data)
    if length > size:
        raise CodecError(
            "not_safetensors",
            f"header length {length} is larger than the {size}-byte file (not safetensors)",
        )
    if length > max_header_bytes:
        raise CodecError(
            "header_too_large", f"header length {length} exceeds {max_header_bytes} bytes"
        )
    if 8 + length > len(data):
        raise CodecError("truncated", f"header of {length} bytes runs past the data")
    raw = _header_json(data[8 : 8 + length])
    metadata = raw.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("metadata_malformed", "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in raw.items():
        dtype, shape, begin, end = _tensor_entry(name, info)
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise CodecError(
                "not_safetensors", f"tensor {name[:64]!r}: offsets disagree with shape"
            )
        tensors[name] = TensorInfo(dtype=dtype, shape=shape)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise CodecError("not_safetensors", f"tensor {name[:64]!r}: data is not contiguous")
        position = end
    if 8 + length + position != size:
        raise CodecError(
            "truncated",
            f"file is {size} bytes, header describes {8 + length + position}",
        )
    return Header(tensors=tensors, metadata=metadata, data_start=8 + length, data_length=position)


def _reject_constant(name: str) -> Any:
    raise CodecError("not_safetensors", f"header holds {name}, which JSON does not allow")


def _reject_float(text: str) -> Any:
    raise CodecError("not_safetensors", f"header holds a fraction ({text[:20]}); only integers")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise CodecError("not_safetensors", f"header holds an integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers could disagree on which duplicate wins; refuse the ambiguity.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise CodecError("not_safetensors", "header repeats a key")
    return out


def _header_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        parsed = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_reject_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except CodecError:
        raise
    except RecursionError as e:
        raise CodecError("not_safetensors", "header JSON is nested too deeply") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CodecError("not_safetensors", f"header is not JSON: {str(e)[:200]}") from e
    if not isinstance(parsed, dict):
        raise CodecError("not_safetensors", "header is not a JSON object")
    return parsed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end), every field checked for type and range."""
    label = f"tensor {name[:64]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CodecError("not_safetensors", f"{label} entry is malformed")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise CodecError("not_safetensors", f"{label}: bad dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)
    ):
        raise CodecError("not_safetensors", f"{label}: bad shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise CodecError("not_safetensors", f"{label}: bad data_offsets")
    return dtype, tuple(shape), offsets[0], offsets[1]


# --- update metadata ------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateMetadata:
    """What a client says about its update, carried in the safetensors header."""

    round: int
    client_id: str
    base_version: int
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    upload_started_at: float = 0.0

    def to_header(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "round": str(self.round),
            "client_id": self.client_id,
            "base_version": str(self.base_version),
            "num_examples": str(self.num_examples),
            "metrics": json.dumps(dict(self.metrics), sort_keys=True),
            "timings": json.dumps(dict(self.timings), sort_keys=True),
            "bytes_down": str(self.bytes_down),
            "upload_started_at": repr(self.upload_started_at),
        }

    @classmethod
    def from_header(cls, metadata: Mapping[str, str]) -> UpdateMetadata:
        """Parse what the client claims, every value typed and in a range the round record
        (DynamoDB) can hold; anything else is a ``CodecError``."""
        if not metadata or metadata.get("format") != FORMAT:
            raise CodecError("metadata_missing", f"header metadata 'format' is not {FORMAT!r}")
        missing = [
            k for k in ("round", "client_id", "base_version", "num_examples") if k not in metadata
        ]
        if missing:
            raise CodecError("metadata_missing", f"metadata lacks {', '.join(missing)}")
        client_id = check_client_id(metadata["client_id"])
        return cls(
            round=strict_int(metadata["round"], "round"),
            client_id=client_id,
            base_version=strict_int(metadata["base_version"], "base_version"),
            num_examples=strict_int(metadata["num_examples"], "num_examples"),
            metrics=_reported(metadata.get("metrics", "{}"), "metrics", -MAX_REPORTED_VALUE),
            timings=_reported(metadata.get("timings", "{}"), "timings", 0.0),
            bytes_down=strict_int(
                metadata.get("bytes_down", "0"), "bytes_down", MAX_BYTES_DOWN, minimum=0
            ),
            upload_started_at=_timestamp(metadata.get("upload_started_at", "0")),
        )


_CLIENT_ID = re.compile(r"[A-Za-z0-9:_-]{1,128}")  # sfl.core.layout.CLIENT_ID; no import cycle
_INTEGER = re.compile(r"-?[0-9]{1,18}")


def check_client_id(text: str) -> str:
    """A client id as a device may claim it in metadata; ``CodecError`` otherwise."""
    if not _CLIENT_ID.fullmatch(text):
        raise CodecError("metadata_malformed", "client_id is not 1-128 of [A-Za-z0-9:_-]")
    return text


def strict_int(text: str, name: str, maximum: int = 10**18, minimum: int = -(10**18)) -> int:
    if not _INTEGER.fullmatch(text):
        raise CodecError("metadata_malformed", f"{name} {text[:40]!r} is not an integer")
    value = int(text)
    if not minimum <= value <= maximum:
        raise CodecError("metadata_malformed", f"{name} {value} is not in {minimum}..{maximum}")
    return value


def _timestamp(text: str) -> float:
    try:
        value = float(text[:40]) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= _MAX_TIMESTAMP:  # NaN fails too
        raise CodecError("metadata_malformed", f"upload_started_at {text[:40]!r} is not a time")
    return value


def _zero_if_tiny(value: float) -> float:
    """Magnitudes under 1e-12 become 0 (DynamoDB stores nothing below 1e-130)."""
    return 0.0 if abs(value) < _SMALLEST_REPORTED else value


def _reported(text: str, name: str, minimum: float) -> dict[str, float]:
    """A JSON object of a few named finite numbers in [minimum, MAX_REPORTED_VALUE]."""
    try:
        raw = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except CodecError as e:
        raise CodecError("metadata_malformed", f"{name}: {e.detail}") from e
    except (RecursionError, ValueError) as e:
        raise CodecError("metadata_malformed", f"{name} is not JSON") from e
    if not isinstance(raw, dict):
        raise CodecError("metadata_malformed", f"{name} is not a JSON object")
    if len(raw) > MAX_REPORTED_KEYS:
        raise CodecError("metadata_malformed", f"{name} has over {MAX_REPORTED_KEYS} keys")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not _REPORTED_KEY.fullmatch(k):
            raise CodecError("metadata_malformed", f"{name} key {k[:64]!r} is not a plain name")
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise CodecError("metadata_malformed", f"{name}[{k!r}] is not a number")
        value = float(v)
        if not minimum <= value <= MAX_REPORTED_VALUE:  # NaN and Inf fail too
            raise CodecError(
                "metadata_malformed",
                f"{name}[{k!r}] is not in {minimum:g}..{MAX_REPORTED_VALUE:g}",
            )
        out[k] = _zero_if_tiny(value)
    return out
