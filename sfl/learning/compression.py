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
from typing import TYPE_CHECKING

from sfl.core.compressed_layout import (
    CODEC_KEY,
    DEFAULT_TOPK_FRACTION,
    INDICES,
    MIN_TOPK_FRACTION,
    SCALE,
    UPDATE_CODECS,
    VALUES,
    UpdateCodec,
    check_layout,
    codec_name,
    collides,
    largest_header,
)
from sfl.core.header import MAX_HEADER_BYTES, CodecError, parse_header

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODEC_KEY",
    "DEFAULT_TOPK_FRACTION",
    "MIN_TOPK_FRACTION",
    "UPDATE_CODECS",
    "UpdateCodec",
    "check_layout",
    "codec_name",
    "decode_update",
    "encode_update",
    "largest_header",
    "signature",
]
_FP16_MAX = 65504.0
_I32_MAX = 2**31 - 1


# --- encoding (the edge client) ----------------------------------------------------------


def encode_update(
    update: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    codec: UpdateCodec,
    metadata: Mapping[str, str],
) -> bytes:
    """The update's upload bytes: its tensors (``none``) or its compressed delta from ``base``."""
    from sfl.learning import codec as wire

    if codec.name == "none":
        return wire.encode(update, metadata)
    if collides(base, codec):
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
        return {name: q, name + SCALE: scale}
    flat = delta.flatten()
    kept = codec.max_kept(flat.numel())
    indices = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
    index_dtype = torch.int32 if flat.numel() <= _I32_MAX else torch.int64
    return {
        name + INDICES: indices.to(index_dtype),
        name + VALUES: flat[indices].to(torch.float32),
    }


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
    from sfl.learning import codec as wire

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
        scale = float(tensors[name + SCALE])
        if not 0.0 < scale < math.inf:  # NaN fails too
            raise CodecError("bad_scale", f"tensor {name[:64]!r}: scale {scale!r} is not > 0")
        return tensors[name].to(wide) * scale
    indices = tensors[name + INDICES].to(torch.int64)
    values = tensors[name + VALUES]
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
