"""What the operator's commands change: pause, resume, start a round, the runtime
configuration, promotion, rollback, model download and the held-out evaluation set."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning import codec
from sfl.ops.federation import INITIATOR_OUTPUT, Federation, OpsError
from sfl.state.control import ConfigVersion, ControlStore, effective_config
from sfl.state.lineage import LineageStore
from sfl.state.model_store import ModelStore


def control(fed: Federation) -> ControlStore:
    return ControlStore(fed.aws.dynamodb, fed.names.rounds_table)


def pause(fed: Federation, reason: str = "") -> dict[str, Any]:
    control(fed).pause(fed.experiment, now=time.time(), reason=reason)
    return {"paused": True, "reason": reason}


def resume(fed: Federation) -> dict[str, Any]:
    control(fed).resume(fed.experiment)
    return {"paused": False}


def start_round(fed: Federation) -> dict[str, Any]:
    """Run the initiator now. Deployed: invoke the function (its role, its logs). Local mode:
    the same code in this process (moto's Lambda would need Docker to run it)."""
    if fed.local:
        from sfl.server.initiator import start_round as run_initiator

        result = run_initiator(fed.aws, fed.names, fed.deployed_config).to_dict()
        result["ran"] = "in this process (local mode)"
        return result
    function = fed.output(INITIATOR_OUTPUT)
    response = fed.client("lambda").invoke(
        FunctionName=function,
        InvocationType="RequestResponse",
        Payload=json.dumps({"source": "sfl.cli.main", "action": "start-round"}).encode(),
    )
    payload = json.loads(response["Payload"].read() or b"{}")
    if response.get("FunctionError"):
        raise OpsError(f"the initiator {function} failed: {payload}")
    payload["ran"] = f"function {function}"
    return dict(payload)


# --- configuration ---------------------------------------------------------------------------


def config_show(fed: Federation) -> dict[str, Any]:
    deployed = fed.deployed_config
    state = control(fed).state(fed.experiment)
    try:
        current = effective_config(deployed, state.overrides)
        error = None
    except ValueError as e:
        current, error = deployed, str(e)
    keys = []
    for key, value in current.to_dict().items():
        deployed_value = getattr(deployed, key)
        keys.append(
            {
                "key": key,
                "value": value,
                "source": "runtime" if key in state.overrides else "deployed",
                "deployed": deployed_value,
            }
        )
    return {"version": state.config_version, "keys": keys, "error": error}


def config_set(
    fed: Federation, changes: dict[str, str], unset: list[str], note: str = ""
) -> dict[str, Any]:
    record, config = control(fed).set_config(
        fed.deployed_config, changes, unset=unset, now=time.time(), note=note
    )
    return {"version": record.version, "changed": dict(record.changed), "config": config.to_dict()}


def config_history(fed: Federation) -> list[dict[str, Any]]:
    return [_version(v) for v in control(fed).config_history(fed.experiment)]


def _version(v: ConfigVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "set_at": v.set_at,
        "changed": dict(v.changed),
        "overrides": dict(v.overrides),
        "note": v.note,
    }


# --- models -----------------------------------------------------------------------------------


def _require_version(fed: Federation, version: int) -> None:
    if not ModelStore(fed.aws.s3, fed.names.models_bucket).has_model(version):
        raise OpsError(f"model version {version} does not exist (see 'sfl models list')")


def pull(fed: Federation, version: int | None, out: Path) -> dict[str, Any]:
    """Download a model version (default: the promoted one, else the newest)."""
    if version is None:
        promoted = control(fed).state(fed.experiment).promoted_version
        versions = LineageStore(fed.aws, fed.names).versions()
        if promoted is None and not versions:
            raise OpsError("there is no model version yet")
        version = promoted if promoted is not None else max(versions)
    _require_version(fed, version)
    body = ModelStore(fed.aws.s3, fed.names.models_bucket).model_bytes(version)
    header = codec.parse_header(body)
    if header.metadata.get("version") != str(version):
        raise OpsError(f"model version {version}'s header says {header.metadata.get('version')!r}")
    out.write_bytes(body)
    return {
        "version": version,
        "path": str(out),
        "bytes": len(body),
        "tensors": len(header.tensors),
    }


def promote(fed: Federation, version: int) -> dict[str, Any]:
    """Copy a version to the stable key devices read for inference, and record it."""
    _require_version(fed, version)
    bucket = fed.names.models_bucket
    fed.aws.s3.copy_object(
        Bucket=bucket,
        Key=layout.PROMOTED_MODEL_KEY,
        CopySource={"Bucket": bucket, "Key": layout.model_key(version)},
        MetadataDirective="REPLACE",
        Metadata={"sfl-model-version": str(version)},
    )
    control(fed).promoted(fed.experiment, version, now=time.time())
    return {"promoted": version, "key": f"s3://{bucket}/{layout.PROMOTED_MODEL_KEY}"}


def rollback(fed: Federation, version: int | None) -> dict[str, Any]:
    """Ask the initiator to start the next round from ``version`` (default: the newest
    version's parent), written again as a new version so every number stays written once."""
    versions = LineageStore(fed.aws, fed.names).versions()
    if not versions:
        raise OpsError("there is no model version yet")
    newest = max(versions)
    if version is None:
        lineage = LineageStore(fed.aws, fed.names).get(newest)
        if lineage is None or lineage.parent is None:
            raise OpsError(f"version {newest} has no recorded parent; name a VERSION")
        version = lineage.parent
    _require_version(fed, version)
    if version == newest:
        raise OpsError(f"version {version} is already the newest; nothing to roll back")
    control(fed).request_rollback(fed.experiment, version, now=time.time())
    return {"rollback_to": version, "newest": newest}


def cancel_rollback(fed: Federation) -> dict[str, Any]:
    """Drop a pending rollback; ``cancelled`` False if there was none to drop."""
    pending = control(fed).state(fed.experiment).rollback_to
    cancelled = control(fed).cancel_rollback(fed.experiment)
    return {"cancelled": cancelled, "rollback_to": pending if cancelled else None}


# --- held-out evaluation set -----------------------------------------------------------------


def eval_upload(fed: Federation, *, task: str | None, path: Path | None) -> dict[str, Any]:
    from sfl.server.evaluation import decode_eval_set, encode_eval_set

    if path is not None:
        body = path.read_bytes()
    else:
        from sfl.learning.tasks import configured_task, load_task

        deployed = fed.deployed_config
        chosen = configured_task(deployed) if task in (None, deployed.task) else load_task(task)
        name = task or deployed.task
        body = encode_eval_set(chosen.load_central_data().test, task=name)
    data = decode_eval_set(body)  # refuse what the averager would refuse
    _check_against_model(fed, data)
    fed.aws.s3.put_object(Bucket=fed.names.models_bucket, Key=layout.EVAL_DATA_KEY, Body=body)
    return {
        "key": f"s3://{fed.names.models_bucket}/{layout.EVAL_DATA_KEY}",
        "examples": len(data),
        "bytes": len(body),
    }


def _check_against_model(fed: Federation, data: Any) -> None:
    """Score model version 0 on the set here, so a set the task cannot read fails now."""
    from sfl.learning.tasks import configured_task
    from sfl.server.evaluation import EvalDataError, score_version

    config: FederationConfig = fed.deployed_config
    try:
        score_version(configured_task(config), fed.aws, fed.names.models_bucket, 0, data)
    except ClientError:
        return  # no version 0 yet: the averager will tell
    except (RuntimeError, ValueError) as e:
        raise EvalDataError(f"task {config.task!r} cannot score this set: {e}") from e
