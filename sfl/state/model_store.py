"""The models bucket as one class: model versions, the server state beside them, and the
round's assignment.

Versions and state are written once (``If-None-Match: *``): a retried aggregation finds what
the first attempt wrote and keeps it. Versions never change once written, so their headers
are cached per process. Bytes in, bytes out, and torch-free (``sfl.core.header``), so the
initiator's zip, the averager, the edge client and the simulation share it; turning bytes
into tensors is ``sfl.learning.codec``'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.header import Header, header_length, parse_header
from sfl.core.privacy_ledger import PrivacyRecord
from sfl.state.aws import error_code, is_not_found
from sfl.state.conditional import conditional

STATE_FORMAT = "sfl-state/1"

_HEADERS: dict[tuple[str, int], Header] = {}


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

    def model_bytes(self, version: int) -> bytes:
        obj = self.s3.get_object(Bucket=self.bucket, Key=layout.model_key(version))
        body: bytes = obj["Body"].read()
        return body

    def model_body(self, key: str, limit: int) -> tuple[bytes, int]:
        """The model object at ``key`` (an assignment names it) and its size; never more than
        ``limit + 1`` bytes cross the network (nothing if S3 says it is larger)."""
        obj = self.s3.get_object(Bucket=self.bucket, Key=key)
        size = int(obj.get("ContentLength", 0))
        body: bytes = b"" if size > limit else obj["Body"].read(limit + 1)
        obj["Body"].close()
        return body, size

    def has_model(self, version: int) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=layout.model_key(version))
        except ClientError as e:
            if is_not_found(e):
                return False
            raise
        return True

    def put_model(self, version: int, body: bytes) -> bool:
        """Write a model version unless it exists; False if it already did (kept as is)."""
        return self._put_once(layout.model_key(version), body)

    # --- server state -------------------------------------------------------------------

    def state_bytes(self, version: int, rule: str) -> bytes | None:
        """The server state ``rule`` kept beside model ``version`` (safetensors); None if
        there is none (the version was made by another rule, or by one that keeps none)."""
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=layout.state_key(version))
        except ClientError as e:
            if is_not_found(e):
                return None
            raise
        body: bytes = obj["Body"].read()
        metadata = parse_header(body).metadata
        if metadata.get("format") != STATE_FORMAT or metadata.get("rule") != rule:
            return None
        return body

    def put_state(self, version: int, body: bytes) -> bool:
        """Write the server state beside model ``version`` unless it exists (False then)."""
        return self._put_once(layout.state_key(version), body)

    @staticmethod
    def state_metadata(version: int, rule: str) -> dict[str, str]:
        """What a state object's header says: its format, rule and version."""
        return {"format": STATE_FORMAT, "rule": rule, "version": str(version)}

    # --- privacy records ---------------------------------------------------------------

    def privacy_record(self, version: int) -> PrivacyRecord | None:
        """The privacy record beside DP version ``version``; None if it was made without DP."""
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=layout.privacy_key(version))
        except ClientError as e:
            if is_not_found(e):
                return None
            raise
        return PrivacyRecord.from_dict(json.loads(obj["Body"].read()))

    def put_privacy(self, record: PrivacyRecord) -> bool:
        """Write a version's privacy record unless it exists (False then: keep that one)."""
        body = json.dumps(record.to_dict(), sort_keys=True).encode()
        return self._put_once(layout.privacy_key(record.version), body)

    # --- the assignment -----------------------------------------------------------------

    def put_assignment(self, assignment: Mapping[str, Any]) -> None:
        """Publish the current round's assignment (overwritten each round, never cached)."""
        self.s3.put_object(
            Bucket=self.bucket,
            Key=layout.ASSIGNMENT_KEY,
            Body=json.dumps(assignment, sort_keys=True).encode(),
            ContentType="application/json",
            CacheControl="no-cache",
        )

    def assignment(self, etag: str | None, max_bytes: int) -> tuple[bytes, str] | None:
        """The assignment's bytes (at most ``max_bytes``) and ETag; None if it is unchanged
        since ``etag`` (a 304 costs almost nothing) or not published yet."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": layout.ASSIGNMENT_KEY}
        if etag:
            kwargs["IfNoneMatch"] = etag
        try:
            obj = self.s3.get_object(**kwargs)
        except ClientError as e:
            if is_not_found(e) or error_code(e) in {"304", "NotModified"}:
                return None
            raise
        return obj["Body"].read(max_bytes), str(obj["ETag"])

    # --- writing once -------------------------------------------------------------------

    def _put_once(self, key: str, body: bytes) -> bool:
        return conditional(
            self.s3.put_object, Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*"
        ).written
