"""Where each global model version came from: its round, parent, participants, the config
version it was trained under, and its metrics; and the model versions a rollback creates.

A lineage record is a small JSON object beside the models (``layout.lineage_key``), written
once when the version appears. A version's lineage can always be rebuilt from its round
record too (``lineage_of_round``), so a record lost to a crash costs nothing but a lookup.
Torch-free (not even ``sfl.learning.codec``): the initiator writes a rollback's copy and lineage.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.resources import ResourceNames
from sfl.state.aws import AwsClients, is_not_found
from sfl.state.buffers import Buffer, BufferState
from sfl.state.conditional import conditional
from sfl.state.model_store import ModelStore
from sfl.state.rounds import Round, RoundState

KIND_ROUND = "round"
KIND_ROLLBACK = "rollback"
KIND_INITIAL = "initial"
KIND_BUFFER = "buffer"  # buffered mode: a full buffer's step (docs/buffered.md)

#: How many versions' objects are asked for at once when the newest are listed: their
#: round trips overlap instead of adding up (boto3's clients are thread-safe).
PARALLEL_READS = 8


@dataclass(frozen=True)
class ModelLineage:
    version: int
    kind: str  # round | rollback | initial | buffer
    parent: int | None
    round: int | None = None
    participants: tuple[str, ...] = ()
    config_version: int = 0
    created_at: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    rolled_back_from: int | None = None
    # A first version from the user's own weights: {"source_file", "source_sha256"}.
    source: Mapping[str, str] = field(default_factory=dict)
    # A DP version's spending (sfl.core.privacy_ledger): epsilon and delta so far, versions,
    # noise multiplier, clip, sampling rate; empty for a version made without DP.
    privacy: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["participants"] = list(self.participants)
        d["metrics"] = dict(self.metrics)
        d["source"] = dict(self.source)
        d["privacy"] = dict(self.privacy)
        if not d["privacy"]:
            del d["privacy"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelLineage:
        return cls(
            version=int(d["version"]),
            kind=str(d.get("kind", KIND_ROUND)),
            parent=d.get("parent"),
            round=d.get("round"),
            participants=tuple(d.get("participants", [])),
            config_version=int(d.get("config_version", 0)),
            created_at=d.get("created_at"),
            metrics=dict(d.get("metrics", {})),
            rolled_back_from=d.get("rolled_back_from"),
            source={str(k): str(v) for k, v in dict(d.get("source") or {}).items()},
            privacy=dict(d.get("privacy") or {}),
        )


def lineage_of_round(r: Round, evaluation: Mapping[str, Any] | None = None) -> ModelLineage:
    """The lineage of the model version a closed round produced (its participants come
    from the round's answers: load its slots first, ``RoundStore.with_slots``)."""
    if not r.slots_loaded:
        raise ValueError("a round's lineage needs its answers: RoundStore.with_slots first")
    if r.status is not RoundState.CLOSED or r.model_version is None:
        raise ValueError(f"round {r.round} is {r.status}: it produced no model version")
    summary = r.summary
    excluded = set(summary.get("excluded", {}) or {})
    metrics: dict[str, Any] = {
        "client_accuracy": summary.get("client_accuracy"),
        "client_loss": summary.get("client_loss"),
        "num_examples": summary.get("num_examples"),
    }
    scores = dict(evaluation if evaluation is not None else r.evaluation)
    if "accuracy" in scores:
        metrics.update(accuracy=scores.get("accuracy"), loss=scores.get("loss"))
    return ModelLineage(
        version=r.model_version,
        kind=KIND_ROUND,
        parent=r.base_version,
        round=r.round,
        participants=tuple(c for c in r.accepted if c not in excluded),
        config_version=r.config_version,
        created_at=r.finished_at,
        metrics=metrics,
        privacy=dict(summary.get("privacy") or {}),
    )


def lineage_of_buffer(
    buffer: Buffer, participants: Sequence[str], evaluation: Mapping[str, Any] | None = None
) -> ModelLineage:
    """The lineage of the version a closed buffer made: its parent is the buffer's base,
    ``round`` the buffer's number, ``participants`` the devices whose updates were used."""
    if buffer.status is not BufferState.CLOSED or buffer.model_version is None:
        raise ValueError(f"buffer {buffer.number} is {buffer.status}: it made no version yet")
    summary = buffer.summary
    metrics: dict[str, Any] = {
        "client_accuracy": summary.get("client_accuracy"),
        "client_loss": summary.get("client_loss"),
        "num_examples": summary.get("num_examples"),
        "staleness": summary.get("staleness"),
    }
    scores = dict(evaluation or {})
    if "accuracy" in scores:
        metrics.update(accuracy=scores.get("accuracy"), loss=scores.get("loss"))
    return ModelLineage(
        version=buffer.model_version,
        kind=KIND_BUFFER,
        parent=buffer.base_version,
        round=buffer.number,
        participants=tuple(participants),
        created_at=buffer.finished_at,
        metrics=metrics,
    )


class LineageStore:
    """Lineage records and model versions in the models bucket."""

    def __init__(self, aws: AwsClients, names: ResourceNames) -> None:
        self._s3 = aws.s3
        self._bucket = names.models_bucket

    def put(self, lineage: ModelLineage) -> bool:
        """Write a version's lineage once; False if it was already there."""
        return conditional(
            self._s3.put_object,
            Bucket=self._bucket,
            Key=layout.lineage_key(lineage.version),
            Body=json.dumps(lineage.to_dict(), sort_keys=True).encode(),
            ContentType="application/json",
            IfNoneMatch="*",
        ).written

    def start_from(
        self, body: bytes, *, source: Mapping[str, str], now: float, replace: bool = False
    ) -> bool:
        """Write ``body`` as model version 0 with its lineage (kind initial, its source).

        Without ``replace``, only if there is no version 0 yet (False if there is). With it,
        an existing version 0 is replaced under ``If-Match`` on the ETag read just before, so
        a concurrent write makes this one fail rather than vanish. Whether a round has started
        from version 0 already is the caller's question (the round records)."""
        models = ModelStore(self._s3, self._bucket)
        if not replace:
            if not models.put_model(0, body):
                return False
        else:
            key = layout.model_key(0)
            try:
                etag = self._s3.head_object(Bucket=self._bucket, Key=key)["ETag"]
            except ClientError as e:
                if not is_not_found(e):
                    raise
                if not models.put_model(0, body):
                    return False
            else:
                if not conditional(
                    self._s3.put_object, Bucket=self._bucket, Key=key, Body=body, IfMatch=etag
                ).written:
                    return False
        lineage = ModelLineage(
            version=0, kind=KIND_INITIAL, parent=None, created_at=now, source=dict(source)
        )
        self._s3.put_object(
            Bucket=self._bucket,
            Key=layout.lineage_key(0),
            Body=json.dumps(lineage.to_dict(), sort_keys=True).encode(),
            ContentType="application/json",
        )
        return True

    def get(self, version: int) -> ModelLineage | None:
        try:
            body = self._s3.get_object(Bucket=self._bucket, Key=layout.lineage_key(version))
        except ClientError as e:
            if is_not_found(e):
                return None
            raise
        return ModelLineage.from_dict(json.loads(body["Body"].read()))

    def versions(self) -> dict[int, dict[str, Any]]:
        """Every global model version in the bucket: version -> size and time written."""
        found: dict[int, dict[str, Any]] = {}
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=layout.MODELS_PREFIX):
            for obj in page.get("Contents", []):
                version = layout.model_version_of(obj["Key"])
                if version is not None:
                    found[version] = {"size": obj["Size"], "written_at": obj["LastModified"]}
        return dict(sorted(found.items()))

    def newest_versions(self, known: int, count: int) -> dict[int, dict[str, Any]]:
        """The newest ``count`` versions, given a version known to exist (``known``: the
        newest a round wrote): a HEAD per version, from ``known`` up while they exist (a
        rollback writes one above) and down; no listing, so the cost does not grow with the
        history (S3 lists in key order, and an emulator lists every key). The HEADs below
        the newest are made ``PARALLEL_READS`` at a time."""
        found: dict[int, dict[str, Any]] = {}

        def head(version: int) -> bool:
            try:
                obj = self._s3.head_object(Bucket=self._bucket, Key=layout.model_key(version))
            except ClientError as e:
                if is_not_found(e):
                    return False
                raise
            found[version] = {"size": obj["ContentLength"], "written_at": obj["LastModified"]}
            return True

        newest = known
        while head(newest + 1):
            newest += 1
        below = [v for v in range(newest, max(-1, newest - count), -1) if v not in found]
        with ThreadPoolExecutor(max_workers=PARALLEL_READS) as pool:
            list(pool.map(head, below))
        return dict(sorted(found.items())[-count:])

    def roll_back(self, source: int, *, now: float, after: int) -> int:
        """Write model ``source`` again as a new version (the first free one above ``after``
        and above every existing version), stamped with its new number, and its lineage.
        Returns the new version; the next round starts from it."""
        existing = self.versions()
        newest = max(existing, default=-1)
        if newest > after:  # an earlier attempt at this request whose round never started
            earlier = self.get(newest)
            if earlier is not None and earlier.rolled_back_from == source:
                return newest
        target = max(after, newest) + 1
        models = ModelStore(self._s3, self._bucket)
        body = restamp_model(models.model_bytes(source), version=target, rolled_back_from=source)
        # Written once: if another initiator carried out the same request first, its bytes
        # are the same and stay.
        models.put_model(target, body)
        self.put(
            ModelLineage(
                version=target,
                kind=KIND_ROLLBACK,
                parent=source,
                created_at=now,
                rolled_back_from=source,
            )
        )
        return target


def restamp_model(data: bytes, *, version: int, **metadata: Any) -> bytes:
    """A model file's bytes with its header's ``version`` (and extra metadata) replaced; the
    tensors' bytes are kept as they are (their offsets count from the end of the header)."""
    # Our own model file, written once by the averager; sfl.learning.codec's checked parser would
    # bring torch into the initiator's zip, so only the framing is checked here.
    if len(data) < 8:
        raise ValueError("not a model file: shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise ValueError(f"not a model file: a {length}-byte header in {len(data)} bytes")
    raw = json.loads(data[8 : 8 + length])
    meta = dict(raw.get("__metadata__", {}))
    meta["version"] = str(version)
    meta.update({k: str(v) for k, v in metadata.items()})
    raw["__metadata__"] = meta
    text = json.dumps(raw, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + length :]
