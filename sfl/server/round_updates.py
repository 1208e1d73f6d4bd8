"""A round's accepted updates as the aggregation rules see them (``UpdateSet``), read from S3.

Each update is read with the ETag it was accepted with (a changed object is left out, not
used), then bounded: weighed with its capped weight, its change from the base model scaled
by its clip factor, and its integer tensors replaced by the base model's
(``sfl.learning.rules.bounds.keeps_base_value``). Every rule, streamed, chunked or summed in
shards, reads updates through here, so none sees a device's counters.

Streaming reads each update once and holds one in memory. Chunked access first spools the
updates to a temporary directory (disk: one update's size times their number) and then
reads the same rows of one tensor from every file, so memory stays within
``CHUNK_ELEMENTS`` float64 values whatever the number of updates.

One update that cannot be read or no longer matches the base model is left out and named in
``excluded``; an AWS error that may pass (throttling, a timeout) propagates, so the whole
aggregation is retried under its lease.

Bytes come from an ``UpdateSource``: S3 with ``IfMatch`` on the accepted ETag in production,
local files for benchmarks and tests; everything after the bytes is the same code. Streaming
reads up to ``in_flight`` updates ahead of the one being summed, in worker threads (download,
decode and clip release the GIL), and yields them in entry order whatever order they finish
in, so a sum over the stream does not depend on timing: at most ``in_flight + 1`` updates are
in memory. Decoding is zero-copy: tensors are views into the downloaded buffer.
"""

from __future__ import annotations

import json
import logging
import mmap
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from botocore.exceptions import ClientError
from safetensors import safe_open

from sfl.learning.codec import (
    METADATA_ALLOWANCE_BYTES,
    CodecError,
    Header,
    decode,
    encode,
    header_length,
    parse_header,
)
from sfl.learning.compression import codec_name, decode_update, largest_header
from sfl.learning.rules.aggregation import (
    ACCUMULATE_BLOCK,
    CHUNK_ELEMENTS,
    Chunk,
    as_rows,
    row_slices,
)
from sfl.learning.rules.bounds import keeps_base_value
from sfl.state.aws import error_code, is_not_found, is_transient

logger = logging.getLogger(__name__)

_READ_BYTES = 1024 * 1024
# Updates read ahead of the one being summed when the caller does not say (config:
# ``aggregation_in_flight``).
DEFAULT_IN_FLIGHT = 4
# Update buffers this large are anonymous mappings: unmapped as soon as the last tensor
# viewing one is freed, rather than kept in malloc's per-thread arenas, so the process's
# memory follows the updates in flight, not how many were read.
_MAP_ABOVE_BYTES = 1024 * 1024
Buffer = bytearray | mmap.mmap


def new_buffer(size: int) -> Buffer:
    """A writable, zeroed buffer of ``size`` bytes for one update."""
    return mmap.mmap(-1, size) if size >= _MAP_ABOVE_BYTES else bytearray(size)


# safetensors dtypes torch can view in place; any other is decoded by copying (``decode``).
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    """One accepted update: where it is, what it weighs, how much of its change is kept."""

    client: str
    key: str
    etag: str
    weight: float
    scale: float = 1.0


class Unreadable(Exception):
    """This update cannot be used (changed, vanished, unreadable); the message says why."""


class UpdateSource(Protocol):
    """Where an accepted update's bytes come from. Transient errors propagate."""

    def fetch(self, entry: Entry) -> Buffer:
        """The update's bytes as accepted, or ``Unreadable``."""
        ...

    def copy_to(self, entry: Entry, path: Path) -> None:
        """The update's bytes into ``path``, a part at a time, or ``Unreadable``."""
        ...


