"""Benchmark: participant selection, time-to-accuracy of random vs fast_clients vs utility.

    .venv/bin/python benchmarks/selection.py          # writes benchmarks/results/selection.json
    .venv/bin/python benchmarks/selection.py --e2e    # also `sfl simulate` runs (slow)

Issue 13's evidence, on digits (MNIST's files are not on the development machine). Two parts:

- **replay** (the full grid): 20 clients, half picked per round, IID and Dirichlet 0.5 / 0.1,
  log-normal client slowdowns of several sigmas, 3 seeds. Each round runs the production
  pieces in one process: the registry's arithmetic (``ClientRecord.after_round``: turnaround
  EWMA, recent picks, the accepted update's bounded utility), ``cooled_down``,
  ``clients_to_pick``, the rule with the initiator's per-round seed and policy, real local
  training of the digits CNN on the same client splits ``sfl simulate`` writes, and a
  FedAvg with the averager's bounded weights. Time is modelled, not slept: a client's
  turnaround is ``overhead + train_seconds x slowdown`` (its training cost measured once on
  this machine, its slowdown drawn as ``sfl simulate --slow-clients`` draws it) and a round
  lasts as long as its slowest pick, plus the aggregation.
- **e2e** (``--e2e``, a subset): the same rules through ``sfl simulate`` itself (moto over
  HTTP, real edge-client threads sleeping their slowdowns), wall-clock round times.

Measured and written down here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sfl.core.config import FederationConfig
from sfl.core.selection import (
    SelectionPolicy,
    clients_to_pick,
    cooled_down,
    get_selection_strategy,
    select_clients,
)
from sfl.learning.rules.bounds import bounded_weights
from sfl.learning.splits import default_client_ids, write_client_splits
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset, ClientData, TrainConfig, TrainingTask
from sfl.local.faults import FaultLog, FaultPlan, client_hooks
from sfl.state.registry import ClientRecord, statistical_utility

RESULTS = Path(__file__).parent / "results"
RULES = ("random", "fast_clients", "utility")
PARTITIONS = (("iid", 0.0), ("dirichlet", 0.5), ("dirichlet", 0.1))
TARGETS = (0.85, 0.90)
# The modelled clock, in seconds: a device's training time per example and epoch before its
# slowdown (a typical client here, ~70 examples x 2 epochs, trains for ~1.4 s: a device in
# the field, far slower than a core of this machine), its fixed costs per round (poll,
# download, upload) and the averager's aggregation.
TRAIN_SECONDS_PER_EXAMPLE_EPOCH = 0.01
CLIENT_OVERHEAD_SECONDS = 1.0
AGGREGATION_SECONDS = 0.5


@dataclass(frozen=True)
class Setting:
    partition: str
    alpha: float
    sigma: float
    seed: int
    clients: int = 20
    fraction: float = 0.5
    rounds: int = 40

    @property
    def partition_label(self) -> str:
        return "iid" if self.partition == "iid" else f"dirichlet({self.alpha:g})"


def _client_data(task: TrainingTask, setting: Setting, out: Path) -> dict[str, ClientData]:
    ids = default_client_ids(setting.clients)
    write_client_splits(
        task, out, setting.clients, setting.partition, setting.seed, alpha=setting.alpha or 0.5
    )
    return {cid: task.load_client_data(out / cid) for cid in ids}


def _slowdowns(setting: Setting, ids: Sequence[str]) -> dict[str, float]:
    """The factors `sfl simulate --slow-clients SIGMA --seed SEED` gives each client."""
    plan = FaultPlan(slow_sigma=setting.sigma, seed=setting.seed)
    return {cid: client_hooks(plan, cid, FaultLog(), threading.Event())[1] for cid in ids}


def _fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, Any]:
    total = sum(weights)
    return {
        name: sum(w * s[name] for s, w in zip(states, weights, strict=True)) / total
        if states[0][name].is_floating_point()
        else states[0][name]
        for name in states[0]
    }


def replay(
    task: TrainingTask,
    test: ArrayDataset,
    data: dict[str, ClientData],
    slowdowns: dict[str, float],
    cost: float,
    setting: Setting,
    rule: str,
    overrides: dict[str, str],
) -> dict[str, Any]:
    """One federation, round by round, with the production selection and registry maths."""
    config = FederationConfig(
        selection=rule, fraction=setting.fraction, seed=setting.seed
    ).with_overrides(overrides)
    strategy = get_selection_strategy(rule)
    records = {cid: ClientRecord(cid, last_seen=0.0, registered_at=0.0) for cid in data}
    turnaround = {
        cid: CLIENT_OVERHEAD_SECONDS + cost * len(d.train) * config.local_epochs * slowdowns[cid]
        for cid, d in data.items()
    }
    model = task.build_model(seed=config.seed)
    clock = 0.0
    rows = []
    for number in range(1, setting.rounds + 1):
        candidates = cooled_down([r.candidate() for r in records.values()], number)
        k = clients_to_pick(
            len(candidates), fraction=config.fraction, clients_per_round=config.clients_per_round
        )
        rng = random.Random(f"{config.seed}/{config.experiment}/{number}")
        policy = SelectionPolicy.from_config(config, number)
        selected = select_clients(strategy, candidates, k, rng, policy)
        base = {n: t.clone() for n, t in model.state_dict().items()}
        states, examples = [], []
        for cid in selected:
            local = task.build_model()
            local.load_state_dict(base)
            trained = task.train(
                local,
                data[cid].train,
                TrainConfig(
                    local_epochs=config.local_epochs,
                    lr=config.lr,
                    batch_size=config.batch_size,
                    seed=config.seed + number,
                ),
            )
            local_eval = task.evaluate(local, data[cid].eval)
            states.append(local.state_dict())
            examples.append(len(data[cid].train))
            metrics = {"loss": local_eval.loss, "train_loss": trained.loss}
            records[cid] = records[cid].after_round(
                number,
                answered=True,
                turnaround=turnaround[cid],
                b=config.ewma_b,
                utility=statistical_utility(metrics, len(data[cid].train), config.max_num_examples),
                pick_window=config.selection_window,
            )
        model.load_state_dict(_fedavg(states, bounded_weights(examples, config.max_weight_ratio)))
        round_seconds = max(turnaround[cid] for cid in selected) + AGGREGATION_SECONDS
        clock += round_seconds
        accuracy = task.evaluate(model, test).accuracy
        rows.append(
            {
                "round": number,
                "selected": selected,
                "round_seconds": round(round_seconds, 3),
                "elapsed_seconds": round(clock, 3),
                "accuracy": round(accuracy, 4),
            }
        )
    return summarise(rows, [s for s in slowdowns.values()])


def summarise(rows: list[dict[str, Any]], slowdowns: list[float] | None = None) -> dict[str, Any]:
    """Time-to-accuracy, round time and the spread of picks of one run's rounds."""
    accuracies = [r["accuracy"] for r in rows]
    result: dict[str, Any] = {
        "rounds": len(rows),
        "final_accuracy": accuracies[-1],
        "last5_mean_accuracy": round(statistics.fmean(accuracies[-5:]), 4),
        "round_seconds_mean": round(statistics.fmean(r["round_seconds"] for r in rows), 3),
        "total_seconds": round(rows[-1]["elapsed_seconds"], 2),
        "distinct_clients_per_10_rounds": round(
            statistics.fmean(
                len({c for r in rows[i : i + 10] for c in r["selected"]})
                for i in range(0, len(rows) - 9, 10)
            ),
            2,
        ),
        "accuracy": accuracies,
        "elapsed_seconds": [r["elapsed_seconds"] for r in rows],
    }
    for target in TARGETS:
        first = next((r for r in rows if r["accuracy"] >= target), None)
        result[f"seconds_to_{target:.2f}"] = first["elapsed_seconds"] if first else None
        result[f"rounds_to_{target:.2f}"] = first["round"] if first else None
    picks: dict[str, int] = {}
    for r in rows:
        for c in r["selected"]:
            picks[c] = picks.get(c, 0) + 1
    result["picks_min_max"] = [min(picks.values()), max(picks.values())]
    result["never_picked"] = len(slowdowns or []) - len(picks) if slowdowns else None
    return result


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and rule, over seeds: time-to-accuracy relative to random's (same seed),
    and final accuracy in points against random's."""
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for run in runs:
        key = (run["partition"], run["sigma"], run["seed"])
        by_key.setdefault(key, {})[run["rule"]] = run
    groups: dict[tuple[Any, ...], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for (partition, sigma, _), rules in by_key.items():
        baseline = rules.get("random")
        if baseline is None:
            continue
        for rule, run in rules.items():
            groups.setdefault((partition, sigma, rule), []).append((run, baseline))
    table = []
    for (partition, sigma, rule), pairs in sorted(groups.items()):
        row: dict[str, Any] = {"partition": partition, "sigma": sigma, "rule": rule}
        row["seeds"] = len(pairs)
        for target in TARGETS:
            name = f"seconds_to_{target:.2f}"
            ratios = [r[name] / b[name] for r, b in pairs if r[name] and b[name]]
            row[f"tta_{target:.2f}_ratio_mean"] = (
                round(statistics.fmean(ratios), 3) if ratios else None
            )
            row[f"tta_{target:.2f}_reached"] = f"{sum(1 for r, _ in pairs if r[name])}/{len(pairs)}"
            times = [r[name] for r, _ in pairs if r[name]]
            row[f"tta_{target:.2f}_seconds_mean"] = (
                round(statistics.fmean(times), 1) if times else None
            )
        row["final_accuracy_mean"] = round(
            statistics.fmean(r["final_accuracy"] for r, _ in pairs), 4
        )
        row["final_accuracy_vs_random_points"] = round(
            100 * statistics.fmean(r["final_accuracy"] - b["final_accuracy"] for r, b in pairs), 2
        )
        row["last5_accuracy_vs_random_points"] = round(
            100
            * statistics.fmean(
                r["last5_mean_accuracy"] - b["last5_mean_accuracy"] for r, b in pairs
            ),
            2,
        )
        row["round_seconds_ratio_mean"] = round(
            statistics.fmean(r["round_seconds_mean"] / b["round_seconds_mean"] for r, b in pairs), 3
        )
        row["distinct_clients_per_10_rounds_mean"] = round(
            statistics.fmean(r["distinct_clients_per_10_rounds"] for r, _ in pairs), 2
        )
        table.append(row)
    return table


def run_replay(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    task = load_task("digits")
    central = task.load_central_data()
    cost = args.train_cost
    overrides = dict(item.split("=", 1) for item in args.set)
    runs = []
    for seed in args.seeds:
        for partition, alpha in PARTITIONS:
            with tempfile.TemporaryDirectory() as out:
                base = Setting(partition, alpha, 0.0, seed, rounds=args.rounds)
                data = _client_data(task, base, Path(out))
            for sigma in args.sigmas:
                setting = Setting(partition, alpha, sigma, seed, rounds=args.rounds)
                slowdowns = _slowdowns(setting, list(data))
                for rule in args.rules:
                    started = time.perf_counter()
                    result = replay(
                        task, central.test, data, slowdowns, cost, setting, rule, overrides
                    )
                    row = {
                        "partition": setting.partition_label,
                        "sigma": sigma,
                        "seed": seed,
                        "rule": rule,
                        **result,
                    }
                    brief = {
                        k: v for k, v in row.items() if k not in ("accuracy", "elapsed_seconds")
                    }
                    brief["bench_seconds"] = round(time.perf_counter() - started, 1)
                    print(json.dumps(brief), flush=True)
                    runs.append(row)
    return {
        "model": {
            "clients": 20,
            "fraction": 0.5,
            "rounds": args.rounds,
            "train_seconds_per_example_epoch": cost,
            "turnaround": "client_overhead_seconds + train_seconds_per_example_epoch x "
            "examples x local_epochs x slowdown; a round: its slowest pick + aggregation_seconds",
            "client_overhead_seconds": CLIENT_OVERHEAD_SECONDS,
            "aggregation_seconds": AGGREGATION_SECONDS,
            "config": {
                k: v
                for k, v in FederationConfig().with_overrides(overrides).to_dict().items()
                if k.startswith("selection_") or k in ("ewma_b", "local_epochs", "lr", "batch_size")
            },
        },
        "summary": compare(runs),
        "runs": runs,
    }


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from sfl.local.simulate import SimulationOptions, run_simulation

    runs = []
    for seed in args.e2e_seeds:
        for rule in args.rules:
            with tempfile.TemporaryDirectory() as out:
                result = run_simulation(
                    SimulationOptions(
                        out=Path(out),
                        clients=20,
                        rounds=args.e2e_rounds,
                        fraction=0.5,
                        partition="dirichlet",
                        alpha=0.5,
                        slow_clients=args.e2e_sigma,
                        selection=rule,
                        seed=seed,
                    )
                )
            elapsed = 0.0
            rows = []
            for r in result.rounds:
                seconds = r["timings"]["total"] or 0.0
                elapsed += seconds
                rows.append(
                    {
                        "round": r["round"],
                        "selected": r["selected"],
                        "round_seconds": round(seconds, 3),
                        "elapsed_seconds": round(elapsed, 3),
                        "accuracy": r["accuracy"] if r["accuracy"] is not None else 0.0,
                    }
                )
            # Round 1 carries the simulation's one-off warm-up (every client thread importing
            # and building its first model, ~30 s here), the same for every rule: time from
            # its end is reported beside the raw sum.
            first = rows[0]["round_seconds"]
            warm = [{**r, "elapsed_seconds": round(r["elapsed_seconds"] - first, 3)} for r in rows]
            row = {
                "partition": "dirichlet(0.5)",
                "sigma": args.e2e_sigma,
                "seed": seed,
                "rule": rule,
                "wall_seconds": round(result.wall_seconds, 1),
                **summarise(rows),
                "after_round_1": {
                    k: v
                    for k, v in summarise(warm).items()
                    if k.startswith("seconds_to_") or k == "total_seconds"
                },
            }
            print(
                json.dumps(
                    {k: v for k, v in row.items() if k not in ("accuracy", "elapsed_seconds")}
                ),
                flush=True,
            )
            runs.append(row)
    after = [{**run, **run["after_round_1"]} for run in runs]
    return {
        "summary_after_round_1": compare(after),
        "command": (
            f"sfl simulate --clients 20 --rounds {args.e2e_rounds} --set fraction=0.5 "
            f"--partition dirichlet --alpha 0.5 --slow-clients {args.e2e_sigma} "
            "--set selection=RULE --seed SEED"
        ),
        "summary": compare(runs),
        "runs": runs,
    }


RULE_COLOURS = {"random": "tab:gray", "fast_clients": "tab:orange", "utility": "tab:blue"}


def plot(
    runs: list[dict[str, Any]],
    path: Path,
    title: str,
    xlabel: str,
    *,
    key: str = "rule",
    colours: dict[str, str] = RULE_COLOURS,
) -> None:
    """Accuracy over time, one panel per partition and sigma, one line per run (coloured by
    its ``key``: the rule, or another benchmark's label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(dict.fromkeys(r["partition"] for r in runs))
    sigmas = list(dict.fromkeys(r["sigma"] for r in runs))
    fig, axes = plt.subplots(
        len(partitions),
        len(sigmas),
        figsize=(4.2 * len(sigmas), 3.2 * len(partitions)),
        squeeze=False,
        sharey=True,
    )
    labelled: set[str] = set()
    for i, partition in enumerate(partitions):
        for j, sigma in enumerate(sigmas):
            ax = axes[i][j]
            for run in runs:
                if run["partition"] != partition or run["sigma"] != sigma:
                    continue
                ax.plot(
                    run["elapsed_seconds"],
                    run["accuracy"],
                    color=colours.get(run[key], "tab:green"),
                    alpha=0.7,
                    linewidth=1,
                    label=None if run[key] in labelled else run[key],
                )
                labelled.add(run[key])
            for target in TARGETS:
                ax.axhline(target, color="black", linewidth=0.5, linestyle=":")
            ax.set_ylim(0.3, 1.0)
            ax.set_title(f"{partition}, sigma {sigma:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(partitions) - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel("test accuracy")
    fig.legend(loc="upper right", fontsize=8, ncols=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="+", choices=("replay", "e2e"), default=["replay", "e2e"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--train-cost", type=float, default=TRAIN_SECONDS_PER_EXAMPLE_EPOCH)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--e2e-seeds", type=int, nargs="+", default=[5])
    parser.add_argument("--e2e-rounds", type=int, default=25)
    parser.add_argument("--e2e-sigma", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "selection.json")
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    task = "digits (MNIST's files are not on this machine)"
    outputs = []
    if "replay" in args.parts:
        started = time.perf_counter()
        report: dict[str, Any] = {
            "machine": machine,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": task,
            **run_replay(args),
        }
        report["bench_seconds"] = round(time.perf_counter() - started, 1)
        outputs.append((args.out, report, "modelled seconds"))
    if "e2e" in args.parts:
        started = time.perf_counter()
        report = {
            "machine": machine,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": task,
            **run_e2e(args),
        }
        report["bench_seconds"] = round(time.perf_counter() - started, 1)
        # Wall-clock round times depend on what else the machine runs: say how busy it was.
        report["machine"] = {**machine, "load_average_at_end": os.getloadavg()}
        e2e_out = args.out.with_name(args.out.stem + "-e2e.json")
        outputs.append((e2e_out, report, "summed round seconds (wall clock)"))
    for path, report, xlabel in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        title = f"digits, 20 clients, half picked per round ({path.stem})"
        plot(report["runs"], path.with_suffix(".png"), title, xlabel)
        for row in report["summary"]:
            print(json.dumps(row))
        print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
