"""Which examples are held out: a device's local evaluation split and the central test split.

A device's evaluation split is chosen per example from a stable key (a file's name, a CSV
row's text), so an example stays in its split as the device collects more; the central test
split is a seeded, per-class draw of a fixed fraction, the same for the same data.
"""

from __future__ import annotations

import zlib

import numpy as np

from sfl.learning.tasks.base import ArrayDataset, ClientData

_KEY_SPACE = 2**32


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Whether the example named ``key`` belongs to the device's evaluation split."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) < eval_fraction * _KEY_SPACE


def client_splits(
    x: np.ndarray, y: np.ndarray, keys: list[str], eval_fraction: float
) -> ClientData:
    """A device's examples, cut into training and evaluation by their keys."""
    held = np.array([in_eval_split(k, eval_fraction) for k in keys], dtype=bool)
    return ClientData(
        train=ArrayDataset(x=x[~held], y=y[~held]),
        eval=ArrayDataset(x=x[held], y=y[held]),
    )


def central_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test): per class, a seeded ``test_fraction`` of the examples (at least one of
    a class with two or more) is the test split."""
    rng = np.random.default_rng(seed)
    test_index: list[np.ndarray] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        count = round(len(members) * test_fraction)
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        test_index.append(members[:count])
    held = np.zeros(len(y), dtype=bool)
    if test_index:
        held[np.concatenate(test_index)] = True
    return (
        ArrayDataset(x=x[~held], y=y[~held]),
        ArrayDataset(x=x[held], y=y[held]),
    )
