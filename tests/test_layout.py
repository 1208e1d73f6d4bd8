"""Bucket layout: keys name the round and client; anything else is refused by name."""

from __future__ import annotations

import pytest

from sfl.core import layout


def test_update_key_round_trip() -> None:
    key = layout.update_key("client-07", 12)
    assert key == "updates/client-07/round-000012.safetensors"
    assert layout.parse_update_key(key) == layout.UpdateKey("client-07", 12)


def test_model_keys_are_deterministic_per_version() -> None:
    assert layout.model_key(0) == "models/global/v000000.safetensors"
    assert layout.model_key(15) == "models/global/v000015.safetensors"


@pytest.mark.parametrize(
    "key",
    [
        "updates/client-07/round-12.safetensors",
        "updates/client 07/round-000012.safetensors",
        "updates/../round-000012.safetensors",
        "updates/clïent/round-000012.safetensors",
        "updates/a/b/round-000012.safetensors",
        "models/global/v000001.safetensors",
        "updates/client-07/round-000012.pt",
        "updates/client-07/round-000000.safetensors",
    ],
)
def test_malformed_keys_are_rejected(key: str) -> None:
    with pytest.raises(layout.MalformedKeyError):
        layout.parse_update_key(key)