class S3Source:
    """Updates in S3, read with ``IfMatch`` on the ETag they were accepted with."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    def _get(self, entry: Entry) -> Any:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=entry.key, IfMatch=entry.etag)
        except ClientError as e:
            if is_transient(e):
                raise
            if is_not_found(e) or error_code(e) in {"PreconditionFailed", "412"}:
                raise Unreadable("update changed or vanished after it was accepted") from e
            # e.g. overwritten into an archive storage class after acceptance
            raise Unreadable(f"unreadable: {error_code(e)}") from e

    def fetch(self, entry: Entry) -> Buffer:
        obj = self._get(entry)
        size = int(obj.get("ContentLength", 0))
        data = new_buffer(size)
        view = memoryview(data)
        filled = 0
        try:
            for part in obj["Body"].iter_chunks(_READ_BYTES):
                end = filled + len(part)
                if end > size:  # longer than S3 said: take it whole, it fails decoding
                    return bytearray(bytes(view[:filled]) + part + obj["Body"].read())
                view[filled:end] = part
                filled = end
        except ClientError as e:
            if is_transient(e):
                raise
            raise Unreadable(f"unreadable: {error_code(e)}") from e
        finally:
            view.release()
        return data if filled == size else bytearray(data[:filled])

    def copy_to(self, entry: Entry, path: Path) -> None:
        obj = self._get(entry)
        try:
            with path.open("wb") as out:
                for part in obj["Body"].iter_chunks(_READ_BYTES):
                    out.write(part)
        except ClientError as e:
            if is_transient(e):
                raise
            raise Unreadable(f"unreadable: {error_code(e)}") from e


class FileSource:
    """Updates as local files named by their key under ``root`` (benchmarks, tests); the
    ETag is not checked: the files are the caller's own."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, entry: Entry) -> Path:
        path = self.root / entry.key
        if not path.is_file():
            raise Unreadable("update changed or vanished after it was accepted")
        return path

    def fetch(self, entry: Entry) -> Buffer:
        path = self._path(entry)
        data = new_buffer(path.stat().st_size)
        view = memoryview(data)
        filled = 0
        with path.open("rb", buffering=0) as f:
            while filled < len(data):
                got = f.readinto(view[filled:])
                if not got:
                    break
                filled += got
        view.release()
        return data if filled == len(data) else bytearray(data[:filled])

    def copy_to(self, entry: Entry, path: Path) -> None:
        shutil.copyfile(self._path(entry), path)


