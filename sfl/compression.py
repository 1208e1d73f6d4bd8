"""Update compression: a client uploads its change from the round's base model, smaller.

Codecs (chosen by the round's ``update_codec``; the update names it in its header metadata):

- ``none``: today's format, the trained tensors themselves.
- ``fp16``: each float tensor's delta (update - base) in float16, under the tensor's name.
- ``int8``: each float tensor's delta quantised to int8 with one float32 scale per tensor
  (``name`` holds the int8 values, ``name#scale`` a float32 scalar): delta = q * scale.
- ``topk``: each float tensor keeps only its k largest-magnitude delta entries
  (``name#indices``, int32 or int64, and ``name#values``, float32, both of length
  k <= ceil(topk_fraction * numel)); every other entry of the delta is 0.

Tensors that are not floating point (counters, integer buffers) travel whole in every codec.
The file stays safetensors, never pickle. ``decode_update`` is the one way back to full
tensors, for acceptance and for the aggregation's read path alike; device bytes are
hostile, so it checks every name, dtype, shape, index, scale and value, and raises
``CodecError`` with a stable reason for anything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sfl.header import MAX_HEADER_BYTES, CodecError, Header, dtype_size, parse_header

if TYPE_CHECKING:
    import torch

UPDATE_CODECS = ("none", "fp16", "int8", "topk")
#: The header metadata key naming an update's codec; absent means ``none``.
CODEC_KEY = "update_codec"
DEFAULT_TOPK_FRACTION = 0.1
MIN_TOPK_FRACTION = 1e-4
_FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
_INDEX_DTYPES = frozenset({"I32", "I64"})
_SCALE, _INDICES, _VALUES = "#scale", "#indices", "#values"
_FP16_MAX = 65504.0
_I32_MAX = 2**31 - 1
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
            if dtype not in _FLOATS or self.name == "none":
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


# --- encoding (the edge client) ----------------------------------------------------------


def encode_update(
    update: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    codec: UpdateCodec,
    metadata: Mapping[str, str],
) -> bytes:
    """The update's upload bytes: its tensors (``none``) or its compressed delta from ``base``."""
    from sfl import codec as wire

    if codec.name == "none":
        return wire.encode(update, metadata)
    if _collides(base, codec):
        raise ValueError(f"tensor names of this model collide with the {codec.name} codec's")
    tensors: dict[str, torch.Tensor] = {}
    for name, start in base.items():
        value = update[name].detach()
        if not start.dtype.is_floating_point:
            tensors[name] = value
            continue
        delta = value.to(_wide(start)) - start.to(_wide(start))
        tensors.update(_encode_delta(name, delta, codec))
    return wire.encode(tensors, {**metadata, CODEC_KEY: codec.name})


def _encode_delta(name: str, delta: torch.Tensor, codec: UpdateCodec) -> dict[str, torch.Tensor]:
    import torch

    if codec.name == "fp16":
        return {name: delta.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)}
    if codec.name == "int8":
        peak = float(delta.abs().max()) if delta.numel() else 0.0
        scale = torch.tensor(peak / 127.0, dtype=torch.float32)
        if not float(scale) > 0.0:  # an unchanged tensor, or a change below float32's range
            scale = torch.tensor(1.0, dtype=torch.float32)
        q = torch.round(delta / scale.to(delta.dtype)).clamp(-127, 127).to(torch.int8)
        return {name: q, name + _SCALE: scale}
    flat = delta.flatten()
    kept = codec.max_kept(flat.numel())
    indices = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
    index_dtype = torch.int32 if flat.numel() <= _I32_MAX else torch.int64
    return {
        name + _INDICES: indices.to(index_dtype),
        name + _VALUES: flat[indices].to(torch.float32),
    }


def _collides(base: Mapping[str, Any], codec: UpdateCodec) -> bool:
    return any(name + suffix in base for name in base for suffix in _suffixes(codec.name))


def _suffixes(codec: str) -> tuple[str, ...]:
    return {"int8": (_SCALE,), "topk": (_INDICES, _VALUES)}.get(codec, ())


