"""Is this client update acceptable? The checks of the round protocol, in cheap-first order.

Size (against the base model's own size), then the header length (against the base model's
header), then the header (bounds, metadata, tensor names/shapes/dtypes against the base
model, in the round's update codec: ``sfl.learning.compression``), then the values (decoded to full
tensors, all finite, and a change from the base model). Anything wrong
raises ``UpdateRejected`` with a stable reason code and a sentence for the logs; nothing
here touches the global model, and nothing here does I/O.

A device that cannot give an update uploads a decline instead (``sfl.core.decline``): the
same key, a header with no tensors. ``read_decline`` tells one from an update and checks it
as strictly (its round, client and base version against the round's, its reason from the
fixed set); the averager then records it as the client's answer, with no weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sfl.core.decline import Decline, is_decline
from sfl.learning.codec import (
    METADATA_ALLOWANCE_BYTES,
    CodecError,
    Header,
    UpdateMetadata,
    decode,
    parse_header,
)
from sfl.learning.compression import UpdateCodec, check_layout, codec_name, decode_update

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
    codec: UpdateCodec = field(default_factory=UpdateCodec)  # the round's update_codec

    @property
    def max_header_bytes(self) -> int:
        """The base model's header (or, compressed, what the codec makes of it) plus room
        for the update's metadata."""
        return self.codec.header_limit(self.base_header.header_length, METADATA_ALLOWANCE_BYTES)

    @property
    def size_limit(self) -> int:
        """An update holds what the codec makes of the base model's tensors, so its size
        is bounded by theirs plus its header; never more than ``max_update_bytes``."""
        if self.base_header.data_length <= 0:
            return self.max_bytes
        data = self.codec.max_data_bytes(self.base_header.signature())
        return min(self.max_bytes, 8 + self.max_header_bytes + data)


@dataclass(frozen=True)
class AcceptedUpdate:
    metadata: UpdateMetadata
    tensors: dict[str, torch.Tensor]
    delta_norm: float | None = None  # L2 norm of (update - base), when the base was given


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise UpdateRejected("too_large", f"{size} bytes is over the {max_bytes}-byte limit")


def validate_update(
    data: bytes, expected: Expected, base: Mapping[str, torch.Tensor] | None = None
) -> AcceptedUpdate:
    """The update in ``data``, checked against the round; ``UpdateRejected`` otherwise.

    With ``base`` (the round's base model), also measures the update's change from it and
    refuses an update that changes nothing (a free rider).
    """
    import torch

    check_size(len(data), expected.size_limit)
    try:
        # The header-length bound is checked from the first 8 bytes, before any JSON.
        header = parse_header(data, max_header_bytes=expected.max_header_bytes)
        metadata = UpdateMetadata.from_header(header.metadata)
    except CodecError as e:
        raise UpdateRejected(e.reason, e.detail) from e
    _check_claims(metadata.round, metadata.client_id, metadata.base_version, expected)
    if not 0 < metadata.num_examples <= expected.max_num_examples:
        raise UpdateRejected(
            "bad_num_examples",
            f"num_examples {metadata.num_examples} is not in 1..{expected.max_num_examples}",
        )
    try:
        if codec_name(header) != expected.codec.name:
            raise CodecError(
                "wrong_codec",
                f"update is encoded {codec_name(header)!r}, the round asks {expected.codec.name!r}",
            )
        check_layout(header, expected.base_header.signature(), expected.codec)
        if base is not None:
            tensors = decode_update(
                data, base, codec=expected.codec, max_header_bytes=expected.max_header_bytes
            )
        elif expected.codec.name == "none":
            tensors = decode(data, max_header_bytes=expected.max_header_bytes)
        else:
            raise CodecError("no_base", "a compressed update is decoded against the base model")
    except CodecError as e:
        raise UpdateRejected(e.reason, e.detail) from e
    for name, t in tensors.items():
        if (t.dtype.is_floating_point or t.dtype.is_complex) and not bool(torch.isfinite(t).all()):
            raise UpdateRejected("non_finite", f"tensor {name!r} holds NaN or Inf values")
    norm = None
    if base is not None:
        norm = delta_norm(tensors, base)
        if norm == 0.0:
            raise UpdateRejected("no_change", "the update is the base model unchanged")
        if not math.isfinite(norm):
            raise UpdateRejected("non_finite", "the update's change from the base overflows")
    return AcceptedUpdate(metadata=metadata, tensors=tensors, delta_norm=norm)


def read_decline(data: bytes, expected: Expected) -> Decline | None:
    """The decline in ``data``, checked against the round; ``UpdateRejected`` for a decline
    that is malformed or claims another round, client or base; None when ``data`` does not
    say it is a decline (an update, or bytes ``validate_update`` refuses in its own words)."""
    check_size(len(data), expected.size_limit)
    try:
        header = parse_header(data, max_header_bytes=expected.max_header_bytes)
    except CodecError:
        return None
    if not is_decline(header.metadata):
        return None
    if header.tensors or header.data_length:
        raise UpdateRejected("malformed_decline", "a decline carries no tensors")
    try:
        decline = Decline.from_header(header.metadata)
    except CodecError as e:
        raise UpdateRejected(e.reason, e.detail) from e
    _check_claims(decline.round, decline.client_id, decline.base_version, expected)
    return decline


def _check_claims(round_: int, client_id: str, base_version: int, expected: Expected) -> None:
    """What the header claims about where it belongs, against the round and the key."""
    if round_ != expected.round:
        raise UpdateRejected(
            "wrong_round", f"metadata says round {round_}, key says {expected.round}"
        )
    if client_id != expected.client_id:
        raise UpdateRejected(
            "wrong_client", f"metadata says client {client_id!r}, key says {expected.client_id!r}"
        )
    if base_version != expected.base_version:
        raise UpdateRejected(
            "wrong_base_version",
            f"trained from model version {base_version}, round uses {expected.base_version}",
        )


def delta_norm(update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """L2 norm, in float64, of the update's change from the base over its float tensors."""
    import torch

    total = 0.0
    for name, t in update.items():
        if not t.dtype.is_floating_point:
            continue
        diff = t.to(torch.float64) - base[name].to(torch.float64)
        total += float(torch.sum(diff * diff))
    return math.sqrt(total)
