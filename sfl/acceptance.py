"""Is this client update acceptable? The checks of the round protocol, in cheap-first order.

Size, then the header (bounds, metadata, tensor names/shapes/dtypes against the base model),
then the values (all finite). Anything wrong raises ``UpdateRejected`` with a stable reason
code and a sentence for the logs; nothing here touches the global model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sfl.codec import CodecError, Header, UpdateMetadata, decode, parse_header

if TYPE_CHECKING:
    import torch


class UpdateRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Expected:
    """What the round and the key say the update must be."""

    round: int
    client_id: str
    base_version: int
    base_header: Header
    max_bytes: int
    max_num_examples: int


@dataclass(frozen=True)
class AcceptedUpdate:
    metadata: UpdateMetadata
    tensors: dict[str, torch.Tensor]


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise UpdateRejected("too_large", f"{size} bytes is over the {max_bytes}-byte limit")


def validate_update(data: bytes, expected: Expected) -> AcceptedUpdate:
    import torch

    check_size(len(data), expected.max_bytes)
    try:
        header = parse_header(data)
        metadata = UpdateMetadata.from_header(header.metadata)
    except CodecError as e:
        raise UpdateRejected(e.reason, e.detail) from e
    if metadata.round != expected.round:
        raise UpdateRejected(
            "wrong_round", f"metadata says round {metadata.round}, key says {expected.round}"
        )
    if metadata.client_id != expected.client_id:
        raise UpdateRejected(
            "wrong_client",
            f"metadata says client {metadata.client_id!r}, key says {expected.client_id!r}",
        )
    if metadata.base_version != expected.base_version:
        raise UpdateRejected(
            "wrong_base_version",
            f"trained from model version {metadata.base_version}, "
            f"round uses {expected.base_version}",
        )
    if not 0 < metadata.num_examples <= expected.max_num_examples:
        raise UpdateRejected(
            "bad_num_examples",
            f"num_examples {metadata.num_examples} is not in 1..{expected.max_num_examples}",
        )
    want = expected.base_header.signature()
    got = header.signature()
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise UpdateRejected(
            "tensor_names", f"missing {missing[:5]}, unexpected {extra[:5]} (vs. base model)"
        )
    for name, (dtype, shape) in want.items():
        if got[name][0] != dtype:
            raise UpdateRejected(
                "tensor_dtype", f"tensor {name!r} is {got[name][0]}, base model has {dtype}"
            )
        if got[name][1] != shape:
            raise UpdateRejected(
                "tensor_shape",
                f"tensor {name!r} has shape {list(got[name][1])}, base model has {list(shape)}",
            )
    try:
        tensors = decode(data)
    except CodecError as e:
        raise UpdateRejected(e.reason, e.detail) from e
    for name, t in tensors.items():
        if (t.dtype.is_floating_point or t.dtype.is_complex) and not bool(torch.isfinite(t).all()):
            raise UpdateRejected("non_finite", f"tensor {name!r} holds NaN or Inf values")
    return AcceptedUpdate(metadata=metadata, tensors=tensors)
