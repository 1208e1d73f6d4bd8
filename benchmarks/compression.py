"""Benchmark: bytes saved vs accuracy lost, per update codec (``update_codec``).

    nice -n 10 .venv/bin/python benchmarks/compression.py
        # writes benchmarks/results/compression.json and prints a table

Federated training as a loop (every client trains from the global model; FedAvg), where each
client's update goes through exactly what a device and the averager do with it: the edge
client's ``encode_update`` (with the update's metadata) makes the upload bytes, whose size is
recorded, and the averager's ``decode_update`` (with all its checks, against the round's
codec) turns them back into tensors for the aggregation. S3, DynamoDB and the bounds are left
out: they do not depend on the codec, and the loop keeps the benchmark within minutes.
The same seeds, data split and local training for every codec, so the accuracy difference
is the codec's. Measured and written down, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sfl.learning.codec import UpdateMetadata
from sfl.learning.compression import UpdateCodec, decode_update, encode_update
from sfl.learning.rules.aggregation import ListUpdates, build_rule
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ClientData, TrainConfig

RESULTS = Path(__file__).parent / "results"
CODECS: dict[str, UpdateCodec] = {
    "none": UpdateCodec("none"),
    "fp16": UpdateCodec("fp16"),
    "int8": UpdateCodec("int8"),
    "topk_0.1": UpdateCodec("topk", 0.1),
    "topk_0.01": UpdateCodec("topk", 0.01),
}


def client_data(task_name: str, clients: int, seed: int) -> list[ClientData]:
    task = load_task(task_name)
    with tempfile.TemporaryDirectory() as data_dir:
        ids = [f"client-{i:03d}" for i in range(clients)]
        write_client_splits(task, Path(data_dir), clients, "iid", seed, client_ids=ids)
        return [task.load_client_data(Path(data_dir) / cid) for cid in ids]


def run(
    task_name: str, codec: UpdateCodec, data: list[ClientData], rounds: int, seed: int, args: Any
) -> dict[str, Any]:
    """One federated run: accuracy per round and the size of every upload."""
    task = load_task(task_name)
    test = task.load_central_data().test
    epochs = getattr(args, f"{task_name}_local_epochs")
    rule = build_rule("fedavg", "{}")
    model = task.build_model(seed)
    sizes: list[int] = []
    accuracies: list[float] = []
    started = time.perf_counter()
    for number in range(1, rounds + 1):
        config = TrainConfig(epochs, args.lr, args.batch_size, seed=seed + number)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        decoded = []
        for i, client in enumerate(data):
            model.load_state_dict(base)
            metrics = task.train(model, client.train, config)
            metadata = UpdateMetadata(
                round=number,
                client_id=f"client-{i:03d}",
                base_version=number - 1,
                num_examples=metrics.num_examples,
                metrics={"loss": metrics.loss, "accuracy": metrics.accuracy},
                timings={"download_s": 0.1, "train_s": 1.0, "eval_s": 0.1},
                bytes_down=1,
                upload_started_at=time.time(),
            )
            upload = encode_update(model.state_dict(), base, codec, metadata.to_header())
            sizes.append(len(upload))
            tensors = decode_update(upload, base, codec=codec)
            decoded.append((tensors, float(metrics.num_examples)))
        result = rule.aggregate(base, ListUpdates(decoded), None)
        assert result is not None
        model.load_state_dict(result.model)
        with torch.no_grad():
            accuracies.append(task.evaluate(model, test).accuracy)
    return {
        "seed": seed,
        "final_accuracy": round(accuracies[-1], 4),
        "accuracy_per_round": [round(a, 4) for a in accuracies],
        "bytes_per_update": statistics.mean(sizes),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per codec, over the seeds every codec has finished: mean size and accuracy vs none."""
    seeds = set.intersection(*({r["seed"] for r in rows} for rows in runs.values()))
    runs = {name: [r for r in rows if r["seed"] in seeds] for name, rows in runs.items()}
    if not seeds or "none" not in runs:
        return {}
    none_bytes = statistics.mean(r["bytes_per_update"] for r in runs["none"])
    none_acc = statistics.mean(r["final_accuracy"] for r in runs["none"])
    out = {}
    for name, rows in runs.items():
        size = statistics.mean(r["bytes_per_update"] for r in rows)
        accuracy = statistics.mean(r["final_accuracy"] for r in rows)
        out[name] = {
            "bytes_per_update": round(size),
            "size_vs_none": round(size / none_bytes, 4),
            "final_accuracy_mean": round(accuracy, 4),
            "final_accuracy_by_seed": [r["final_accuracy"] for r in rows],
            "accuracy_change_vs_none": round(accuracy - none_acc, 4),
        }
    return out


def table(report: dict[str, Any]) -> str:
    lines = []
    for task_name, result in report["tasks"].items():
        setup = result["setup"]
        lines.append(
            f"\n{task_name}: {setup['clients']} clients, {setup['rounds']} rounds, "
            f"seeds {setup['seeds']}, FedAvg, iid"
        )
        lines.append("| codec | bytes per update | size vs none | final accuracy | vs none |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, row in result["summary"].items():
            lines.append(
                f"| {name} | {row['bytes_per_update']:,} | {row['size_vs_none']:.3f} "
                f"| {row['final_accuracy_mean']:.4f} | {row['accuracy_change_vs_none']:+.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--digits-rounds", type=int, default=12)
    parser.add_argument("--digits-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mnist-rounds", type=int, default=3)
    parser.add_argument("--mnist-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--digits-local-epochs", type=int, default=2)
    parser.add_argument("--mnist-local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS))
    parser.add_argument("--out", type=Path, default=RESULTS / "compression.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "method": "in-memory FedAvg loop; every update encoded by encode_update and decoded "
        "(validated) by decode_update; bytes are the encoded uploads' sizes",
        "tasks": {},
    }
    for task_name in args.tasks:
        rounds = args.digits_rounds if task_name == "digits" else args.mnist_rounds
        seeds = args.digits_seeds if task_name == "digits" else args.mnist_seeds
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.codecs}
        for seed in seeds:
            data = client_data(task_name, args.clients, seed)
            for name in args.codecs:
                row = run(task_name, CODECS[name], data, rounds, seed, args)
                runs[name].append(row)
                print(
                    json.dumps({"task": task_name, "codec": name, **row}, default=str)[:300],
                    flush=True,
                )
                # Written after every run: a long benchmark stopped early keeps what it measured.
                report["tasks"][task_name] = {
                    "setup": {
                        "clients": args.clients,
                        "rounds": rounds,
                        "seeds": sorted({r["seed"] for r in runs[args.codecs[-1]]}),
                        "local_epochs": getattr(args, f"{task_name}_local_epochs"),
                        "lr": args.lr,
                        "batch_size": args.batch_size,
                        "partition": "iid",
                        "codecs": {n: vars(CODECS[n]) for n in args.codecs},
                    },
                    "summary": summarise(runs),
                    "runs": runs,
                }
                write(report, args.out)


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    out.with_suffix(".md").write_text(text.lstrip() + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
