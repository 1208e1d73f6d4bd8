from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from sfl.learning.partition import (
    PARTITION_SCHEMES,
    PartitionError,
    dirichlet,
    iid,
    label_shards,
    partition,
)

# 10 classes, 30 examples each, in a scrambled order.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 30))


def _all_indices(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts))


def test_iid_uses_every_index_once_in_near_equal_sizes() -> None:
    parts = iid(LABELS, 7, seed=0)

    assert len(parts) == 7
    assert np.array_equal(_all_indices(parts), np.arange(len(LABELS)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 for p in parts)


def test_dirichlet_uses_every_index_once_and_respects_min_size() -> None:
    parts = dirichlet(LABELS, 10, alpha=0.3, seed=4, min_size=5)

    assert np.array_equal(_all_indices(parts), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= 5
    assert all(p.dtype == np.int64 for p in parts)


def test_dirichlet_small_alpha_skews_label_mixes() -> None:
    skewed = dirichlet(LABELS, 5, alpha=0.05, seed=0)
    even = dirichlet(LABELS, 5, alpha=1000.0, seed=0)

    def classes_held(parts: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))

    assert classes_held(skewed) < classes_held(even) == 10


def test_dirichlet_that_cannot_meet_min_size_raises() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])

    with pytest.raises(PartitionError, match="min_size 2 for 4 clients"):
        dirichlet(labels, 4, alpha=0.5, seed=0, min_size=2)
    with pytest.raises(PartitionError, match="fewer than 3 examples in 100 draws"):
        # one class, so each draw must split it exactly 3/3: alpha 0.01 almost never does
        dirichlet(np.zeros(6, dtype=np.int64), 2, alpha=0.01, seed=0, min_size=3)


def test_shards_with_one_label_per_client_gives_one_digit_each() -> None:
    parts = label_shards(LABELS, 10, labels_per_client=1, seed=0)

    held = [set(LABELS[p].tolist()) for p in parts]
    assert all(len(h) == 1 for h in held)
    assert set().union(*held) == set(range(10))
    assert np.array_equal(_all_indices(parts), np.arange(len(LABELS)))


def test_shards_with_two_labels_per_client_cover_all_classes_evenly() -> None:
    parts = label_shards(LABELS, 5, labels_per_client=2, seed=1)

    held = [set(LABELS[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(10))
    assert [len(p) for p in parts] == [60] * 5


def test_shards_split_a_class_among_the_clients_that_hold_it() -> None:
    parts = label_shards(LABELS, 20, labels_per_client=2, seed=2)

    # 40 label slots over 10 classes: each class's 30 examples go to 4 clients, 7 or 8 each
    assert all(len(set(LABELS[p].tolist())) == 2 for p in parts)
    assert all(14 <= len(p) <= 16 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == len(LABELS)


def test_shards_with_too_few_clients_leave_classes_unused() -> None:
    parts = label_shards(LABELS, 3, labels_per_client=2, seed=0)

    used = np.concatenate(parts)
    assert len(np.unique(used)) == len(used) == 3 * 2 * 30
    assert len(set(LABELS[used].tolist())) == 6


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_same_seed_same_partition_other_seed_other_partition(scheme: str) -> None:
    first = partition(LABELS, 6, scheme, seed=7)
    again = partition(LABELS, 6, scheme, seed=7)
    other = partition(LABELS, 6, scheme, seed=8)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_partition_dispatches_options_to_the_scheme() -> None:
    parts = partition(LABELS, 10, "shards", seed=0, labels_per_client=1)

    assert all(len(np.unique(LABELS[p])) == 1 for p in parts)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partition(LABELS, 3, "round-robin", 0), "'round-robin'.*iid, dirichlet, shards"),
        (lambda: iid(LABELS, 0, 0), "num_clients must be from 1 to .*300.*got 0"),
        (lambda: iid(LABELS, 301, 0), "got 301"),
        (lambda: iid(LABELS.reshape(30, 10), 2, 0), "one-dimensional"),
        (lambda: dirichlet(LABELS, 3, alpha=0.0, seed=0), "alpha must be > 0, got 0.0"),
        (lambda: label_shards(LABELS, 3, 0, 0), r"labels_per_client .*\(10\), got 0"),
        (lambda: label_shards(LABELS, 3, 11, 0), "got 11"),
        (lambda: label_shards(np.array([0, 0, 0, 1, 1]), 3, 2, 0), "label 1 has 2 example"),
    ],
)
def test_bad_inputs_raise_partition_error_saying_what_was_wrong(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(PartitionError, match=message):
        call()
