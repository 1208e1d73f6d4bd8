"""Deal a task's dataset out to simulated clients: one data directory per client and a manifest.

Each client's share (see ``sfl.learning.partition``) is cut into a training and a local evaluation
split and written to ``<out_dir>/<client_id>/`` in the task's own layout (its
``write_client_data``: class folders of images, a CSV file), or by default to
``<out_dir>/<client_id>/data.safetensors``; the task's ``load_client_data`` reads it back as a
device would. ``<out_dir>/manifest.json`` records who holds what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sfl.core.layout import CLIENT_ID
from sfl.learning.partition import partition
from sfl.learning.tasks.base import CLIENT_DATA_FILE, ArrayDataset, ClientData, TrainingTask

MANIFEST_FILE = "manifest.json"


class SplitError(ValueError):
    """The split's arguments are out of range (client ids, eval fraction)."""


@dataclass(frozen=True)
class SplitSummary:
    """What one client received: its counts and label histogram (train and eval together)."""

    client_id: str
    num_train: int
    num_eval: int
    label_histogram: tuple[int, ...]


def default_client_ids(n: int) -> list[str]:
    """``client-00``, ``client-01``, ...: two digits, more when ``n`` exceeds 100."""
    width = max(2, len(str(n - 1)))
    return [f"client-{i:0{width}d}" for i in range(n)]


def write_client_splits(
    task: TrainingTask,
    out_dir: Path,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    eval_fraction: float = 0.2,
    client_ids: list[str] | None = None,
) -> list[SplitSummary]:
    """Partition the task's train pool among clients and write their data files and manifest.

    The same arguments write the same files. A client's eval split gets ``eval_fraction`` of
    its share, rounded, but at least one example when the share has two or more (unless
    ``eval_fraction`` is 0) and never all of them.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise SplitError(f"eval_fraction must be at least 0 and below 1, got {eval_fraction!r}")
    ids = default_client_ids(num_clients) if client_ids is None else list(client_ids)
    _check_ids(ids, num_clients)
    central = task.load_central_data()
    pool = central.train
    shares = partition(pool.y, num_clients, scheme, seed, alpha, labels_per_client)
    out_dir = Path(out_dir)
    summaries = []
    for number, (client_id, share) in enumerate(zip(ids, shares, strict=True)):
        rng = np.random.default_rng([seed, number])
        share = rng.permutation(share)
        n_eval = _eval_size(len(share), eval_fraction)
        train, eval_ = _subset(pool, share[n_eval:]), _subset(pool, share[:n_eval])
        client_dir = out_dir / client_id
        client_dir.mkdir(parents=True, exist_ok=True)
        share_data = ClientData(train=train, eval=eval_)
        writer = getattr(task, "write_client_data", None)
        if callable(writer):
            writer(client_dir, share_data)
        else:
            save_file(
                {"x_train": train.x, "y_train": train.y, "x_eval": eval_.x, "y_eval": eval_.y},
                str(client_dir / CLIENT_DATA_FILE),
                metadata={
                    "task": task.name,
                    "scheme": scheme,
                    "seed": str(seed),
                    "client_id": client_id,
                },
            )
        histogram = np.bincount(pool.y[share], minlength=central.num_classes)
        summaries.append(
            SplitSummary(
                client_id=client_id,
                num_train=len(train),
                num_eval=len(eval_),
                label_histogram=tuple(int(c) for c in histogram),
            )
        )
    manifest = {
        "task": task.name,
        "scheme": scheme,
        "seed": seed,
        "alpha": alpha,
        "labels_per_client": labels_per_client,
        "eval_fraction": eval_fraction,
        "num_classes": central.num_classes,
        "pool_size": len(pool),
        "clients": [
            {
                "id": s.client_id,
                "num_train": s.num_train,
                "num_eval": s.num_eval,
                "label_histogram": list(s.label_histogram),
            }
            for s in summaries
        ],
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return summaries


def _eval_size(share: int, eval_fraction: float) -> int:
    if share < 2 or eval_fraction == 0:
        return 0
    return min(max(1, round(share * eval_fraction)), share - 1)


def _subset(data: ArrayDataset, index: np.ndarray) -> ArrayDataset:
    return ArrayDataset(
        x=np.ascontiguousarray(data.x[index], dtype=np.float32),
        y=np.ascontiguousarray(data.y[index], dtype=np.int64),
    )


def _check_ids(ids: list[str], num_clients: int) -> None:
    if len(ids) != num_clients:
        raise SplitError(f"{len(ids)} client id(s) given for {num_clients} clients")
    bad = [i for i in ids if not CLIENT_ID.match(i)]
    if bad:
        raise SplitError(
            f"client id(s) {', '.join(map(repr, bad))} are not allowed; "
            "use 1-128 letters, digits, ':', '_' or '-'"
        )
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise SplitError(f"client id(s) {', '.join(map(repr, dupes))} given more than once")
