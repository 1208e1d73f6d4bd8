"""RoundUpdates' reading: zero-copy decoding, in-place clipping, bounded read-ahead in order."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from sfl.learning.codec import decode, encode, parse_header
from sfl.learning.rules.aggregation import FedAvg, fedavg
from sfl.learning.rules.bounds import clip_to_bound
from sfl.server.round_updates import Entry, FileSource, RoundUpdates, Unreadable, decode_view


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(70, 1000, generator=g),  # more than one accumulate block
        "b": torch.randn(7, generator=g),
        "h": torch.randn(3, 4, generator=g).to(torch.float16),
        "steps": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.tensor([True, False, seed % 2 == 0]),
    }


def _write(root: Path, count: int) -> tuple[dict[str, torch.Tensor], list[Entry]]:
    base = _model(1000)
    entries = []
    for i in range(count):
        key = f"updates/c{i:03d}.safetensors"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(encode(_model(i), {"format": "sfl-update/1"}))
        entries.append(Entry(f"c{i:03d}", key, "", float(1 + i % 5), 0.3 if i % 4 == 1 else 1.0))
    return base, entries


def test_decode_view_is_decode_without_a_copy() -> None:
    data = bytearray(encode(_model(3)))
    viewed = decode_view(data)
    copied = decode(bytes(data))
    assert set(viewed) == set(copied)
    for name, t in copied.items():
        assert viewed[name].dtype == t.dtype and torch.equal(viewed[name], t)
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= viewed["w"].data_ptr() < start + len(data)


def test_clipping_in_place_is_clip_to_bound_bit_for_bit(tmp_path: Path) -> None:
    base, entries = _write(tmp_path, 2)
    entry = Entry("c001", entries[1].key, "", 1.0, 0.3)
    with RoundUpdates(
        None, "", [entry], base, parse_header(encode(base)), source=FileSource(tmp_path)
    ) as u:
        ((got, _),) = list(u.stream())
    want = clip_to_bound(_model(1), base, 0.3)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


class _SlowSource(FileSource):
    """Files, finishing in a random order, counting how many reads have started."""

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(root)
        self.random = random.Random(seed)
        self.started = 0
        self.lock = threading.Lock()

    def fetch(self, entry: Entry) -> bytearray:
        with self.lock:
            self.started += 1
            pause = self.random.uniform(0, 0.02)
        time.sleep(pause)
        return super().fetch(entry)


@pytest.mark.parametrize("in_flight", [1, 3, 8])
def test_stream_is_in_entry_order_with_bounded_read_ahead(tmp_path: Path, in_flight: int) -> None:
    base, entries = _write(tmp_path, 12)
    source = _SlowSource(tmp_path, seed=in_flight)
    header = parse_header(encode(base))
    seen = []
    aggregator = FedAvg()
    with RoundUpdates(None, "", entries, base, header, source=source, in_flight=in_flight) as u:
        for i, (tensors, weight) in enumerate(u.stream()):
            assert source.started <= i + 1 + in_flight  # memory: in_flight + 1 updates
            seen.append(weight)
            aggregator.add(tensors, weight)
        assert u.read == [e.client for e in entries]
    assert seen == [e.weight for e in entries]
    # The same sum, bit for bit, as one update at a time in entry order.
    reference = fedavg(
        (clip_to_bound(_model(i), base, e.scale), e.weight) for i, e in enumerate(entries)
    )
    result = aggregator.result()
    assert reference is not None and result is not None
    for name, t in reference.items():
        assert torch.equal(result[name], t), name


def test_unreadable_updates_are_left_out_in_order_and_transient_errors_propagate(
    tmp_path: Path,
) -> None:
    base, entries = _write(tmp_path, 6)
    (tmp_path / entries[2].key).unlink()
    (tmp_path / entries[4].key).write_bytes(b"not safetensors at all")
    header = parse_header(encode(base))
    with RoundUpdates(None, "", entries, base, header, source=FileSource(tmp_path)) as u:
        weights = [w for _, w in u.stream()]
        assert u.read == ["c000", "c001", "c003", "c005"]
        assert set(u.excluded) == {"c002", "c004"}
    assert weights == [entries[i].weight for i in (0, 1, 3, 5)]

    class Throttled(FileSource):
        def fetch(self, entry: Entry) -> bytearray:
            if entry.client == "c003":
                raise TimeoutError("the network")
            return super().fetch(entry)

    with (
        RoundUpdates(None, "", entries, base, header, source=Throttled(tmp_path)) as u,
        pytest.raises(TimeoutError),
    ):
        list(u.stream())
    assert issubclass(Unreadable, Exception)


def test_large_updates_are_read_into_anonymous_mappings(tmp_path: Path) -> None:
    big = {"w": torch.randn(600, 1000), "b": torch.randn(3)}  # 2.4 MB: mapped, not malloc'd
    (tmp_path / "u.safetensors").write_bytes(encode(big))
    data = FileSource(tmp_path).fetch(Entry("c", "u.safetensors", "", 1.0))
    assert not isinstance(data, bytearray)
    viewed = decode_view(data)
    del data  # the tensors keep the mapping alive
    assert all(torch.equal(viewed[k], t) for k, t in big.items())
