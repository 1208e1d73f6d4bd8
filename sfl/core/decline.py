"""A device's decline: "picked, but I cannot give an update this round", and why.

A decline travels the path of an update, so a device needs no new permission: it is a
safetensors file with no tensors at the device's own update key
(``updates/<client>/round-<n>.safetensors``), whose header metadata says
``format: sfl-decline/1`` with the round, the client, the base version, a reason from the
fixed set ``DeclineReason`` and a short detail. The averager records it as that client's
answer (declined, with the reason), gives it no weight, and counts it as answered for the
quorum, so the round does not wait for a device that has nothing to give.

Everything in a decline is the device's to say, so it is parsed like an update's metadata:
exactly the known keys, integers bounded, a reason outside the set refused
(``unknown_decline_reason``), the detail cut to ``MAX_DETAIL_CHARS`` printable characters.
Torch-free: the device writes it and the averager reads it with ``sfl.core.header``.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from sfl.core.header import CodecError, check_client_id, strict_int

DECLINE_FORMAT = "sfl-decline/1"
#: A decline's detail is a hint for the operator, not a log: longer ones are cut.
MAX_DETAIL_CHARS = 200
_KEYS = frozenset({"format", "round", "client_id", "base_version", "reason", "detail"})


class DeclineReason(str, enum.Enum):  # noqa: UP042 (devices may run Python 3.10)
    """Why a picked device gives no update: the whole set a decline may name."""

    def __str__(self) -> str:
        return str(self.value)

    NO_DATA = "no_data"  # a missing or empty data directory, or no training examples
    TOO_FEW_EXAMPLES = "too_few_examples"  # fewer than the round's ``min_examples``
    TASK_FAILED = "task_failed"  # the task raised while loading, training or evaluating
    NON_FINITE_LOSS = "non_finite_loss"  # training or evaluation reported NaN or Inf
    NON_FINITE_MODEL = "non_finite_model"  # the trained model holds NaN or Inf
    WRONG_SHAPE = "wrong_shape"  # the trained model's names, shapes or dtypes changed
    DEADLINE = "deadline"  # training did not end before the round's deadline


def is_decline(metadata: Mapping[str, str]) -> bool:
    """Does this header's metadata say it is a decline (not an update)?"""
    return metadata.get("format") == DECLINE_FORMAT


def clean_detail(text: str) -> str:
    """At most ``MAX_DETAIL_CHARS`` characters, non-printable ones shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_DETAIL_CHARS])


@dataclass(frozen=True)
class Decline:
    """What a device says when it declines a round."""

    round: int
    client_id: str
    base_version: int
    reason: DeclineReason
    detail: str = ""

    def to_header(self) -> dict[str, str]:
        return {
            "format": DECLINE_FORMAT,
            "round": str(self.round),
            "client_id": self.client_id,
            "base_version": str(self.base_version),
            "reason": self.reason.value,
            "detail": clean_detail(self.detail),
        }

    def encode(self) -> bytes:
        """The decline as a safetensors file with no tensors (its header only)."""
        header = json.dumps({"__metadata__": self.to_header()}, sort_keys=True).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
        return struct.pack("<Q", len(header)) + header

    @classmethod
    def from_header(cls, metadata: Mapping[str, str]) -> Decline:
        """Parse what the device claims; anything but a well-formed decline is a
        ``CodecError`` with a stable reason."""
        if not is_decline(metadata):
            raise CodecError("metadata_missing", f"metadata 'format' is not {DECLINE_FORMAT!r}")
        missing = sorted(_KEYS - {"detail"} - set(metadata))
        if missing:
            raise CodecError("metadata_missing", f"decline lacks {', '.join(missing)}")
        extra = sorted(set(metadata) - _KEYS)
        if extra:
            names = ", ".join(repr(k[:32]) for k in extra[:4])
            raise CodecError("metadata_malformed", f"a decline holds only {sorted(_KEYS)}: {names}")
        try:
            reason = DeclineReason(metadata["reason"])
        except ValueError:
            raise CodecError(
                "unknown_decline_reason",
                f"{metadata['reason'][:40]!r} is not one of {[r.value for r in DeclineReason]}",
            ) from None
        return cls(
            round=strict_int(metadata["round"], "round"),
            client_id=check_client_id(metadata["client_id"]),
            base_version=strict_int(metadata["base_version"], "base_version"),
            reason=reason,
            detail=clean_detail(metadata.get("detail", "")),
        )
