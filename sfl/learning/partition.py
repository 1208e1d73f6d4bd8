"""How a dataset's examples are dealt out to simulated clients: IID, Dirichlet or label shards.

Every function takes the pool's labels and returns one int64 index array per client. The same
seed gives the same partition, and no example goes to two clients. numpy only: no torch.
"""

from __future__ import annotations

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# Dirichlet draws are repeated until every client has enough examples; this bounds the retries.
DIRICHLET_MAX_TRIES = 100


class PartitionError(ValueError):
    """The partition's inputs are out of range, or no partition satisfies them."""


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """A shuffled, even split: client sizes differ by at most one."""
    labels = _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels)).astype(np.int64)
    return [part.copy() for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Per class, client shares drawn from Dirichlet(alpha): small alpha, skewed label mixes.

    Draws again until every client holds at least ``min_size`` examples, at most
    ``DIRICHLET_MAX_TRIES`` times.
    """
    labels = _check(labels, num_clients)
    if not alpha > 0:
        raise PartitionError(f"dirichlet alpha must be > 0, got {alpha!r}")
    if min_size < 0:
        raise PartitionError(f"dirichlet min_size must be >= 0, got {min_size!r}")
    if min_size * num_clients > len(labels):
        raise PartitionError(
            f"dirichlet min_size {min_size} for {num_clients} clients needs "
            f"{min_size * num_clients} examples, but there are only {len(labels)}"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_MAX_TRIES):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].append(part)
        parts = [np.concatenate(s).astype(np.int64) for s in shares]
        if min(len(p) for p in parts) >= min_size:
            return [rng.permutation(p) for p in parts]
    raise PartitionError(
        f"dirichlet(alpha={alpha}) gave some client fewer than {min_size} examples in "
        f"{DIRICHLET_MAX_TRIES} draws; use fewer clients, a larger alpha or a smaller min_size"
    )


def label_shards(
    labels: np.ndarray,
    num_clients: int,
    labels_per_client: int,
    seed: int,
) -> list[np.ndarray]:
    """Each client holds exactly ``labels_per_client`` distinct labels (1: one class each).

    Labels are dealt round-robin over a shuffled label order, so every class is held by some
    client when ``num_clients * labels_per_client >= num_classes``; a class's examples are split
    evenly among the clients that hold it. Classes that no client holds go unused.
    """
    labels = _check(labels, num_clients)
    classes = np.unique(labels)
    k = labels_per_client
    if not 1 <= k <= len(classes):
        raise PartitionError(
            f"labels_per_client must be from 1 to the number of classes ({len(classes)}), got {k!r}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {}
    for client in range(num_clients):
        for j in range(k):
            slot = (client * k + j) % len(classes)
            holders.setdefault(slot, []).append(client)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for slot, clients in sorted(holders.items()):
        members = rng.permutation(np.flatnonzero(labels == order[slot]))
        if len(members) < len(clients):
            raise PartitionError(
                f"label {order[slot].item()!r} has {len(members)} example(s) but is held by "
                f"{len(clients)} clients; use fewer clients or fewer labels_per_client"
            )
        for client, part in zip(clients, np.array_split(members, len(clients)), strict=True):
            shares[client].append(part)
    return [rng.permutation(np.concatenate(s).astype(np.int64)) for s in shares]


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    labels_per_client: int = 2,
) -> list[np.ndarray]:
    """Dispatch on ``scheme`` (one of ``PARTITION_SCHEMES``)."""
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return label_shards(labels, num_clients, labels_per_client, seed)
    raise PartitionError(
        f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}"
    )


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be one-dimensional, got shape {labels.shape}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise PartitionError(f"num_clients must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= len(labels):
        raise PartitionError(
            f"num_clients must be from 1 to the number of examples ({len(labels)}), "
            f"got {num_clients}"
        )
    return labels
