"""Images as devices hold them: one folder per class, any size, read with PIL; a torchvision
architecture by name, built untrained (no weights are ever downloaded).

A device's data directory holds a folder per class (``cat/``, ``dog/``, ...) of image files.
Labels are the class names in ``classes`` order, or the sorted folder names when ``classes``
is not given (then every device must hold every class folder, empty or not). Each image is
converted to RGB, resized to ``image_size`` square and normalised by ``mean`` and ``std``.
The files are read afresh on every call, so images collected since the last round count.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sfl.core.task_params import ImageFolderParams
from sfl.learning.tasks.base import (
    CentralData,
    ClientData,
    ClientDataError,
    NoClientDataError,
)
from sfl.learning.tasks.classification import ClassificationTask
from sfl.learning.tasks.holdout import central_split, client_splits

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
PIXEL_MAX = 255.0
GROUPS = 32
SMALL_CNN = "small_cnn"
#: Name prefix of the images a simulation writes (and replaces when it writes again).
SIMULATED_PREFIX = "simulated-"
#: Unreadable files named in a warning, at most.
SHOWN_BAD_FILES = 5


class ImageFolderTask(ClassificationTask):
    """Cross-entropy classification of RGB images from class folders."""

    name = "image_folder"
    Params = ImageFolderParams

    def __init__(self, params: ImageFolderParams | None = None) -> None:
        self.params = params if params is not None else ImageFolderParams()
        self.num_classes = self.params.num_classes
        self.input_shape = (3, self.params.image_size, self.params.image_size)
        self._class_names: tuple[str, ...] = self.params.classes
        self.min_batch = 2 if self.params.norm == "batch" else 1  # BatchNorm needs two

    def new_model(self) -> nn.Module:
        from torchvision import models

        if self.params.architecture == SMALL_CNN:
            return small_cnn(self.num_classes, self.params.norm)
        extra: dict[str, Any] = {}
        if self.params.norm == "group":
            extra["norm_layer"] = group_norm
        model: nn.Module = models.get_model(
            self.params.architecture, weights=None, num_classes=self.num_classes, **extra
        )
        return model

    # -- a device's data ---------------------------------------------------------------------

    def load_client_data(self, data_dir: Path) -> ClientData:
        """The device's class folders, read now; ``eval_fraction`` of the files (by name) are
        its local evaluation split."""
        x, y, keys = self.read_folder(Path(data_dir))
        return client_splits(x, y, keys, self.params.eval_fraction)

    def read_folder(self, folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every readable image under ``folder``'s class folders: normalised pixels
        [N, 3, S, S], labels, and each image's ``class/file`` name. Unreadable files are
        skipped with a warning (a file being written while it is read)."""
        files = self._files(folder)
        size = self.params.image_size
        x = np.empty((len(files), 3, size, size), dtype=np.float32)
        y = np.empty(len(files), dtype=np.int64)
        keys: list[str] = []
        bad: list[str] = []
        for path, label in files:
            pixels = _read_image(path, size)
            if pixels is None:
                bad.append(str(path))
                continue
            x[len(keys)] = self._normalise(pixels)
            y[len(keys)] = label
            keys.append(f"{path.parent.name}/{path.name}")
        if bad:
            logger.warning(
                "skipped %d unreadable image(s) in %s: %s%s",
                len(bad),
                folder,
                ", ".join(bad[:SHOWN_BAD_FILES]),
                " ..." if len(bad) > SHOWN_BAD_FILES else "",
            )
        if not keys:
            raise NoClientDataError(
                f"data directory {folder}: none of its {len(files)} image file(s) can be read"
            )
        return x[: len(keys)], y[: len(keys)], keys

    def _files(self, folder: Path) -> list[tuple[Path, int]]:
        """(image file, label) for every image file in a class folder, in a fixed order."""
        if not folder.is_dir():
            raise NoClientDataError(
                f"data directory {folder} does not exist; expected one folder per class "
                "holding image files"
            )
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p))
        labels = self._labels(folder, found)
        files = [
            (path, labels[name])
            for name in found
            for path in sorted((folder / name).iterdir())
            if path.is_file() and not _hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise NoClientDataError(
                f"data directory {folder} holds no image files in its class folders "
                f"({', '.join(found) or 'none'}); expected <class>/<image>.png|.jpg|..."
            )
        if len(files) > self.params.max_examples:
            raise ClientDataError(
                f"data directory {folder} holds {len(files)} images; task_params max_examples "
                f"allows {self.params.max_examples}"
            )
        return files

    def _labels(self, folder: Path, found: list[str]) -> dict[str, int]:
        if self.params.classes:
            unknown = [name for name in found if name not in self.params.classes]
            if unknown:
                raise ClientDataError(
                    f"data directory {folder}: folder(s) {', '.join(unknown)} are not classes "
                    f"of task_params classes ({', '.join(self.params.classes)})"
                )
            return {name: self.params.classes.index(name) for name in found}
        if len(found) != self.num_classes:
            raise ClientDataError(
                f"data directory {folder} holds {len(found)} class folder(s) "
                f"({', '.join(found) or 'none'}) but num_classes is {self.num_classes}: labels "
                "would not match other devices'; create every class folder (empty is fine) "
                "or set task_params classes"
            )
        return {name: label for label, name in enumerate(found)}

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """[S, S, 3] uint8 -> [3, S, S] float32, scaled to [0, 1] then normalised."""
        mean = np.asarray(self.params.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.params.std, dtype=np.float32)[:, None, None]
        chw = pixels.transpose(2, 0, 1).astype(np.float32) / PIXEL_MAX
        result: np.ndarray = (chw - mean) / std
        return result

    def _pixels(self, x: np.ndarray) -> np.ndarray:
        """``_normalise`` undone: [N, 3, S, S] float32 -> [N, S, S, 3] uint8."""
        mean = np.asarray(self.params.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.params.std, dtype=np.float32)[None, :, None, None]
        scaled = np.rint((x * std + mean) * PIXEL_MAX)
        pixels: np.ndarray = np.clip(scaled, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return pixels

    # -- simulation ----------------------------------------------------------------------

    def load_central_data(self) -> CentralData:
        """Every image under the ``root`` folder; a seeded ``test_fraction`` per class is the
        held-out test split."""
        if not self.params.root:
            raise ClientDataError(
                "task image_folder: set task_params root to a folder of class folders to "
                "simulate (e.g. one made by `sfl dataset images`); devices read their own"
            )
        root = Path(self.params.root)
        x, y, _ = self.read_folder(root)
        if not self._class_names:
            self._class_names = tuple(
                sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p))
            )
        train, test = central_split(x, y, self.params.test_fraction, self.params.split_seed)
        return CentralData(train=train, test=test, num_classes=self.num_classes)

    def write_client_data(self, data_dir: Path, data: ClientData) -> None:
        """One simulated device's share as a real device holds it: a folder per class (all
        of them, some maybe empty) of PNG files."""
        from PIL import Image

        names = self._class_names or tuple(f"class_{c:03d}" for c in range(self.num_classes))
        data_dir = Path(data_dir)
        for name in names:
            (data_dir / name).mkdir(parents=True, exist_ok=True)
            for stale in (data_dir / name).glob(f"{SIMULATED_PREFIX}*.png"):
                stale.unlink()  # an earlier simulation's share
        count = 0
        for split in (data.train, data.eval):
            for pixels, label in zip(self._pixels(split.x), split.y, strict=True):
                Image.fromarray(pixels).save(
                    data_dir / names[int(label)] / f"{SIMULATED_PREFIX}{count:06d}.png"
                )
                count += 1


def small_cnn(num_classes: int, norm: str) -> nn.Module:
    """Two 3x3 convolutions, global average pooling and a linear layer: quick to train."""

    def normalise(channels: int) -> nn.Module:
        return group_norm(channels) if norm == "group" else nn.BatchNorm2d(channels)

    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, padding=1),
        normalise(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        normalise(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def group_norm(channels: int) -> nn.Module:
    """GroupNorm in place of a torchvision model's BatchNorm: up to 32 groups that divide
    the channels."""
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _read_image(path: Path, size: int) -> np.ndarray | None:
    """[size, size, 3] uint8 RGB pixels, or None if the file is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it can
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            pixels: np.ndarray = np.asarray(rgb, dtype=np.uint8)
            return pixels
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
