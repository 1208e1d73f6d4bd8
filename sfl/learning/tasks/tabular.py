"""Tables as devices hold them: a CSV file of numbers in the data directory; an MLP.

The file (``file``, default ``data.csv``) has a header row naming its columns; the
``label_column`` holds the class (an integer from 0 to num_classes - 1) and the
``feature_columns`` (or every other column) hold numbers. A row that is not so is reported
with its line number, and the file is refused: a model is never trained on half a table.
The file is read afresh on every call, so rows appended since the last round count.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import nn

from sfl.core.task_params import TabularParams
from sfl.learning.tasks.base import (
    CentralData,
    ClientData,
    ClientDataError,
    NoClientDataError,
)
from sfl.learning.tasks.classification import ClassificationTask
from sfl.learning.tasks.holdout import central_split, client_splits

#: Bad rows named in an error, at most.
SHOWN_BAD_ROWS = 10


class TabularTask(ClassificationTask):
    """Cross-entropy classification of a row of numbers by an MLP (``hidden`` sizes, ReLU)."""

    name = "tabular"
    Params = TabularParams

    def __init__(self, params: TabularParams | None = None) -> None:
        self.params = params if params is not None else TabularParams()
        self.num_classes = self.params.num_classes
        width = self.params.num_features or len(self.params.feature_columns)
        self.input_shape = (width,)
        self._columns: tuple[str, ...] = self.params.feature_columns

    def new_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = self.input_shape[0]
        for size in self.params.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, self.num_classes))
        return nn.Sequential(*layers)

    def load_client_data(self, data_dir: Path) -> ClientData:
        """The device's CSV file, read now; ``eval_fraction`` of its rows (by their text) are
        its local evaluation split."""
        path = Path(data_dir) / self.params.file
        if not path.is_file():
            raise NoClientDataError(
                f"data file {path} does not exist; expected a CSV file with a header row and "
                f"the column {self.params.label_column!r}"
            )
        x, y, keys = self.read_csv(path)
        return client_splits(x, y, keys, self.params.eval_fraction)

    def read_csv(self, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features [N, F] float32, labels [N] and each row's text; ``ClientDataError`` naming
        the bad rows' line numbers if any row is not numbers and a label."""
        try:
            with path.open(newline="", encoding="utf-8") as f:
                return self._rows(path, csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ClientDataError(f"data file {path}: cannot read it as CSV: {e}") from e

    def _rows(
        self, path: Path, reader: Iterator[list[str]]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        header = next(reader, None)
        if header is None:
            raise NoClientDataError(f"data file {path} is empty; expected a header row")
        header = [name.strip() for name in header]
        label_at, feature_at = self._positions(path, header)
        rows: list[list[float]] = []
        labels: list[int] = []
        keys: list[str] = []
        bad: list[str] = []
        for fields in reader:
            if not fields or all(not v.strip() for v in fields):
                continue  # a blank line
            line = getattr(reader, "line_num", 0)
            problem = None
            if len(fields) != len(header):
                problem = f"{len(fields)} fields, the header has {len(header)}"
            else:
                values = [_number(fields[i]) for i in feature_at]
                label = _number(fields[label_at])
                if any(v is None for v in values):
                    names = [
                        header[i] for i, v in zip(feature_at, values, strict=True) if v is None
                    ]
                    problem = f"not a finite number in column(s) {', '.join(names)}"
                elif label is None or not label.is_integer() or not 0 <= label < self.num_classes:
                    problem = (
                        f"label {fields[label_at]!r} is not an integer from 0 to "
                        f"{self.num_classes - 1}"
                    )
            if problem is not None:
                bad.append(f"line {line}: {problem}")
                continue
            if len(rows) >= self.params.max_examples:
                raise ClientDataError(
                    f"data file {path} holds more than {self.params.max_examples} rows "
                    "(task_params max_examples)"
                )
            rows.append([v for v in values if v is not None])
            assert label is not None
            labels.append(int(label))
            keys.append(",".join(fields))
        if bad:
            more = f" (and {len(bad) - SHOWN_BAD_ROWS} more)" if len(bad) > SHOWN_BAD_ROWS else ""
            raise ClientDataError(
                f"data file {path}: {len(bad)} bad row(s): "
                + "; ".join(bad[:SHOWN_BAD_ROWS])
                + more
            )
        if not rows:
            raise NoClientDataError(f"data file {path} holds a header and no rows")
        x = np.asarray(rows, dtype=np.float32)
        return x, np.asarray(labels, dtype=np.int64), keys

    def _positions(self, path: Path, header: list[str]) -> tuple[int, list[int]]:
        """Where the label and the features are in this file's columns."""
        label_column = self.params.label_column
        if len(set(header)) != len(header):
            raise ClientDataError(f"data file {path}: the header names a column twice: {header}")
        if label_column not in header:
            raise ClientDataError(
                f"data file {path}: no label column {label_column!r}; columns: {', '.join(header)}"
            )
        wanted = self.params.feature_columns or tuple(c for c in header if c != label_column)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ClientDataError(
                f"data file {path}: no feature column(s) {', '.join(missing)}; "
                f"columns: {', '.join(header)}"
            )
        if len(wanted) != self.input_shape[0]:
            raise ClientDataError(
                f"data file {path}: {len(wanted)} feature column(s) but the model takes "
                f"{self.input_shape[0]} (task_params num_features)"
            )
        if not self._columns:
            self._columns = tuple(wanted)
        return header.index(label_column), [header.index(c) for c in wanted]

    # -- simulation ----------------------------------------------------------------------

    def load_central_data(self) -> CentralData:
        """Every row of the ``root`` CSV file; a seeded ``test_fraction`` per class is the
        held-out test split."""
        if not self.params.root:
            raise ClientDataError(
                "task tabular: set task_params root to a CSV file to simulate; devices read "
                "their own"
            )
        x, y, _ = self.read_csv(Path(self.params.root))
        train, test = central_split(x, y, self.params.test_fraction, self.params.split_seed)
        return CentralData(train=train, test=test, num_classes=self.num_classes)

    def write_client_data(self, data_dir: Path, data: ClientData) -> None:
        """One simulated device's share as a real device holds it: a CSV file."""
        columns = self._columns or tuple(f"x{i}" for i in range(self.input_shape[0]))
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir / self.params.file).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([*columns, self.params.label_column])
            for split in (data.train, data.eval):
                for features, label in zip(split.x, split.y, strict=True):
                    writer.writerow([*(repr(float(v)) for v in features), int(label)])


def _number(text: str) -> float | None:
    """A finite number, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
