"""The default task: scikit-learn's bundled 8x8 handwritten digits, small enough for any CPU.

1,797 images ship inside scikit-learn, so nothing is downloaded; a fixed stratified 20% is
held out as the test split and the rest is the pool dealt out to clients.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from sfl.learning.tasks.base import ArrayDataset, CentralData
from sfl.learning.tasks.classification import ClassificationTask

TEST_FRACTION = 0.2
SPLIT_SEED = 0
PIXEL_MAX = 16.0


class DigitsTask(ClassificationTask):
    """A small CNN on 8x8 digit images scaled to [0, 1]."""

    name = "digits"
    input_shape = (1, 8, 8)
    num_classes = 10

    def new_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, self.num_classes),
        )

    def load_central_data(self) -> CentralData:
        # Imported here: building the model (all the averager does with a task) needs no
        # scikit-learn, so the averager's image does not carry it.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (np.asarray(digits.images, dtype=np.float32) / PIXEL_MAX)[:, None, :, :]
        y = np.asarray(digits.target, dtype=np.int64)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
        )
        return CentralData(
            train=ArrayDataset(x=x_train, y=y_train),
            test=ArrayDataset(x=x_test, y=y_test),
            num_classes=self.num_classes,
        )


class DigitsMlpTask(DigitsTask):
    """The same digits with a 2-hidden-layer MLP (inputs, 128, 64, classes): the model of
    the non-IID reference runs (docs/strategies.md), where FedAvg needs ~40 rounds."""

    name = "digits_mlp"

    def new_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(8 * 8, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, self.num_classes),
        )
