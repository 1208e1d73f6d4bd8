"""Benchmark: what one junk upload costs the server, counted request by request.

    .venv/bin/python benchmarks/junk_uploads.py     # writes benchmarks/results/junk_uploads.json

A round of 3 selected clients is opened on the local endpoint (moto's server, reached over
HTTP by the unchanged boto3 code) and one client answers. Then each kind of upload that is
no answer is sent ``--uploads`` times through the real averager (``Averager.handle_update``):
from a client nobody picked, a second upload from the client that answered, one to a round
that does not exist, and one stored after the round's hard deadline. Every request the
averager's boto3 clients send is counted per operation (botocore's ``before-call`` event),
with the bytes S3 returned; the read units follow DynamoDB's rule (a strongly consistent read
is 1 unit per 4 KB of the item, and 1 for an item that is not there). Measured and written
down here, asserted in ``tests/test_junk_uploads.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.lambda_shapes import AVERAGER
from sfl.core.prices import US_EAST_1
from sfl.learning import codec
from sfl.local.emulator import LocalAws, lambda_environment, provision
from sfl.local.federation import handler_environment
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.server.notifications import UpdateEvent
from sfl.state.dynamo import from_item
from sfl.state.registry import ClientRegistry
from sfl.state.rounds.keys import round_key

RESULTS = Path(__file__).parent / "results" / "junk_uploads.json"
MODEL = {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5, -0.5]}
# What one averager invocation on a junk event is assumed to take (warm container): the
# local figure below is moto's over loopback HTTP, not Lambda's; this is the price basis.
ASSUMED_LAMBDA_SECONDS = 0.05


class Counting:
    """Requests per ``service:Operation`` and bytes S3 returned, on the given clients."""

    def __init__(self, *clients: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.s3_bytes = 0
        for client in clients:
            client.meta.events.register("before-call.*.*", self._count)
            client.meta.events.register("after-call.s3.GetObject", self._bytes)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[f"{model.service_model.service_name}:{model.name}"] += 1

    def _bytes(self, parsed: Any, **_: Any) -> None:
        self.s3_bytes += int(parsed.get("ContentLength", 0) or 0)

    def reset(self) -> None:
        self.calls.clear()
        self.s3_bytes = 0


def _item_bytes(item: dict[str, Any]) -> int:
    """An upper bound of DynamoDB's item size: its JSON, names and values as UTF-8."""
    return len(json.dumps(from_item(item), default=str).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=50, help="uploads of each kind")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    tensors = {k: torch.tensor(v) for k, v in MODEL.items()}
    config = FederationConfig(
        experiment="junk",
        selection="all",
        quorum="all_answered",
        round_soft_deadline_seconds=60,
        round_deadline_seconds=120,
    )
    now = [time.time()]
    with LocalAws() as aws:
        deployment = provision(aws)
        names = deployment.names
        clients = aws.clients()
        with lambda_environment(handler_environment(aws, names, config)):
            clients.s3.put_object(
                Bucket=names.models_bucket,
                Key=layout.model_key(0),
                Body=codec.encode_model(tensors, version=0),
            )
            registry = ClientRegistry(clients.dynamodb, names.clients_table)
            for client in ("a", "b", "c"):
                registry.heartbeat(client, now=now[0], active_window_seconds=3600)
            assert start_round(clients, names, config, clock=lambda: now[0]).started
            registry.heartbeat("flooder", now=now[0], active_window_seconds=3600)
            averager = Averager(clients, names, config, clock=lambda: now[0])
            trained = {k: v * 2 for k, v in tensors.items()}
            meta = codec.UpdateMetadata(round=1, client_id="a", base_version=0, num_examples=10)
            body = codec.encode(trained, meta.to_header())
            put = clients.s3.put_object(
                Bucket=names.updates_bucket, Key=layout.update_key("a", 1), Body=body
            )
            answered = averager.handle_update(
                UpdateEvent(names.updates_bucket, layout.update_key("a", 1), len(body), put["ETag"])
            )
            assert answered.result == "accepted", answered
            round_item = clients.dynamodb.get_item(
                TableName=names.rounds_table, Key=round_key("junk", 1), ConsistentRead=True
            )["Item"]
            counting = Counting(clients.s3, clients.dynamodb)
            kinds = {
                "not_selected": ("flooder", 1, 0.0),
                "duplicate": ("a", 1, 0.0),
                "unknown_round": ("flooder", 999, 0.0),
                "past_deadline": ("b", 1, 121.0),
            }
            rows = []
            for kind, (client, number, later) in kinds.items():
                now[0] += later
                counting.reset()
                started = time.perf_counter()
                for i in range(args.uploads):
                    junk = f"junk {i} ".encode() * 1000
                    key = layout.update_key(client, number)
                    etag = clients.s3.put_object(Bucket=names.updates_bucket, Key=key, Body=junk)[
                        "ETag"
                    ]
                    outcome = averager.handle_update(
                        UpdateEvent(names.updates_bucket, key, len(junk), etag, now[0])
                    )
                    assert outcome.reason == kind, outcome
                local_seconds = (time.perf_counter() - started) / args.uploads
                calls = {
                    op: n / args.uploads
                    for op, n in sorted(counting.calls.items())
                    if op != "s3:PutObject"  # the device's own upload, not the server's
                }
                rows.append(
                    {
                        "kind": kind,
                        "uploads": args.uploads,
                        "requests_per_upload": calls,
                        "dynamodb_writes_per_upload": sum(
                            n
                            for op, n in calls.items()
                            if op.split(":")[1]
                            in {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems"}
                        ),
                        "s3_bytes_read_per_upload": counting.s3_bytes / args.uploads,
                        "local_seconds_per_upload": round(local_seconds, 4),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            after = clients.dynamodb.get_item(
                TableName=names.rounds_table, Key=round_key("junk", 1), ConsistentRead=True
            )["Item"]
    size = _item_bytes(round_item)
    reads = math.ceil(size / 4096) + 1  # the round item, and the slot (1 unit, there or not)
    price = {k: US_EAST_1[k].unit_price for k in US_EAST_1}
    lambda_per_million = 1e6 * (
        price["lambda_request"]
        + price["lambda_gb_second_x86_64"] * AVERAGER.memory_mb / 1024 * ASSUMED_LAMBDA_SECONDS
    )
    result = {
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "round_item_bytes_at_most": size,
        "round_item_unchanged_by_junk": after == round_item,
        "read_request_units_per_upload": reads,
        "dollars_per_million_junk_uploads": {
            "dynamodb_reads": round(1e6 * reads * price["dynamodb_read_request_unit"], 3),
            "s3_put_billed_to_the_account": round(1e6 * price["s3_put_copy_post_list"], 2),
            "s3_delete": 0.0,  # S3 does not charge for DELETE requests
            "lambda": round(lambda_per_million, 2),
            "lambda_assumes": f"{ASSUMED_LAMBDA_SECONDS} s at {AVERAGER.memory_mb} MB x86_64",
        },
        "before_issue_20": {
            "dynamodb_writes_per_upload": "2 UpdateItem on the round item (~6 WCU)",
        },
        "kinds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "kinds"}, indent=2))


if __name__ == "__main__":
    main()
