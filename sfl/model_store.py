"""The models bucket as one class: model versions and the server state beside them.

Both are written once (``If-None-Match: *``): a retried aggregation finds what the first
attempt wrote and keeps it. Versions never change once written, so their headers are cached
per process, and the newest model's tensors too (one model: memory stays bounded).
boto3 only at import time; tensors (torch) only when a method returns them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sfl import layout
from sfl.aws import error_code, is_not_found
from sfl.codec import Header, decode, encode, header_length, parse_header

if TYPE_CHECKING:
    import torch

STATE_FORMAT = "sfl-state/1"

_HEADERS: dict[tuple[str, int], Header] = {}
_LATEST_MODEL: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


class ModelStore:
    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    # --- model versions -----------------------------------------------------------------

    def header(self, version: int) -> Header:
        """A model version's safetensors header, read with two ranged GETs and cached."""
        cache_key = (self.bucket, version)
        header = _HEADERS.get(cache_key)
        if header is None:
            key = layout.model_key(version)
            first = self.s3.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-7")
            total = int(first["ContentRange"].rsplit("/", 1)[1])
            length = header_length(first["Body"].read())
            rest = self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{7 + length}")
            header = parse_header(rest["Body"].read(), total_size=total)
            _HEADERS[cache_key] = header
        return header

    def model(self, version: int) -> dict[str, torch.Tensor]:
        """A model version's tensors; the latest one asked for is cached."""
        cache_key = (self.bucket, version)
        model = _LATEST_MODEL.get(cache_key)
        if model is None:
            model = decode(self.model_bytes(version))
            _LATEST_MODEL.clear()
            _LATEST_MODEL[cache_key] = model
        return model

    def model_bytes(self, version: int) -> bytes:
        obj = self.s3.get_object(Bucket=self.bucket, Key=layout.model_key(version))
        body: bytes = obj["Body"].read()
        return body

    def put_model(self, version: int, body: bytes) -> bool:
        """Write a model version unless it exists; False if it already did (kept as is)."""
        return self._put_once(layout.model_key(version), body)

    # --- server state -------------------------------------------------------------------

    def state(self, version: int, rule: str) -> dict[str, torch.Tensor] | None:
        """The server state ``rule`` kept beside model ``version``; None if there is none
        (the version was made by another rule, or by none that keeps state)."""
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=layout.state_key(version))
        except ClientError as e:
            if is_not_found(e):
                return None
            raise
        body = obj["Body"].read()
        header = parse_header(body)
        if header.metadata.get("format") != STATE_FORMAT or header.metadata.get("rule") != rule:
            return None
        return decode(body)

    def put_state(self, version: int, state: dict[str, torch.Tensor], rule: str) -> bool:
        """Write the server state beside model ``version`` unless it exists (False then)."""
        body = encode(state, {"format": STATE_FORMAT, "rule": rule, "version": str(version)})
        return self._put_once(layout.state_key(version), body)

    # --- writing once -------------------------------------------------------------------

    def _put_once(self, key: str, body: bytes) -> bool:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as e:
            if error_code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            raise
        return True
