"""Scoring a global model on held-out data: one code path for the simulation and for AWS.

On AWS the held-out set is optional: the operator uploads it (``sfl eval-data upload``) as a
safetensors file of ``x`` (features) and ``y`` (integer labels) to ``layout.EVAL_DATA_KEY``
in the models bucket, and the averager scores each new model version on it after the round
closes, recording the scores on the round record and in the version's lineage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning import codec
from sfl.learning.tasks.base import ArrayDataset, TrainingTask
from sfl.state.aws import AwsClients, is_not_found
from sfl.state.buffers import Buffer, BufferStore
from sfl.state.lineage import LineageStore, lineage_of_buffer, lineage_of_round
from sfl.state.model_store import ModelStore
from sfl.state.rounds import Round, RoundState, RoundStore

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EVAL_FORMAT = "sfl-eval/1"
#: A held-out set larger than this is refused: the averager holds it in memory.
MAX_EVAL_BYTES = 256 * 1024 * 1024
MAX_EVAL_EXAMPLES = 1_000_000

# The held-out set of this container, by ETag: re-read only when the operator replaced it.
_EVAL_CACHE: dict[str, tuple[str, ArrayDataset]] = {}


class EvalDataError(ValueError):
    """A held-out evaluation set that cannot be used (shape, dtype, size)."""


def score(
    task: TrainingTask, state: Mapping[str, torch.Tensor], data: ArrayDataset
) -> dict[str, Any]:
    """Accuracy and loss of a model's tensors on ``data``."""
    model = task.build_model()
    model.load_state_dict(dict(state))
    metrics = task.evaluate(model, data)
    return {"accuracy": metrics.accuracy, "loss": metrics.loss, "examples": len(data)}


def score_version(
    task: TrainingTask, aws: AwsClients, bucket: str, version: int, data: ArrayDataset
) -> dict[str, Any]:
    """Score global model ``version`` from the models bucket."""
    body = ModelStore(aws.s3, bucket).model_bytes(version)
    return score(task, codec.decode(body), data)


def encode_eval_set(data: ArrayDataset, *, task: str) -> bytes:
    from safetensors.numpy import save

    check_eval_set(data)
    return save(
        {"x": np.ascontiguousarray(data.x, dtype=np.float32), "y": np.ascontiguousarray(data.y)},
        metadata={"format": EVAL_FORMAT, "task": task},
    )


def decode_eval_set(body: bytes) -> ArrayDataset:
    from safetensors.numpy import load

    if len(body) > MAX_EVAL_BYTES:
        raise EvalDataError(f"held-out set is {len(body)} bytes; at most {MAX_EVAL_BYTES}")
    try:
        codec.parse_header(body)
        tensors = load(body)
    except Exception as e:
        raise EvalDataError(f"held-out set is not a safetensors file: {e}") from e
    if set(tensors) != {"x", "y"}:
        raise EvalDataError(f"held-out set holds {sorted(tensors)}; expected exactly x and y")
    data = ArrayDataset(x=tensors["x"], y=tensors["y"])
    check_eval_set(data)
    return ArrayDataset(
        x=data.x.astype(np.float32, copy=False), y=data.y.astype(np.int64, copy=False)
    )


def check_eval_set(data: ArrayDataset) -> None:
    if data.y.ndim != 1 or data.x.ndim < 2 or len(data.x) != len(data.y):
        raise EvalDataError(
            f"x has shape {tuple(data.x.shape)} and y {tuple(data.y.shape)}; expected "
            "x [N, ...] and y [N]"
        )
    if not np.issubdtype(data.y.dtype, np.integer):
        raise EvalDataError(f"y has dtype {data.y.dtype}; expected integer labels")
    if not 0 < len(data.y) <= MAX_EVAL_EXAMPLES:
        raise EvalDataError(f"{len(data.y)} examples; expected 1 to {MAX_EVAL_EXAMPLES}")
    if not np.all(np.isfinite(data.x)):
        raise EvalDataError("x holds non-finite values")


def load_eval_set(aws: AwsClients, names: ResourceNames) -> ArrayDataset | None:
    """The uploaded held-out set, or None when there is none."""
    try:
        head = aws.s3.head_object(Bucket=names.models_bucket, Key=layout.EVAL_DATA_KEY)
    except ClientError as e:
        if is_not_found(e):
            return None
        raise
    etag = str(head["ETag"])
    cached = _EVAL_CACHE.get(names.models_bucket)
    if cached is not None and cached[0] == etag:
        return cached[1]
    body = aws.s3.get_object(Bucket=names.models_bucket, Key=layout.EVAL_DATA_KEY, IfMatch=etag)
    data = decode_eval_set(body["Body"].read())
    _EVAL_CACHE.clear()
    _EVAL_CACHE[names.models_bucket] = (etag, data)
    return data


def score_held_out(
    aws: AwsClients, names: ResourceNames, config: FederationConfig, version: int, **where: int
) -> dict[str, Any] | None:
    """Model ``version``'s scores on the held-out set, or None without one. An unusable set
    (or a model the task cannot load) gives its error as the scores, never a failure;
    ``where`` (the round, or the buffer) goes into the warning."""
    try:
        data = load_eval_set(aws, names)
        if data is None:
            return None
        from sfl.learning.tasks import configured_task

        return score_version(configured_task(config), aws, names.models_bucket, version, data)
    except Exception as e:  # a bad or replaced set, a model the task cannot load
        logger.warning("held-out evaluation failed", extra={**where, "error": str(e)})
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def after_round(
    aws: AwsClients, names: ResourceNames, config: FederationConfig, finished: Round
) -> dict[str, Any] | None:
    """What follows a closed round: score the new model on the held-out set (if there is
    one), record the scores on the round, and write the version's lineage. Returns the
    scores, or None without a held-out set. An unusable held-out set is recorded as the
    round's evaluation error, never a failed round."""
    if finished.status is not RoundState.CLOSED or finished.model_version is None:
        return None
    scores = score_held_out(aws, names, config, finished.model_version, round=finished.round)
    # The lineage first: scores on the round record mean everything after the round is done.
    LineageStore(aws, names).put(lineage_of_round(finished, scores or {}))
    if scores is not None:
        RoundStore(aws.dynamodb, names.rounds_table).record_evaluation(
            finished.experiment, finished.round, scores
        )
    return scores


def after_buffer(
    aws: AwsClients, names: ResourceNames, config: FederationConfig, closed: Buffer
) -> dict[str, Any] | None:
    """What follows a closed buffer (buffered mode): score its version on the held-out set
    (if there is one) and write the version's lineage, naming the devices whose updates
    were used. Returns the scores, or None without a held-out set."""
    if closed.model_version is None:
        return None
    scores = score_held_out(aws, names, config, closed.model_version, buffer=closed.number)
    excluded = set(closed.summary.get("excluded", {}) or {})
    members = BufferStore(aws.dynamodb, names.rounds_table).members(
        closed.experiment, closed.number
    )
    used = [m.client_id for m in members if m.label not in excluded]
    if closed.summary.get("unchanged"):
        used = []
    LineageStore(aws, names).put(lineage_of_buffer(closed, used, scores or {}))
    return scores
