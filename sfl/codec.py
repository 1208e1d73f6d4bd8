"""Model and update files on the wire: safetensors only, never pickle.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor names,
dtypes, shapes, byte offsets, and a ``__metadata__`` map of strings), then raw bytes. The
header is parsed here with bounds checks before anything else is trusted, so a pickle, a
zip from ``torch.save``, a truncated file or a lying header is rejected with a reason.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT = "sfl-update/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


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

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (t.dtype, t.shape) for name, t in self.tensors.items()}


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
    try:
        raw = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError("not_safetensors", f"header is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CodecError("not_safetensors", "header is not a JSON object")
    metadata = raw.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("metadata_malformed", "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in raw.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError("not_safetensors", f"tensor {name!r} entry is malformed") from e
        if dtype not in _DTYPE_SIZES or any(d < 0 for d in shape):
            raise CodecError("not_safetensors", f"tensor {name!r}: bad dtype or shape")
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype] or begin < 0:
            raise CodecError("not_safetensors", f"tensor {name!r}: offsets disagree with shape")
        tensors[name] = TensorInfo(dtype=dtype, shape=shape)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise CodecError("not_safetensors", f"tensor {name!r}: data is not contiguous")
        position = end
    if 8 + length + position != size:
        raise CodecError(
            "truncated",
            f"file is {size} bytes, header describes {8 + length + position}",
        )
    return Header(tensors=tensors, metadata=metadata, data_start=8 + length)


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
        if not metadata or metadata.get("format") != FORMAT:
            raise CodecError("metadata_missing", f"header metadata 'format' is not {FORMAT!r}")
        missing = [
            k for k in ("round", "client_id", "base_version", "num_examples") if k not in metadata
        ]
        if missing:
            raise CodecError("metadata_missing", f"metadata lacks {', '.join(missing)}")
        try:
            num_examples = _strict_int(metadata["num_examples"], "num_examples")
            return cls(
                round=_strict_int(metadata["round"], "round"),
                client_id=metadata["client_id"],
                base_version=_strict_int(metadata["base_version"], "base_version"),
                num_examples=num_examples,
                metrics=_float_map(metadata.get("metrics", "{}"), "metrics"),
                timings=_float_map(metadata.get("timings", "{}"), "timings"),
                bytes_down=_strict_int(metadata.get("bytes_down", "0"), "bytes_down"),
                upload_started_at=float(metadata.get("upload_started_at", "0")),
            )
        except ValueError as e:
            if isinstance(e, CodecError):
                raise
            raise CodecError("metadata_malformed", str(e)) from e


def _strict_int(text: str, name: str) -> int:
    if not text.lstrip("-").isdigit():
        raise CodecError("metadata_malformed", f"{name} {text!r} is not an integer")
    return int(text)


def _float_map(text: str, name: str) -> dict[str, float]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CodecError("metadata_malformed", f"{name} is not JSON") from e
    if not isinstance(raw, dict):
        raise CodecError("metadata_malformed", f"{name} is not a JSON object")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise CodecError("metadata_malformed", f"{name}[{k!r}] is not a finite number")
        out[str(k)] = float(v)
    return out


# --- tensors (torch) ------------------------------------------------------------------


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(
        {k: v.detach().contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {})
    )


def decode(data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes, after the header checks; never unpickles."""
    from safetensors.torch import load

    parse_header(data, max_header_bytes=max_header_bytes)
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise CodecError("not_safetensors", f"safetensors could not read the tensors: {e}") from e


def encode_model(state: Mapping[str, torch.Tensor], *, version: int, **extra: Any) -> bytes:
    metadata = {"format": "sfl-model/1", "version": str(version)}
    metadata.update({k: str(v) for k, v in extra.items()})
    return encode(state, metadata)