def decode_view(data: Buffer) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes, after the header checks, as views into ``data`` (no
    copy; the tensors keep the buffer alive); ``decode`` (a copy) for dtypes torch cannot
    view. Never unpickles."""
    header = parse_header(bytes(data[: 8 + header_length(bytes(data[:8]))]), total_size=len(data))
    if any(info.dtype not in _TORCH_DTYPES for info in header.tensors.values()):
        return decode(bytes(data))
    # parse_header checked the JSON strictly, the offsets against the shapes and the data.
    raw = json.loads(bytes(data[8 : header.data_start]))
    out: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        begin, end = raw[name]["data_offsets"]
        dtype = _TORCH_DTYPES[info.dtype]
        if end == begin:
            out[name] = torch.empty(info.shape, dtype=dtype)
            continue
        flat = torch.frombuffer(
            data,
            dtype=dtype,
            count=(end - begin) // dtype.itemsize,
            offset=header.data_start + begin,
        )
        out[name] = flat.reshape(info.shape)
    return out


def _clip_in_place(t: torch.Tensor, start: torch.Tensor, scale: float) -> None:
    """``t = start + scale * (t - start)`` computed in float64 and stored in ``t``'s dtype,
    bit for bit what ``clip_to_bound`` returns, without a float64 copy of the whole tensor."""
    flat = t.view(-1)
    origin = start.reshape(-1)
    for first in range(0, flat.numel(), ACCUMULATE_BLOCK):
        last = first + ACCUMULATE_BLOCK
        origin64 = origin[first:last].to(torch.float64)
        moved = flat[first:last].to(torch.float64).sub_(origin64).mul_(scale).add_(origin64)
        flat[first:last].copy_(moved)


class RoundUpdates:
    def __init__(
        self,
        s3: Any,
        bucket: str,
        entries: Sequence[Entry],
        base: Mapping[str, torch.Tensor],
        base_header: Header,
        spool_dir: str | None = None,
        *,
        source: UpdateSource | None = None,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        self.source: UpdateSource = source if source is not None else S3Source(s3, bucket)
        self.entries = list(entries)
        self.base = base
        self.base_header = base_header
        self.spool_parent = spool_dir
        self.in_flight = max(1, int(in_flight))
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
                data = bytearray(path.read_bytes())
                yield self._bounded(entry, self._decode(data)), entry.weight
            return
        wanted = self.entries if indices is None else [self.entries[i] for i in indices]
        for entry, tensors in self._read_ahead(wanted):
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

    def clients(self) -> list[str]:
        self._ensure_spooled()
        return [entry.client for entry, _ in self._spooled]

    # --- reading --------------------------------------------------------------------------

    def _read_ahead(
        self, entries: Sequence[Entry]
    ) -> Iterator[tuple[Entry, dict[str, torch.Tensor]]]:
        """Each readable entry's bounded tensors, in ``entries``' order, with at most
        ``in_flight`` read ahead by worker threads; the others named in ``excluded``."""
        if not entries:
            return
        pool = ThreadPoolExecutor(
            max_workers=min(self.in_flight, len(entries)), thread_name_prefix="sfl-read"
        )
        pending: deque[tuple[Entry, Future[dict[str, torch.Tensor] | str]]] = deque()
        upcoming = iter(entries)
        try:
            for entry in upcoming:
                pending.append((entry, pool.submit(self._read_whole, entry)))
                if len(pending) >= self.in_flight:
                    break
            while pending:
                entry, future = pending.popleft()
                result = future.result()  # a transient AWS error propagates here
                following = next(upcoming, None)
                if following is not None:
                    pending.append((following, pool.submit(self._read_whole, following)))
                if isinstance(result, str):
                    self.excluded[entry.client] = result
                    continue
                yield entry, result
                del result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_whole(self, entry: Entry) -> dict[str, torch.Tensor] | str:
        """One update's bounded tensors, or why it is left out (run in a worker thread)."""
        try:
            data = self.source.fetch(entry)
        except Unreadable as e:
            return str(e)[:200]
        try:
            return self._bounded(entry, self._decode(data))
        except Exception as e:  # e.g. a file that decoded at acceptance and not now
            logger.exception(
                "update left out of the aggregation", extra={"client_id": entry.client}
            )
            return f"error: {type(e).__name__}"[:200]

    def _decode(self, data: Buffer) -> dict[str, torch.Tensor]:
        """An update's tensors from its bytes: the one place updates are decoded. A plain
        update's tensors are views into ``data``; a compressed one (``sfl.learning.compression``) is
        decoded into full tensors against the base."""
        header = parse_header(
            bytes(data[: 8 + header_length(bytes(data[:8]))]), total_size=len(data)
        )
        if codec_name(header) != "none":
            return decode_update(bytes(data), self.base)
        return decode_view(data)

    def _bounded(self, entry: Entry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update within the round's bounds, as ``clip_to_bound`` makes it: float tensors
        clipped in place on the freshly decoded tensors (ours alone), a block at a time; the
        others the base model's."""
        for name, t in tensors.items():
            if keeps_base_value(t.dtype):
                tensors[name] = self.base[name].clone()
            elif entry.scale < 1.0:
                _clip_in_place(t, self.base[name], entry.scale)
        return tensors

    def _ensure_spooled(self) -> None:
        if self._spool is not None:
            return
        self._spool = Path(tempfile.mkdtemp(prefix="sfl-round-", dir=self.spool_parent))
        want = self.base_header.signature()
        for number, entry in enumerate(self.entries):
            path = self._spool / f"{number:06d}.safetensors"
            try:
                self.source.copy_to(entry, path)
                with path.open("rb") as f:
                    limit = largest_header(self.base_header.header_length, METADATA_ALLOWANCE_BYTES)
                    prefix = f.read(8 + limit)
                header = parse_header(prefix, total_size=path.stat().st_size)
                if codec_name(header) != "none":  # spooled decoded, read as any update is
                    path.write_bytes(encode(decode_update(path.read_bytes(), self.base)))
                    header = parse_header(path.read_bytes())
                if header.signature() != want:
                    raise CodecError("tensors_mismatch", "tensors differ from the base model's")
            except Unreadable as e:
                self.excluded[entry.client] = str(e)[:200]
                path.unlink(missing_ok=True)
                continue
            except ClientError:
                path.unlink(missing_ok=True)
                raise
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
        if keeps_base_value(start.dtype):
            return start.to(torch.float64)
        if entry.scale >= 1.0:
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
