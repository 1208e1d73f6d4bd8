"""A round's accepted updates as the aggregation rules see them (``UpdateSet``), read from S3.

Each update is read with the ETag it was accepted with (a changed object is left out, not
used), then bounded: weighed with its capped weight and its change from the base model
scaled by its clip factor. Streaming reads each update once and holds one in memory. Chunked
access first spools the updates to a temporary directory (disk: one update's size times
their number) and then reads the same rows of one tensor from every file, so memory stays
within ``CHUNK_ELEMENTS`` float64 values whatever the number of updates.

One update that cannot be read or no longer matches the base model is left out and named in
``excluded``; an AWS error that may pass (throttling, a timeout) propagates, so the whole
aggregation is retried under its lease.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from botocore.exceptions import ClientError
from safetensors import safe_open

from sfl.aws import error_code, is_not_found, is_transient
from sfl.codec import METADATA_ALLOWANCE_BYTES, CodecError, Header, decode, encode, parse_header
from sfl.compression import codec_name, decode_update, largest_header
from sfl.strategies.aggregation import CHUNK_ELEMENTS, Chunk, as_rows, row_slices
from sfl.strategies.bounds import clip_to_bound

logger = logging.getLogger(__name__)

_READ_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One accepted update: where it is, what it weighs, how much of its change is kept."""

    client: str
    key: str
    etag: str
    weight: float
    scale: float = 1.0


class RoundUpdates:
    def __init__(
        self,
        s3: Any,
        bucket: str,
        entries: Sequence[Entry],
        base: Mapping[str, torch.Tensor],
        base_header: Header,
        spool_dir: str | None = None,
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.entries = list(entries)
        self.base = base
        self.base_header = base_header
        self.spool_parent = spool_dir
        self.excluded: dict[str, str] = {}
        self.read: list[str] = []  # clients whose update was read, in order
        self._spool: Path | None = None
        self._spooled: list[tuple[Entry, Path]] = []

    # --- UpdateSet ------------------------------------------------------------------------

    def stream(
        self, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[Mapping[str, torch.Tensor], float]]:
        if self._spool is not None:
            chosen = range(len(self._spooled)) if indices is None else indices
            for i in chosen:
                entry, path = self._spooled[i]
                yield self._bounded(entry, decode(path.read_bytes())), entry.weight
            return
        for entry in self.entries if indices is None else [self.entries[i] for i in indices]:
            tensors = self._read_whole(entry)
            if tensors is not None:
                self.read.append(entry.client)
                yield tensors, entry.weight

    def chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Chunk]:
        self._ensure_spooled()
        n = len(self._spooled)
        for name, start in self.base.items():
            for rows in row_slices(start.shape, n, max_elements):
                values = torch.stack([self._rows(i, name, rows) for i in range(n)])
                yield Chunk(name, rows, values)

    def weights(self) -> list[float]:
        self._ensure_spooled()
        return [entry.weight for entry, _ in self._spooled]

    # --- reading --------------------------------------------------------------------------

    def _get(self, entry: Entry) -> Any | None:
        """The S3 object as accepted, or None (and the reason in ``excluded``)."""
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=entry.key, IfMatch=entry.etag)
        except ClientError as e:
            if is_transient(e):
                raise
            if is_not_found(e) or error_code(e) in {"PreconditionFailed", "412"}:
                self.excluded[entry.client] = "update changed or vanished after it was accepted"
            else:  # e.g. overwritten into an archive storage class after acceptance
                self.excluded[entry.client] = f"unreadable: {error_code(e)}"[:200]
            return None

    def _read_whole(self, entry: Entry) -> dict[str, torch.Tensor] | None:
        obj = self._get(entry)
        if obj is None:
            return None
        try:
            return self._bounded(entry, decode_update(obj["Body"].read(), self.base))
        except Exception as e:  # e.g. a file that decoded at acceptance and not now
            logger.exception(
                "update left out of the aggregation", extra={"client_id": entry.client}
            )
            self.excluded[entry.client] = f"error: {type(e).__name__}"[:200]
            return None

    def _bounded(self, entry: Entry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return clip_to_bound(tensors, self.base, entry.scale)

    def _ensure_spooled(self) -> None:
        if self._spool is not None:
            return
        self._spool = Path(tempfile.mkdtemp(prefix="sfl-round-", dir=self.spool_parent))
        want = self.base_header.signature()
        for number, entry in enumerate(self.entries):
            obj = self._get(entry)
            if obj is None:
                continue
            path = self._spool / f"{number:06d}.safetensors"
            try:
                with path.open("wb") as out:
                    for part in obj["Body"].iter_chunks(_READ_BYTES):
                        out.write(part)
                with path.open("rb") as f:
                    limit = largest_header(self.base_header.header_length, METADATA_ALLOWANCE_BYTES)
                    prefix = f.read(8 + limit)
                header = parse_header(prefix, total_size=path.stat().st_size)
                if codec_name(header) != "none":  # spooled decoded, read as any update is
                    path.write_bytes(encode(decode_update(path.read_bytes(), self.base)))
                    header = parse_header(path.read_bytes())
                if header.signature() != want:
                    raise CodecError("tensors_mismatch", "tensors differ from the base model's")
            except ClientError as e:
                if is_transient(e):
                    raise
                self.excluded[entry.client] = f"unreadable: {error_code(e)}"[:200]
                path.unlink(missing_ok=True)
                continue
            except Exception as e:
                logger.exception(
                    "update left out of the aggregation", extra={"client_id": entry.client}
                )
                self.excluded[entry.client] = f"error: {type(e).__name__}"[:200]
                path.unlink(missing_ok=True)
                continue
            self._spooled.append((entry, path))
            self.read.append(entry.client)

    def _rows(self, index: int, name: str, rows: slice) -> torch.Tensor:
        """Rows of one tensor of one spooled update, bounded, in float64."""
        entry, path = self._spooled[index]
        with safe_open(str(path), framework="pt") as f:
            if self.base[name].dim() == 0:
                value: torch.Tensor = as_rows(f.get_tensor(name))[rows]
            else:
                value = f.get_slice(name)[rows]
        start = as_rows(self.base[name])[rows]
        if not start.dtype.is_floating_point or entry.scale >= 1.0:
            return value.to(torch.float64)
        start64 = start.to(torch.float64)
        return start64 + entry.scale * (value.to(torch.float64) - start64)

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> RoundUpdates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