# --- decoding (the averager) -------------------------------------------------------------


def decode_update(
    data: bytes,
    base: Mapping[str, torch.Tensor],
    *,
    codec: UpdateCodec | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> dict[str, torch.Tensor]:
    """The update's full tensors (base + decoded delta), checked; ``CodecError`` otherwise.

    ``codec`` is what the round asked for: the update must name that codec, and a ``topk``
    update keep at most its fraction. Without it (an update accepted earlier), the update's
    own codec is decoded, with the bound that k never exceeds a tensor's size.
    """
    from sfl import codec as wire

    header = parse_header(data, max_header_bytes=max_header_bytes)
    name = codec_name(header)
    if codec is not None and name != codec.name:
        raise CodecError(
            "wrong_codec", f"update is encoded {name!r}, the round asks {codec.name!r}"
        )
    bound = codec if codec is not None else UpdateCodec(name, 1.0)
    check_layout(header, signature(base), bound)
    tensors = wire.decode(data, max_header_bytes=max_header_bytes)
    out: dict[str, torch.Tensor] = {}
    for tensor_name, start in base.items():
        out[tensor_name] = _full_tensor(tensor_name, start, tensors, name)
    return out


def signature(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, safetensors dtypes and shapes, as ``Header.signature`` gives them."""
    return {name: (_dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()}


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
            if dtype not in _FLOATS:
                continue
            (kept,) = got[name + _INDICES][1]
            limit = codec.max_kept(math.prod(shape))
            if got[name + _VALUES][1] != (kept,):
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
        if dtype not in _FLOATS or codec == "none":
            out[name] = (frozenset({dtype}), shape)
        elif codec == "fp16":
            out[name] = (frozenset({"F16"}), shape)
        elif codec == "int8":
            out[name] = (frozenset({"I8"}), shape)
            out[name + _SCALE] = (frozenset({"F32"}), ())
        else:
            out[name + _INDICES] = (_INDEX_DTYPES, None)
            out[name + _VALUES] = (frozenset({"F32"}), None)
    return out


def _full_tensor(
    name: str, start: torch.Tensor, tensors: Mapping[str, torch.Tensor], codec: str
) -> torch.Tensor:
    import torch

    if codec == "none" or not start.dtype.is_floating_point:
        value = tensors[name]
    else:
        delta = _delta(name, start, tensors, codec)
        value = (start.to(_wide(start)) + delta).to(start.dtype)
    if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
        raise CodecError("non_finite", f"tensor {name[:64]!r} holds NaN or Inf values")
    return value


def _delta(
    name: str, start: torch.Tensor, tensors: Mapping[str, torch.Tensor], codec: str
) -> torch.Tensor:
    import torch

    wide = _wide(start)
    if codec == "fp16":
        return tensors[name].to(wide)
    if codec == "int8":
        scale = float(tensors[name + _SCALE])
        if not 0.0 < scale < math.inf:  # NaN fails too
            raise CodecError("bad_scale", f"tensor {name[:64]!r}: scale {scale!r} is not > 0")
        return tensors[name].to(wide) * scale
    indices = tensors[name + _INDICES].to(torch.int64)
    values = tensors[name + _VALUES]
    numel = start.numel()
    if indices.numel() and not (int(indices.min()) >= 0 and int(indices.max()) < numel):
        raise CodecError("index_out_of_range", f"tensor {name[:64]!r}: an index is not < {numel}")
    if int(torch.unique(indices).numel()) != indices.numel():
        raise CodecError("duplicate_index", f"tensor {name[:64]!r} repeats an index")
    if not bool(torch.isfinite(values).all()):
        raise CodecError("non_finite", f"tensor {name[:64]!r} holds NaN or Inf values")
    delta = torch.zeros(numel, dtype=wide)
    delta[indices] = values.to(wide)
    return delta.reshape(start.shape)


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype deltas are computed in: float64 for a float64 tensor, else float32."""
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }  # fmt: skip
    if dtype not in names:
        raise ValueError(f"the base model holds a {dtype} tensor, which no codec handles")
    return names[dtype]
