"""``sfl loadtest``: one round with thousands of virtual clients through the local deployment.

A virtual client is a real ``EdgeClient`` (registry heartbeat, conditional poll of the
assignment, the base model's download, the upload under its own key) that skips training:
its update is one of a few precomputed payloads — the base model plus a small deterministic
perturbation, encoded once — under a safetensors header written for that client and round.
Uploads run from a bounded thread pool into the same ``LocalFederation`` as ``sfl simulate``
runs (S3 events reach the averager handler through the emulator's queue). Each phase of the
round is timed, and the round item's size is computed the way DynamoDB counts it.
"""

from __future__ import annotations

import json
import resource
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch
from botocore.config import Config
from torch import nn

from edge_client.client import Assignment, EdgeClient
from edge_client.global_model import size_limit
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning import codec
from sfl.learning.tasks import configured_task
from sfl.learning.tasks.base import TrainingTask
from sfl.learning.tasks.digits import DigitsMlpTask
from sfl.local.federation import LocalFederation, round_key
from sfl.state.aws import RETRY_CONFIG, AwsClients, make_clients
from sfl.state.dynamo import from_item
from sfl.state.model_store import ModelStore

#: DynamoDB's item size limit (400 KB, counted as 400 * 1024 bytes).
DYNAMODB_ITEM_LIMIT = 400 * 1024
PHASES = ("registry_fill", "selection", "uploads", "acceptance", "aggregation", "round_total")


class LoadTestError(RuntimeError):
    """The load test could not run a round (the initiator refused, the endpoint failed)."""


class WideDigitsTask(DigitsMlpTask):
    """The digits MLP with a 85,000-unit hidden layer: 6.4 M float32 parameters (25 MB),
    the size of the issue's aggregation benchmark, for trying a large model at smaller N.
    Chosen with ``--task sfl.local.loadtest:WideDigitsTask``."""

    name = "digits_wide"
    hidden = 85_000

    def new_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(8 * 8, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.num_classes),
        )


@dataclass(frozen=True)
class LoadTestOptions:
    out: Path | None = None  # the JSON report; None: not written
    clients: int = 1000
    task: str = "digits_mlp"
    payloads: int = 8  # distinct precomputed updates, shared round-robin
    workers: int = 16  # the upload thread pool (concurrent virtual clients)
    averager_concurrency: int = 4
    seed: int = 0
    perturbation: float = 1e-3
    deadline_seconds: int = 900
    tick_seconds: float = 60.0  # EventBridge schedules run at most once a minute
    config_overrides: tuple[tuple[str, str], ...] = ()

    def federation_config(self) -> FederationConfig:
        return FederationConfig(
            task=self.task,
            selection="all",
            seed=self.seed,
            heartbeat_seconds=3600,  # a virtual client is seen once per phase, not on a timer
            active_window_seconds=7200,
            round_soft_deadline_seconds=self.deadline_seconds,
            round_deadline_seconds=self.deadline_seconds,
            aggregation_lease_seconds=max(60, self.deadline_seconds // 10),
        ).with_overrides(dict(self.config_overrides))


class PrecomputedUpdates:
    """A few encoded payloads and, per client, a safetensors file made of a new header
    (its own metadata) in front of one payload's tensor bytes: no per-client encoding."""

    def __init__(self, base: Mapping[str, torch.Tensor], count: int, scale: float, seed: int):
        self._payloads: list[tuple[dict[str, Any], bytes]] = []
        for i in range(max(1, count)):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
            tensors = {
                name: (t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype))
                if t.dtype.is_floating_point
                else t
                for name, t in base.items()
            }
            encoded = codec.encode(tensors)
            length = codec.header_length(encoded)
            header = json.loads(encoded[8 : 8 + length])
            header.pop("__metadata__", None)
            self._payloads.append((header, encoded[8 + length :]))

    def __len__(self) -> int:
        return len(self._payloads)

    def update(self, index: int, metadata: Mapping[str, str]) -> bytes:
        """Client ``index``'s update file, carrying ``metadata`` in its header."""
        header, data = self._payloads[index % len(self._payloads)]
        text = json.dumps({"__metadata__": dict(metadata), **header}, separators=(",", ":"))
        raw = text.encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        return struct.pack("<Q", len(raw)) + raw + data


