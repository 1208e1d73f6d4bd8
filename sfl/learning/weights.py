"""A user's own weights as a federation's first model: read safely, checked against the task.

People fine-tune pretrained models, so a federation may start from a file of weights rather
than from ``build_model(seed)``: a safetensors file, or a PyTorch state dict saved with
``torch.save``. The latter is read with ``torch.load(weights_only=True)`` only (tensors and
plain containers; any other pickled object is refused, never run). The tensors must be the
task's model's exactly (names, shapes, dtypes) and finite; the differences are listed when
they are not. The model written from them names its source (file name and SHA-256).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from sfl.learning import codec

# How many differences a refusal lists before "and N more".
_LISTED = 20
# torch's words for the object a weights-only load refused.
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL [\w.]+")
# Keys under which checkpoints commonly nest the state dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


class WeightsError(ValueError):
    """A weights file cannot start this task's federation; the message says why."""


@dataclass(frozen=True)
class UserWeights:
    """Weights read from a user's file, checked against the task's model."""

    tensors: dict[str, torch.Tensor]
    file_name: str
    sha256: str
    format: str  # "safetensors" | "torch"

    def source(self) -> dict[str, str]:
        """Where version 0 came from, as its header metadata and lineage record it."""
        return {"source_file": self.file_name, "source_sha256": self.sha256}

    def model_bytes(self) -> bytes:
        """Global model version 0, as every version is stored."""
        return codec.encode_model(self.tensors, version=0, **self.source())


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    length = int.from_bytes(data[:8], "little")
    return 0 < length <= len(data) - 8 and data[8:9] == b"{"


def _read(data: bytes, name: str) -> tuple[Mapping[str, Any], str]:
    if _looks_like_safetensors(data):
        try:
            return load_safetensors(data), "safetensors"
        except SafetensorError as e:
            raise WeightsError(f"{name}: not a readable safetensors file: {e}") from e
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED.search(str(e))
        what = f" ({found.group(0)})" if found else ""
        raise WeightsError(
            f"{name}: refused: it holds more than weights{what}, which torch.load with "
            "weights_only=True will not run. Save the state dict alone "
            "(torch.save(model.state_dict(), path)) or as safetensors"
        ) from e
    except Exception as e:  # whatever torch makes of bytes that are not a checkpoint
        raise WeightsError(
            f"{name}: not a safetensors file nor a PyTorch state dict "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{name}: holds a {type(loaded).__name__}, not a state dict")
    for key in _NESTED_KEYS:
        nested = loaded.get(key)
        if isinstance(nested, Mapping) and nested and not isinstance(nested, torch.Tensor):
            loaded = nested
            break
    return loaded, "torch"


def differences(given: Mapping[str, Any], reference: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``given`` differs from the task's model's state dict, one line each."""
    lines: list[str] = []
    for name in sorted(set(reference) - set(given)):
        ref = reference[name]
        lines.append(f"missing {name} ({tuple(ref.shape)} {_dtype(ref.dtype)})")
    for name in sorted(set(given) - set(reference)):
        lines.append(f"unexpected {name}")
    for name in sorted(set(given) & set(reference)):
        value, ref = given[name], reference[name]
        if not isinstance(value, torch.Tensor):
            lines.append(f"{name}: a {type(value).__name__}, not a tensor")
        elif value.shape != ref.shape:
            lines.append(f"{name}: shape {tuple(value.shape)}, the model's is {tuple(ref.shape)}")
        elif value.dtype != ref.dtype:
            lines.append(f"{name}: dtype {_dtype(value.dtype)}, the model's is {_dtype(ref.dtype)}")
        elif value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            lines.append(f"{name}: holds NaN or infinite values")
    return lines


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_weights(path: Path, reference: Mapping[str, torch.Tensor]) -> UserWeights:
    """The weights in ``path``, exactly the names, shapes and dtypes of ``reference`` (the
    task's model's state dict) and finite; ``WeightsError`` listing what differs."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read: {e}") from e
    loaded, kind = _read(data, path.name)
    found = differences(loaded, reference)
    if found:
        listed = found[:_LISTED]
        more = f"\n  ... and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
        raise WeightsError(
            f"{path.name} does not fit the task's model ({len(found)} difference"
            f"{'s' if len(found) != 1 else ''}):\n  " + "\n  ".join(listed) + more
        )
    return UserWeights(
        tensors={name: loaded[name].detach().contiguous().clone() for name in reference},
        file_name=path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        format=kind,
    )
