"""The global model a round names, checked before one step of training uses it.

A device trusts the model it downloads no less carefully than the averager trusts an update:
a bounded size, a safetensors header that parses within bounds (never a pickle), the model
format and the version the assignment names, exactly the task's tensor names, shapes and
dtypes, and only finite values. Anything else is a ``ModelRejected`` with a stable reason; the
client skips that round and keeps running.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sfl.learning import codec

if TYPE_CHECKING:
    import torch

MODEL_FORMAT = "sfl-model/1"  # what sfl.learning.codec.encode_model writes
# Header room per tensor (name, dtype, shape, offsets as JSON) beyond the metadata allowance.
_HEADER_BYTES_PER_TENSOR = 512
_HEADER_BASE_BYTES = 4096


class ModelRejected(ValueError):
    """The downloaded global model is unusable; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def header_limit(reference: Mapping[str, torch.Tensor]) -> int:
    """The largest header a model of this shape needs, with room for its metadata."""
    return (
        _HEADER_BASE_BYTES
        + _HEADER_BYTES_PER_TENSOR * len(reference)
        + codec.METADATA_ALLOWANCE_BYTES
    )


def size_limit(reference: Mapping[str, torch.Tensor]) -> int:
    """The largest file a model of this shape can be: its tensor bytes plus the header's."""
    data = sum(t.numel() * t.element_size() for t in reference.values())
    return 8 + header_limit(reference) + data


def check_global_model(
    data: bytes, *, version: int, reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's tensors if ``data`` is model ``version`` shaped like ``reference``.

    ``reference`` is a state dict of the task's freshly built model (only names, shapes and
    dtypes are compared). Raises ``ModelRejected``; never anything else for bad bytes.
    """
    import torch

    limit = size_limit(reference)
    if len(data) > limit:
        raise ModelRejected("too_large", f"{len(data)} bytes; a model of this task is <= {limit}")
    try:
        header = codec.parse_header(data, max_header_bytes=header_limit(reference))
    except codec.CodecError as e:
        raise ModelRejected(e.reason, e.detail) from e
    if header.metadata.get("format") != MODEL_FORMAT:
        raise ModelRejected(
            "not_a_model", f"format {header.metadata.get('format')!r}, expected {MODEL_FORMAT!r}"
        )
    if header.metadata.get("version") != str(version):
        raise ModelRejected(
            "wrong_version",
            f"header says version {header.metadata.get('version')!r}, the round uses {version}",
        )
    want = codec.parse_header(codec.encode(reference)).signature()
    got = header.signature()
    if got != want:
        differing = sorted(name for name in set(got) | set(want) if got.get(name) != want.get(name))
        raise ModelRejected(
            "tensor_signature",
            f"tensors differ from the task's model (names, shapes or dtypes): {differing[:5]}",
        )
    try:
        tensors = codec.decode(data, max_header_bytes=header_limit(reference))
    except codec.CodecError as e:
        raise ModelRejected(e.reason, e.detail) from e
    for name, t in tensors.items():
        if (t.dtype.is_floating_point or t.dtype.is_complex) and not bool(torch.isfinite(t).all()):
            raise ModelRejected("non_finite", f"tensor {name!r} holds NaN or Inf values")
    return tensors
