"""A round's base model, decoded once per container.

Model versions never change once written, so the latest one asked for is kept (one model,
so a container's memory stays bounded): judging each update, aggregating and summing a shard
all compare against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sfl.learning.codec import decode

if TYPE_CHECKING:
    import torch

    from sfl.state.model_store import ModelStore

_BASE_MODEL: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def base_model(models: ModelStore, version: int) -> dict[str, torch.Tensor]:
    """A model version's tensors; the latest one asked for is cached per container."""
    cache_key = (models.bucket, version)
    model = _BASE_MODEL.get(cache_key)
    if model is None:
        model = decode(models.model_bytes(version))
        _BASE_MODEL.clear()
        _BASE_MODEL[cache_key] = model
    return model
