"""This app's training task: the model, the data, how a device trains and how a model scores.

The framework calls what the contract names (``sfl.learning.tasks.base.TrainingTask``):

- ``build_model(seed)``: a fresh model; the same seed must give the same weights.
  ``ClassificationTask`` seeds ``new_model``: put your model there.
- ``load_client_data(data_dir)``: on a device, each time it is picked: its own data.
  ``ClassificationTask`` reads ``data_dir/data.safetensors`` (what ``sfl split-dataset``
  writes); read your own files here instead (images, CSV, logs).
- ``train`` and ``evaluate``: SGD with cross-entropy from ``ClassificationTask``; override
  them for your own loop.
- ``load_central_data()``: the whole dataset, for ``sfl simulate`` and ``sfl split-dataset``
  only (never on a device): here scikit-learn's bundled 8x8 digits.

Everything this module imports at the top must exist on a device and in the averager: torch,
numpy, safetensors and the framework, plus what ``requirements-task.txt`` pins.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from sfl.learning.tasks.base import ArrayDataset, CentralData
from sfl.learning.tasks.classification import ClassificationTask

NUM_FEATURES = 64
NUM_CLASSES = 10
TEST_FRACTION = 0.2


class Task(ClassificationTask):
    """A small MLP over 64 features into 10 classes."""

    name = "my_task"
    input_shape = (NUM_FEATURES,)
    num_classes = NUM_CLASSES

    def new_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(NUM_FEATURES, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def load_central_data(self) -> CentralData:
        # Imported here: devices and the averager never call this, so they need no sklearn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.asarray(digits.data, dtype=np.float32) / 16.0
        y = np.asarray(digits.target, dtype=np.int64)
        order = np.random.default_rng(0).permutation(len(y))
        test, train = np.split(order, [int(len(y) * TEST_FRACTION)])
        return CentralData(
            train=ArrayDataset(x=x[train], y=y[train]),
            test=ArrayDataset(x=x[test], y=y[test]),
            num_classes=NUM_CLASSES,
        )
