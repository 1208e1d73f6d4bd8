from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from sfl.learning.splits import SplitError, SplitSummary, default_client_ids, write_client_splits
from sfl.learning.tasks.base import CLIENT_DATA_FILE
from sfl.learning.tasks.digits import DigitsTask

POOL_SIZE = 1437  # digits: 1797 images less the 20% test split


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask()


def _split(
    task: DigitsTask,
    out_dir: Path,
    eval_fraction: float = 0.2,
    client_ids: list[str] | None = None,
) -> list[SplitSummary]:
    return write_client_splits(
        task, out_dir, 4, "dirichlet", seed=0, eval_fraction=eval_fraction, client_ids=client_ids
    )


def test_writes_a_data_file_per_client_and_a_manifest(task: DigitsTask, tmp_path: Path) -> None:
    summaries = _split(task, tmp_path)

    ids = ["client-00", "client-01", "client-02", "client-03"]
    assert [s.client_id for s in summaries] == ids
    assert all((tmp_path / i / CLIENT_DATA_FILE).is_file() for i in ids)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [c["id"] for c in manifest["clients"]] == ids
    assert sum(c["num_train"] + c["num_eval"] for c in manifest["clients"]) == POOL_SIZE
    assert all(
        sum(c["label_histogram"]) == c["num_train"] + c["num_eval"] for c in manifest["clients"]
    )
    assert manifest["pool_size"] == POOL_SIZE
    assert manifest["scheme"] == "dirichlet"


def test_a_client_file_loads_through_the_task(task: DigitsTask, tmp_path: Path) -> None:
    summaries = _split(task, tmp_path)

    data = task.load_client_data(tmp_path / "client-01")

    assert len(data.train) == summaries[1].num_train
    assert len(data.eval) == summaries[1].num_eval >= 1
    assert data.train.x.shape[1:] == (1, 8, 8)
    histogram = np.bincount(np.concatenate([data.train.y, data.eval.y]), minlength=10)
    assert tuple(histogram.tolist()) == summaries[1].label_histogram
    with safe_open(str(tmp_path / "client-01" / CLIENT_DATA_FILE), framework="numpy") as f:
        metadata = f.metadata()
    assert metadata == {
        "task": "digits",
        "scheme": "dirichlet",
        "seed": "0",
        "client_id": "client-01",
    }


def test_eval_fraction_sets_the_eval_share(task: DigitsTask, tmp_path: Path) -> None:
    summaries = write_client_splits(task, tmp_path, 3, "iid", seed=1, eval_fraction=0.25)

    # 479 examples each; a quarter of that, rounded, is 120
    assert [(s.num_train, s.num_eval) for s in summaries] == [(359, 120)] * 3


def test_same_arguments_write_the_same_data(task: DigitsTask, tmp_path: Path) -> None:
    _split(task, tmp_path / "a")
    _split(task, tmp_path / "b")
    _split(task, tmp_path / "c", eval_fraction=0.3)

    def client(name: str) -> list[np.ndarray]:
        loaded = task.load_client_data(tmp_path / name / "client-02")
        return [loaded.train.x, loaded.train.y, loaded.eval.x, loaded.eval.y]

    assert all(np.array_equal(x, y) for x, y in zip(client("a"), client("b"), strict=True))
    assert (tmp_path / "a" / "manifest.json").read_text() == (
        tmp_path / "b" / "manifest.json"
    ).read_text()
    assert len(client("c")[3]) > len(client("a")[3])


def test_client_ids_can_be_given(task: DigitsTask, tmp_path: Path) -> None:
    ids = ["pi-kitchen", "pi-garage"]

    summaries = write_client_splits(task, tmp_path, 2, "shards", seed=0, client_ids=ids)

    assert [s.client_id for s in summaries] == ids
    assert (tmp_path / "pi-garage" / CLIENT_DATA_FILE).is_file()
    assert all(sum(1 for c in s.label_histogram if c) == 2 for s in summaries)


def test_default_client_ids_are_zero_padded() -> None:
    assert default_client_ids(3) == ["client-00", "client-01", "client-02"]
    assert default_client_ids(100)[-1] == "client-99"
    assert default_client_ids(101)[0] == "client-000"
    assert default_client_ids(101)[-1] == "client-100"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client_ids": ["a", "b"]}, "2 client id.*for 4 clients"),
        ({"client_ids": ["a", "b/c", "d", "e"]}, "'b/c' are not allowed"),
        ({"client_ids": ["a", "b", "a", "c"]}, "'a' given more than once"),
        ({"eval_fraction": 1.0}, "eval_fraction must be at least 0 and below 1, got 1.0"),
    ],
)
def test_bad_arguments_raise_split_error(
    task: DigitsTask, tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(SplitError, match=message):
        _split(task, tmp_path, **options)
    assert not (tmp_path / "manifest.json").exists()
