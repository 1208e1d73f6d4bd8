"""Edge client settings from flags and environment (Greengrass passes them as either)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sfl.core import task_params as task_params_
from sfl.core.config import FederationConfig
from sfl.core.layout import validate_client_id
from sfl.core.notices import NOTICE_TOPIC_ENV
from sfl.core.params import ParamsError

_DEFAULTS = FederationConfig()


@dataclass(frozen=True)
class ClientSettings:
    client_id: str
    models_bucket: str
    updates_bucket: str
    clients_table: str
    data_dir: Path
    task: str = _DEFAULTS.task
    task_params: str = _DEFAULTS.task_params  # a JSON object, checked when parsed
    endpoint_url: str | None = None
    region: str | None = None
    poll_seconds: float = _DEFAULTS.poll_seconds
    heartbeat_seconds: float = _DEFAULTS.heartbeat_seconds
    # Round notices (push): the topic ('' : none, poll only), and the slower poll and
    # heartbeat periods while the subscription is live.
    notice_topic: str = ""
    push_poll_seconds: float = _DEFAULTS.push_poll_seconds
    push_heartbeat_seconds: float = _DEFAULTS.push_heartbeat_seconds
    active_window_seconds: float = _DEFAULTS.active_window_seconds
    max_backoff_seconds: float = 300.0
    max_rounds: int | None = None  # stop after answering this many rounds (tests, demos)
    # Local DP (docs/privacy.md): the device clips its change to this L2 norm and adds
    # Gaussian noise of local_dp_noise_multiplier x local_dp_clip before upload; 0: off.
    local_dp_clip: float = 0.0
    local_dp_noise_multiplier: float = 0.0


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if env.get(name):
            return env[name]
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_client",
        description="Federated-learning edge client: trains locally when picked for a round.",
    )
    p.add_argument("--client-id", help="defaults to $SFL_CLIENT_ID, then $AWS_IOT_THING_NAME")
    p.add_argument("--models-bucket", help="defaults to $SFL_MODELS_BUCKET")
    p.add_argument("--updates-bucket", help="defaults to $SFL_UPDATES_BUCKET")
    p.add_argument("--clients-table", help="defaults to $SFL_CLIENTS_TABLE")
    p.add_argument("--data-dir", type=Path, help="defaults to $SFL_DATA_DIR")
    p.add_argument("--task", help=f"task name or import path (default {_DEFAULTS.task})")
    p.add_argument(
        "--task-params", metavar="JSON", help="the task's parameters; defaults to $SFL_TASK_PARAMS"
    )
    p.add_argument("--endpoint-url", help="AWS endpoint (local emulator); default: AWS")
    p.add_argument("--region", help="AWS region (default from the environment)")
    p.add_argument("--poll-seconds", type=float)
    p.add_argument("--heartbeat-seconds", type=float)
    p.add_argument(
        "--notice-topic", help=f"round notices' MQTT topic; defaults to ${NOTICE_TOPIC_ENV}"
    )
    p.add_argument("--push-poll-seconds", type=float)
    p.add_argument("--push-heartbeat-seconds", type=float)
    p.add_argument(
        "--active-window-seconds",
        type=float,
        help="the federation's active window; sets how long the registry keeps this client",
    )
    p.add_argument("--max-rounds", type=int)
    p.add_argument(
        "--local-dp-clip",
        type=float,
        help="local DP: clip this device's change to this L2 norm before upload; defaults to "
        "$SFL_LOCAL_DP_CLIP, 0 (off)",
    )
    p.add_argument(
        "--local-dp-noise-multiplier",
        type=float,
        help="local DP: Gaussian noise of this times the clip on the change; defaults to "
        "$SFL_LOCAL_DP_NOISE_MULTIPLIER, 0 (clip only)",
    )
    return p


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ClientSettings:
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)

    def need(value: str | None, flag: str, *names: str) -> str:
        found = value or _env(env, *names)
        if not found:
            parser.error(f"{flag} is required (or set {' or '.join(names)})")
        return found

    client_id = need(args.client_id, "--client-id", "SFL_CLIENT_ID", "AWS_IOT_THING_NAME")
    try:
        validate_client_id(client_id)
    except ValueError as e:
        parser.error(str(e))
    data_dir = args.data_dir or (Path(env["SFL_DATA_DIR"]) if env.get("SFL_DATA_DIR") else None)
    if data_dir is None:
        parser.error("--data-dir is required (or set SFL_DATA_DIR)")

    task = args.task or env.get("SFL_TASK") or _DEFAULTS.task
    raw_params = args.task_params or env.get("SFL_TASK_PARAMS") or _DEFAULTS.task_params
    try:
        given = task_params_.parse(raw_params)
        task_params_.check(task, given)  # a built-in's; a task by import path checks its own
    except ParamsError as e:
        parser.error(f"--task-params / SFL_TASK_PARAMS: {e}")

    def number(value: float | None, name: str, default: float) -> float:
        if value is not None:
            return value
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return float(raw)
        except ValueError:
            parser.error(f"{name}={raw!r} is not a number")
            raise  # unreachable: parser.error exits

    local_dp_clip = number(args.local_dp_clip, "SFL_LOCAL_DP_CLIP", 0.0)
    local_dp_noise = number(args.local_dp_noise_multiplier, "SFL_LOCAL_DP_NOISE_MULTIPLIER", 0.0)
    for value, name in (
        (local_dp_clip, "--local-dp-clip"),
        (local_dp_noise, "--local-dp-noise-multiplier"),
    ):
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"{name}: {value} is not a finite number >= 0")
    if local_dp_noise > 0 and local_dp_clip <= 0:
        parser.error(
            "--local-dp-noise-multiplier needs --local-dp-clip > 0: the noise is a "
            "multiple of the clip"
        )

    return ClientSettings(
        client_id=client_id,
        models_bucket=need(args.models_bucket, "--models-bucket", "SFL_MODELS_BUCKET"),
        updates_bucket=need(args.updates_bucket, "--updates-bucket", "SFL_UPDATES_BUCKET"),
        clients_table=need(args.clients_table, "--clients-table", "SFL_CLIENTS_TABLE"),
        data_dir=data_dir,
        task=task,
        task_params=task_params_.canonical(given),
        endpoint_url=args.endpoint_url or env.get("AWS_ENDPOINT_URL") or None,
        region=args.region or _env(env, "AWS_REGION", "AWS_DEFAULT_REGION"),
        poll_seconds=number(args.poll_seconds, "SFL_POLL_SECONDS", _DEFAULTS.poll_seconds),
        heartbeat_seconds=number(
            args.heartbeat_seconds, "SFL_HEARTBEAT_SECONDS", _DEFAULTS.heartbeat_seconds
        ),
        notice_topic=args.notice_topic or env.get(NOTICE_TOPIC_ENV) or "",
        push_poll_seconds=number(
            args.push_poll_seconds, "SFL_PUSH_POLL_SECONDS", _DEFAULTS.push_poll_seconds
        ),
        push_heartbeat_seconds=number(
            args.push_heartbeat_seconds,
            "SFL_PUSH_HEARTBEAT_SECONDS",
            _DEFAULTS.push_heartbeat_seconds,
        ),
        active_window_seconds=number(
            args.active_window_seconds,
            "SFL_ACTIVE_WINDOW_SECONDS",
            _DEFAULTS.active_window_seconds,
        ),
        max_rounds=args.max_rounds,
        local_dp_clip=local_dp_clip,
        local_dp_noise_multiplier=local_dp_noise,
    )