class Counters:
    """Bytes and request counts the virtual clients move, from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, **amounts: int) -> None:
        with self._lock:
            for k, v in amounts.items():
                self.values[k] = self.values.get(k, 0) + v


@dataclass
class LoadTestResult:
    report: dict[str, Any]
    path: Path | None = None
    phases: dict[str, float | None] = field(default_factory=dict)


def dynamodb_item_size(item: Mapping[str, Any]) -> int:
    """An item's size as DynamoDB counts it against the 400 KB limit and capacity units:
    attribute names' UTF-8 bytes plus each value's size; numbers take 1 byte per two
    significant digits plus 1; lists and maps 3 bytes plus 1 per element (AWS's
    "DynamoDB item sizes and formats"). ``item`` is in the low-level AttributeValue form."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _value_size(value: Mapping[str, Any]) -> int:
    (kind, v), *_ = value.items()
    if kind == "S":
        return len(v.encode())
    if kind == "N":
        return _number_size(v)
    if kind == "B":
        return len(v)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode()) for s in v)
    if kind == "NS":
        return sum(_number_size(n) for n in v)
    if kind == "BS":
        return sum(len(b) for b in v)
    if kind == "L":
        return 3 + sum(1 + _value_size(e) for e in v)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + _value_size(e) for k, e in v.items())
    raise ValueError(f"unknown DynamoDB type {kind!r}")


def _number_size(text: str) -> int:
    digits = Decimal(text).normalize().as_tuple().digits
    significant = len(digits) if digits != (0,) else 1
    return (significant + 1) // 2 + 1


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def _phase(phases: dict[str, float | None], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - started


ProgressFn = Callable[[str], None]


def run_loadtest(options: LoadTestOptions, progress: ProgressFn | None = None) -> LoadTestResult:
    torch.set_num_threads(1)
    say = progress or (lambda _: None)
    config = options.federation_config()
    task = configured_task(config)
    log_path = options.out.with_suffix(".lambda-logs.jsonl") if options.out else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with LocalFederation(
        config,
        tick_seconds=options.tick_seconds,
        log_path=log_path,
        averager_concurrency=options.averager_concurrency,
        seed=options.seed,
    ) as federation:
        report = _run(options, task, federation, say)
    path = None
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(report, indent=2) + "\n")
        path = options.out
    return LoadTestResult(report=report, path=path, phases=report["phases"])


