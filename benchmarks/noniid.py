"""Benchmark: server optimisers and FedProx on non-IID data, against in-memory FedAvg.

    .venv/bin/python benchmarks/noniid.py
        # writes benchmarks/results/noniid.json and noniid.png

Digits with the seed's MLP shape (``digits_mlp``), 10 clients, two partitions: one label
per client (label shards) and Dirichlet(0.1). For each, ``sfl simulate`` runs FedAvg,
FedAvgM, FedAdam and FedProx (FedAvg with the proximal term) through the whole protocol, and
a plain in-memory FedAvg loop (the same task, data split, local training and seeds; no S3,
no bounds) gives the reference. Recorded: test accuracy per round, and the first round each
run reaches 0.90. ``--in-memory`` runs every rule as the loop instead (quick tuning).
Measured and written down, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sfl.learning.rules.aggregation import ListUpdates, build_rule
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import TrainConfig
from sfl.local.simulate import SimulationOptions, run_simulation

RESULTS = Path(__file__).parent / "results"
TARGET = 0.90
PARTITIONS = {
    "one_label": {"partition": "shards", "labels_per_client": 1},
    "dirichlet_0.1": {"partition": "dirichlet", "alpha": 0.1},
}
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "fedavg": (("aggregation", "fedavg"),),
    "fedavgm": (("aggregation", "fedavgm"),),
    "fedadam": (("aggregation", "fedadam"),),
    "fedprox": (("aggregation", "fedavg"), ("proximal_mu", "0.01")),
}


def first_round_at(accuracies: list[float | None], target: float) -> int | None:
    for number, accuracy in enumerate(accuracies, start=1):
        if accuracy is not None and accuracy >= target:
            return number
    return None


def protocol_run(
    label: str, partition: dict[str, Any], overrides: tuple[tuple[str, str], ...], args: Any
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_simulation(
            SimulationOptions(
                out=Path(out),
                clients=args.clients,
                rounds=args.rounds,
                seed=args.seed,
                task=args.task,
                local_epochs=args.local_epochs,
                lr=args.lr,
                config_overrides=overrides,
                **partition,
            )
        )
        wall = time.perf_counter() - started
    accuracies = [r["accuracy"] for r in result.rounds]
    return _row(label, accuracies, wall)


def in_memory(
    partition: dict[str, Any],
    args: Any,
    label: str = "in_memory_fedavg",
    overrides: tuple[tuple[str, str], ...] = (("aggregation", "fedavg"),),
) -> dict[str, Any]:
    """Federated training as a for-loop: every client trains from the global model and the
    rule combines their models (carrying its server state), with no S3, no protocol and no
    bounds. With FedAvg, the reference; with another rule, a quick way to tune it."""
    settings = dict(overrides)
    rule = build_rule(
        settings.get("aggregation", "fedavg"), settings.get("aggregation_params", "{}")
    )
    mu = float(settings.get("proximal_mu", 0.0))
    task = load_task(args.task)
    test = task.load_central_data().test
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as data_dir:
        ids = [f"client-{i:03d}" for i in range(args.clients)]
        write_client_splits(
            task,
            Path(data_dir),
            args.clients,
            partition["partition"],
            args.seed,
            alpha=partition.get("alpha", 0.5),
            labels_per_client=partition.get("labels_per_client", 2),
            client_ids=ids,
        )
        data = [task.load_client_data(Path(data_dir) / cid) for cid in ids]
    model = task.build_model(args.seed)
    state = None
    accuracies: list[float | None] = []
    for number in range(1, args.rounds + 1):
        config = TrainConfig(
            local_epochs=args.local_epochs,
            lr=args.lr,
            batch_size=16,
            seed=args.seed + number,
            proximal_mu=mu,
        )
        base = {k: v.clone() for k, v in model.state_dict().items()}
        trained = []
        for client in data:
            model.load_state_dict(base)
            metrics = task.train(model, client.train, config)
            state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trained.append((state_dict, float(metrics.num_examples)))
        result = rule.aggregate(base, ListUpdates(trained), state)
        assert result is not None
        state = result.state
        model.load_state_dict(result.model)
        with torch.no_grad():
            accuracies.append(task.evaluate(model, test).accuracy)
    return _row(label, accuracies, time.perf_counter() - started)


def _row(label: str, accuracies: list[float | None], wall: float) -> dict[str, Any]:
    row = {
        "run": label,
        "rounds_to_0.90": first_round_at(accuracies, TARGET),
        "final_accuracy": accuracies[-1],
        "best_accuracy": max((a for a in accuracies if a is not None), default=None),
        "wall_seconds": round(wall, 1),
        "accuracy_per_round": [None if a is None else round(a, 4) for a in accuracies],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "accuracy_per_round"}), flush=True)
    return row


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["partitions"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for row in report["partitions"][name]:
            curve = row["accuracy_per_round"]
            style = "--" if row["run"] == "in_memory_fedavg" else "-"
            ax.plot(range(1, len(curve) + 1), curve, style, label=row["run"])
        ax.axhline(TARGET, color="grey", linewidth=0.8)
        ax.set_title(f"{report['setup']['task']}, 10 clients, {name}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=45)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS))
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--task", default="digits_mlp")
    parser.add_argument(
        "--in-memory", action="store_true", help="every rule as a for-loop (quick tuning)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "noniid.json")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {
            "task": args.task,
            "clients": args.clients,
            "rounds": args.rounds,
            "seed": args.seed,
            "local_epochs": args.local_epochs,
            "lr": args.lr,
            "client_momentum": 0.9,
            "rules": {name: dict(RULES[name]) for name in args.rules},
        },
        "partitions": {},
    }
    for name in args.partitions:
        partition = PARTITIONS[name]
        rows = [in_memory(partition, args)]
        for rule in args.rules:
            if args.in_memory:
                rows.append(in_memory(partition, args, f"in_memory_{rule}", RULES[rule]))
            else:
                rows.append(protocol_run(rule, partition, RULES[rule], args))
            report["partitions"][name] = rows
            report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
