"""Benchmark: a real-size model end to end, locally, with and without int8 updates.

    nice -n 10 .venv/bin/python benchmarks/real_model.py  # -> benchmarks/results/real_model.json

Synthetic image folders (``sfl dataset images``) are dealt out to 10 clients and trained
through the local simulation (``sfl.local.simulate``: moto's S3 and DynamoDB over HTTP, both
Lambda handlers in-process, real ``EdgeClient`` loops in worker processes) with the built-in
``image_folder`` task and a torchvision architecture (``resnet18`` by default, 11.2 M
parameters with 10 classes), once with plain float32 updates and once with int8 deltas.

Per round: wall time (``timings.total``), bytes up and down, and the dollars the simulation
prices each round at (``sfl.core.cost``). Memory, as peak resident sets:

- a client: a fresh process doing one device's round (read its class folders, build the
  model, train, encode the update with the run's codec), its ``VmHWM``;
- the averager: after each round, the averager's own aggregation of that round
  (``sfl.server.aggregation.aggregate`` over the round's accepted updates, read from the
  local S3 as on AWS, with the configured read-ahead) replayed in a fresh process, its
  ``VmHWM``; against the Lambda's configured memory. (The replay finds the version already
  written and keeps it, as a retried aggregation does.)
- this process, for the record: moto's S3 (every model and update), both handlers and the
  driver, but no client (they run in worker processes), sampled every 10 ms.

Measured and written down, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memory import PeakSampler, resident_bytes

from sfl.core.lambda_shapes import AVERAGER
from sfl.local.simulate import SimulationOptions, run_simulation
from sfl.local.synthetic_images import write_image_folders

RESULTS = Path(__file__).parent / "results" / "real_model.json"
MIB = 2**20

# One device's round in a fresh process: what its peak resident memory is.
CLIENT_ROUND = """
import json, sys, time
import torch
from sfl.core.compressed_layout import UpdateCodec
from sfl.learning.compression import encode_update
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import TrainConfig

def peak_kib():
    # VmHWM starts afresh at exec; ru_maxrss would count the parent's memory at fork.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

params, data_dir, codec, epochs, lr, batch = sys.argv[1:7]
torch.set_num_threads(1)
started = time.perf_counter()
task = load_task("image_folder", params)
data = task.load_client_data(data_dir)
model = task.build_model(seed=0)
base = {k: v.detach().clone() for k, v in model.state_dict().items()}
metrics = task.train(model, data.train, TrainConfig(int(epochs), float(lr), int(batch)))
body = encode_update(model.state_dict(), base, UpdateCodec(codec), {"num_examples": "1"})
print(json.dumps({
    "peak_rss_mib": round(peak_kib() / 1024, 1),
    "train_examples": len(data.train),
    "update_mib": round(len(body) / 2**20, 2),
    "seconds": round(time.perf_counter() - started, 2),
}))
"""


# The averager's aggregation of one finished round, in a fresh process that reaches the local
# endpoint with the handlers' environment.
AVERAGER_ROUND = """
import json, os, sys, time
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.server.aggregation import aggregate
from sfl.server.context import AveragerContext
from sfl.state.aws import make_clients

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

number = int(sys.argv[1])
config = FederationConfig.from_env(os.environ)
aws = make_clients(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
ctx = AveragerContext.build(aws, ResourceNames.from_env(), config)
round_ = ctx.rounds.get(config.experiment, number)
before = peak_kib()
started = time.perf_counter()
done = aggregate(ctx, round_)
print(json.dumps({
    "round": number,
    "participants": done.summary["participants"] if done else 0,
    "peak_rss_mib": round(peak_kib() / 1024, 1),
    "peak_before_aggregating_mib": round(before / 1024, 1),
    "seconds": round(time.perf_counter() - started, 2),
}))
"""


def averager_round(number: int) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", AVERAGER_ROUND, str(number)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),  # the handlers' environment, set by the running federation
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def client_round(params: str, data_dir: Path, codec: str, args: argparse.Namespace) -> Any:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT_ROUND,
            params,
            str(data_dir),
            codec,
            str(args.local_epochs),
            str(args.lr),
            str(args.batch_size),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(codec: str, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    params = json.dumps(
        {
            "root": str(images),
            "architecture": args.architecture,
            "num_classes": args.classes,
            "image_size": args.size,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        options = SimulationOptions(
            out=out,
            clients=args.clients,
            rounds=args.rounds,
            task="image_folder",
            task_params=params,
            partition="iid",
            local_epochs=args.local_epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            soft_deadline_seconds=600,
            round_timeout_seconds=900,
            lease_seconds=300,
            client_processes=args.client_processes,
            config_overrides=(("update_codec", codec),),
        )
        before = resident_bytes()
        started = time.perf_counter()
        replays: list[Any] = []
        replay_seconds = 0.0

        def replay(row: dict[str, Any]) -> None:
            nonlocal replay_seconds
            if row["status"] == "CLOSED":
                t = time.perf_counter()
                replays.append(averager_round(row["round"]))
                replay_seconds += time.perf_counter() - t

        with PeakSampler() as sampler:
            result = run_simulation(options, progress=replay)
        wall = time.perf_counter() - started - replay_seconds
        client = client_round(params, out / "data" / "client-00", codec, args)
    rows = result.rounds
    return {
        "update_codec": codec,
        "wall_seconds": round(wall, 1),
        "initial_accuracy": result.initial_accuracy,
        "rounds": [
            {
                "round": r["round"],
                "status": r["status"],
                "accepted": len(r["accepted"]),
                "accuracy": r["accuracy"],
                "round_seconds": _round(r["timings"]["total"]),
                "train_seconds_slowest": _round(r["timings"]["train"]),
                "aggregate_seconds": _round(r["timings"]["aggregate"]),
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
                "dollars": (r["cost"] or {}).get("usd"),
            }
            for r in rows
        ],
        "client": client,
        "averager": {
            "replayed_rounds": replays,
            "peak_rss_mib": max((r["peak_rss_mib"] for r in replays), default=None),
            "lambda_memory_mib": AVERAGER.memory_mb,
        },
        "simulation_process": {
            "peak_rss_mib": round(sampler.peak / MIB, 1),
            "rss_before_mib": round(before / MIB, 1),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=32, help="image side, pixels")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        write_image_folders(
            images, num_classes=args.classes, per_class=args.per_class, size=args.size
        )
        for codec in args.codecs:
            run = measure(codec, images, args)
            print(json.dumps(run), flush=True)
            runs.append(run)
    import torch

    from sfl.learning.tasks import load_task

    model = load_task(
        "image_folder", {"architecture": args.architecture, "num_classes": args.classes}
    ).build_model()
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setup": {
            "architecture": args.architecture,
            "parameters": sum(p.numel() for p in model.parameters()),
            "clients": args.clients,
            "rounds": args.rounds,
            "images": f"{args.classes} classes x {args.per_class}, {args.size}x{args.size} px",
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "client_processes": args.client_processes,
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