def _run(
    options: LoadTestOptions,
    task: TrainingTask,
    federation: LocalFederation,
    say: ProgressFn,
) -> dict[str, Any]:
    rss_start = peak_rss_bytes()
    config = federation.config
    names = federation.names
    control = federation.clients

    reference = task.build_model(seed=config.seed).state_dict()
    model_limit = size_limit(reference)
    base = codec.decode(ModelStore(control.s3, names.models_bucket).model_bytes(0))
    payloads = PrecomputedUpdates(base, options.payloads, options.perturbation, options.seed)
    params = sum(t.numel() for t in base.values())

    # One pair of clients for every virtual client: boto3 clients are thread-safe (sessions
    # are not), and building one per thread costs most of a second each.
    shared = make_clients(
        endpoint_url=federation.endpoint_url,
        session=federation.aws.session(),
        config=RETRY_CONFIG.merge(Config(max_pool_connections=options.workers)),
    )

    client_ids = [f"vc-{i:05d}" for i in range(options.clients)]
    devices: dict[str, EdgeClient] = {}

    def device(cid: str) -> EdgeClient:
        settings = federation.client_settings(
            cid,
            data_dir=Path("."),  # never read: a virtual client does not train
            task=options.task,
        )
        return EdgeClient(settings, shared, task)

    counters = Counters()
    phases: dict[str, float | None] = dict.fromkeys(PHASES)
    errors: list[str] = []
    try:
        with ThreadPoolExecutor(options.workers, thread_name_prefix="virtual-client") as pool:
            say(f"registry: {options.clients} virtual clients heartbeat")

            def register(cid: str) -> None:
                client = device(cid)
                client.heartbeat()
                devices[cid] = client

            with _phase(phases, "registry_fill"):
                list(pool.map(register, client_ids))

            say("selection: the initiator starts the round")
            with _phase(phases, "selection"):
                started = federation.start_round()
            if not started["started"]:
                raise LoadTestError(f"the initiator did not start a round: {started['reason']}")
            number = int(started["round"])
            round_started = time.perf_counter()

            def answer(index: int) -> str | None:
                client = devices[client_ids[index]]  # boto3 clients are thread-safe
                try:
                    return _answer(client, index, payloads, model_limit, counters)
                except Exception as e:  # recorded: the round's outcome shows what it cost
                    return f"{client_ids[index]}: {type(e).__name__}: {e}"

            say(f"uploads: {options.clients} virtual clients poll, download and upload")
            with _phase(phases, "uploads"):
                step = max(1, len(client_ids) // 10)
                for done, failure in enumerate(pool.map(answer, range(len(client_ids))), 1):
                    if failure is not None:
                        errors.append(failure)
                    if done % step == 0:
                        say(f"  {done} uploaded ({time.perf_counter() - round_started:.0f} s)")
            uploads_done = time.perf_counter()

        say("acceptance and aggregation: waiting for the averager")
        waited = federation.wait_for_round(
            number, timeout=options.deadline_seconds + 120, min_read_interval=0.05
        )
        if waited.left_open_at is not None:
            phases["acceptance"] = max(0.0, waited.left_open_at - uploads_done)
    finally:
        federation.stop_events()

    item = _round_item(control, names.rounds_table, config.experiment, number)
    record = from_item(item)
    summary = record.get("summary", {})
    finished_at = record.get("finished_at")
    created_at = record.get("created_at")
    phases["aggregation"] = summary.get("aggregate_seconds")
    phases["round_total"] = (
        float(finished_at) - float(created_at)
        if finished_at is not None and created_at is not None
        else time.perf_counter() - round_started
    )
    model_version = record.get("model_version")
    model_written = model_version is not None and _exists(
        control, names.models_bucket, layout.model_key(int(model_version))
    )
    size = dynamodb_item_size(item)
    return {
        "clients": options.clients,
        "task": options.task,
        "model_parameters": params,
        "model_bytes": len(codec.encode(base)),
        "payloads": len(payloads),
        "workers": options.workers,
        "averager_concurrency": options.averager_concurrency,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "round": number,
        "status": waited.status,
        "abandon_reason": record.get("abandon_reason") or None,
        "model_version": model_version,
        "model_written": model_written,
        # The round item counts its selected clients (their slots are items of their own).
        "selected": int(record.get("selected_count", len(record.get("selected", [])))),
        "participants": summary.get("participants"),
        "upload_errors": len(errors),
        "upload_error_examples": errors[:5],
        "phases": phases,
        "averager_invocations": federation.dispatcher.invocations,
        "averager_failures": federation.dispatcher.failures,
        "tick_failures": federation.averager.scheduled_failures,
        "last_tick_error": federation.averager.last_scheduled_error or None,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_bytes_at_start": rss_start,
        "bytes_up": counters.values.get("bytes_up", 0),
        "bytes_down": counters.values.get("bytes_down", 0),
        "requests": {k: v for k, v in counters.values.items() if not k.startswith("bytes")},
        "round_item_bytes": size,
        "round_item_limit_bytes": DYNAMODB_ITEM_LIMIT,
        "round_item_share_of_limit": size / DYNAMODB_ITEM_LIMIT,
        # moto (5.2.5) checks the limit on PutItem and top-level SET only, not on a nested
        # ``SET answers.#c``: an item over it here is one real DynamoDB would have refused.
        "round_item_over_limit": size > DYNAMODB_ITEM_LIMIT,
        # What the answers inside the round item take (none once they have their own items).
        "answers_in_round_item": len(item.get("answers", {}).get("M", {})),
        "round_item_answers_bytes": dynamodb_item_size({"answers": item["answers"]})
        if "answers" in item
        else 0,
        "round_item_selected_bytes": dynamodb_item_size({"selected": item["selected"]})
        if "selected" in item
        else 0,
    }


def _answer(
    client: EdgeClient,
    index: int,
    payloads: PrecomputedUpdates,
    model_limit: int,
    counters: Counters,
) -> str | None:
    """One virtual client's round: poll, download the base model, upload its update."""
    started = time.time()
    assignment: Assignment | None = client.assignment_to_answer()
    counters.add(assignment_gets=1)
    if assignment is None:
        return f"{client.settings.client_id}: not picked, or the assignment was unreadable"
    body, _ = client.models.model_body(assignment.model_key, model_limit)
    downloaded = time.time()
    metadata = codec.UpdateMetadata(
        round=assignment.round,
        client_id=client.settings.client_id,
        base_version=assignment.base_version,
        num_examples=50 + index % 50,
        metrics={"loss": 1.0 + (index % 10) / 10, "accuracy": 0.5 + (index % 5) / 10},
        timings={"download_s": downloaded - started, "train_s": 0.0, "eval_s": 0.0},
        bytes_down=len(body),
        upload_started_at=time.time(),
    )
    update = payloads.update(index, metadata.to_header())
    client.upload(assignment, update, started)
    counters.add(
        bytes_up=len(update),
        bytes_down=len(body),
        model_gets=1,
        update_puts=1,
        heartbeats=1,
    )
    return None


def _round_item(control: AwsClients, table: str, experiment: str, number: int) -> dict[str, Any]:
    """The round item as GetItem returns it (its size is what DynamoDB bills and limits)."""
    response = control.dynamodb.get_item(
        TableName=table, Key=round_key(experiment, number), ConsistentRead=True
    )
    item: dict[str, Any] = response.get("Item", {})
    return item


def _exists(control: AwsClients, bucket: str, key: str) -> bool:
    try:
        control.s3.head_object(Bucket=bucket, Key=key)
    except control.s3.exceptions.ClientError:
        return False
    return True
