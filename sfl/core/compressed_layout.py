"""Update codecs without tensors: their names and parameter, and what an update holds.

What ``sfl.learning.compression`` encodes and decodes, seen from the header alone: which
tensors (names, dtypes, shapes) an update in each codec must hold, given the base model's, and
how large it may be. Torch-free, like ``sfl.core.header``, so the configuration (and the
initiator's zip) can name the codecs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sfl.core.header import CodecError, Header, dtype_size

UPDATE_CODECS = ("none", "fp16", "int8", "topk")
#: The header metadata key naming an update's codec; absent means ``none``.
CODEC_KEY = "update_codec"
DEFAULT_TOPK_FRACTION = 0.1
MIN_TOPK_FRACTION = 1e-4
FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
_INDEX_DTYPES = frozenset({"I32", "I64"})
SCALE, INDICES, VALUES = "#scale", "#indices", "#values"
# An encoded header names at most two tensors per base tensor, each entry at most ~20
# characters longer than the base's: three base headers bound it.
_HEADER_FACTOR = 3


@dataclass(frozen=True)
class UpdateCodec:
    """How a round's updates are encoded: the codec's name and its parameter."""

    name: str = "none"
    topk_fraction: float = DEFAULT_TOPK_FRACTION

    def __post_init__(self) -> None:
        if self.name not in UPDATE_CODECS:
            raise ValueError(f"update codec {self.name!r} is not one of {UPDATE_CODECS}")
        if not MIN_TOPK_FRACTION <= self.topk_fraction <= 1.0:  # NaN fails too
            raise ValueError(f"topk_fraction {self.topk_fraction} is not in {MIN_TOPK_FRACTION}..1")

    @classmethod
    def from_config(cls, config: Any) -> UpdateCodec:
        """From a ``FederationConfig`` (its ``update_codec`` and ``topk_fraction`` keys)."""
        return cls(config.update_codec, config.topk_fraction)

    def max_kept(self, numel: int) -> int:
        """The most entries a ``topk`` update may keep of a tensor with ``numel`` entries."""
        return min(numel, math.ceil(self.topk_fraction * numel))

    def header_limit(self, base_header_length: int, allowance: int) -> int:
        """The largest header an update may have, given the base model's header."""
        factor = 1 if self.name == "none" else _HEADER_FACTOR
        return factor * base_header_length + allowance

    def max_data_bytes(self, base: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
        """The most tensor bytes an update in this codec can hold, from the base's signature."""
        total = 0
        for dtype, shape in base.values():
            numel = math.prod(shape)
            if dtype not in FLOATS or self.name == "none":
                total += numel * dtype_size(dtype)
            elif self.name == "fp16":
                total += 2 * numel
            elif self.name == "int8":
                total += numel + 4
            else:
                total += self.max_kept(numel) * (8 + 4)
        return total


def largest_header(base_header_length: int, allowance: int) -> int:
    """The largest header an update in any codec may have, given the base model's header."""
    return _HEADER_FACTOR * base_header_length + allowance


def codec_name(header: Header) -> str:
    """The codec an update's header names, if it is one we know."""
    name = header.metadata.get(CODEC_KEY, "none")
    if name not in UPDATE_CODECS:
        raise CodecError(
            "unknown_codec", f"update codec {name[:40]!r} is not one of {UPDATE_CODECS}"
        )
    return name


def collides(base: Mapping[str, Any], codec: UpdateCodec) -> bool:
    return any(name + suffix in base for name in base for suffix in _suffixes(codec.name))


def _suffixes(codec: str) -> tuple[str, ...]:
    return {"int8": (SCALE,), "topk": (INDICES, VALUES)}.get(codec, ())


def check_layout(
    header: Header, base: Mapping[str, tuple[str, tuple[int, ...]]], codec: UpdateCodec
) -> None:
    """The header's tensors are exactly what ``codec`` makes of the base model's tensors."""
    got = header.signature()
    want = _layout(base, codec.name)
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise CodecError(
            "tensor_names",
            f"missing {[n[:64] for n in missing[:5]]}, unexpected {[n[:64] for n in extra[:5]]}"
            f" (vs. base model, codec {codec.name})",
        )
    for name, (dtypes, shape) in want.items():
        dtype, got_shape = got[name]
        if dtype not in dtypes:
            raise CodecError(
                "tensor_dtype", f"tensor {name[:64]!r} is {dtype}, expected {'/'.join(dtypes)}"
            )
        if got_shape != shape and (shape is not None or len(got_shape) != 1):
            raise CodecError(
                "tensor_shape",
                f"tensor {name[:64]!r} has shape {list(got_shape)[:8]}, "
                f"expected {'1-D' if shape is None else list(shape)}",
            )
    if codec.name == "topk":
        for name, (dtype, shape) in base.items():
            if dtype not in FLOATS:
                continue
            (kept,) = got[name + INDICES][1]
            limit = codec.max_kept(math.prod(shape))
            if got[name + VALUES][1] != (kept,):
                raise CodecError(
                    "tensor_shape", f"tensor {name[:64]!r}: indices and values differ in length"
                )
            if kept > limit:
                raise CodecError(
                    "topk_too_many", f"tensor {name[:64]!r} keeps {kept} entries, at most {limit}"
                )


_Layout = dict[str, tuple[frozenset[str], tuple[int, ...] | None]]


def _layout(base: Mapping[str, tuple[str, tuple[int, ...]]], codec: str) -> _Layout:
    """Each tensor an update in ``codec`` must hold: allowed dtypes and shape (None: 1-D)."""
    out: _Layout = {}
    if any(name + suffix in base for name in base for suffix in _suffixes(codec)):
        raise CodecError("codec_unusable", f"the base model's tensor names collide with {codec}'s")
    for name, (dtype, shape) in base.items():
        if dtype not in FLOATS or codec == "none":
            out[name] = (frozenset({dtype}), shape)
        elif codec == "fp16":
            out[name] = (frozenset({"F16"}), shape)
        elif codec == "int8":
            out[name] = (frozenset({"I8"}), shape)
            out[name + SCALE] = (frozenset({"F32"}), ())
        else:
            out[name + INDICES] = (_INDEX_DTYPES, None)
            out[name + VALUES] = (frozenset({"F32"}), None)
    return out
