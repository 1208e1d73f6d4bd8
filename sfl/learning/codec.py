"""Model and update files on the wire: safetensors only, never pickle.

The header and metadata checks live in ``sfl.core.header`` (torch-free) and are re-exported
here; this module adds writing and reading the tensors, after those checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sfl.core.header import (
    FORMAT,
    MAX_BYTES_DOWN,
    MAX_HEADER_BYTES,
    MAX_REPORTED_KEYS,
    MAX_REPORTED_VALUE,
    METADATA_ALLOWANCE_BYTES,
    CodecError,
    Header,
    TensorInfo,
    UpdateMetadata,
    header_length,
    parse_header,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "MAX_BYTES_DOWN",
    "MAX_HEADER_BYTES",
    "MAX_REPORTED_KEYS",
    "MAX_REPORTED_VALUE",
    "METADATA_ALLOWANCE_BYTES",
    "CodecError",
    "Header",
    "TensorInfo",
    "UpdateMetadata",
    "decode",
    "encode",
    "encode_model",
    "header_length",
    "parse_header",
]


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
