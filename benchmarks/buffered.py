"""Benchmark: buffered (asynchronous) aggregation against rounds, time to accuracy.

    .venv/bin/python benchmarks/buffered.py       # writes benchmarks/results/buffered.json (+ .png)
    make bench-async                              # the same

The same device pool, the same data and the same number of devices training at once
(``concurrency``), in two modes:

- **rounds**: pick ``concurrency`` devices, wait for the slowest, one step over all of them.
- **buffered**: ``concurrency`` devices train at all times; each one that finishes is replaced
  at once by a new pick (from the idle devices, by the same selection rule), starting from the
  newest version; every ``buffer_size`` accepted updates make one step. An update that started
  ``tau`` versions ago is rebased on the current model (its change from its own base added to
  the current model), its change shrunk by ``sfl.core.staleness.staleness_factor``; more than
  ``max_staleness`` versions behind, it is refused.

Both modes run the production pieces in one process, as ``benchmarks/selection.py`` does: the
selection rules, the registry's arithmetic (``ClientRecord.after_round``), the averager's
buffered step (``sfl.server.buffer_step``: ``weigh`` caps weights at 3x the median claim,
clips changes at 2x the median change and applies the staleness factors, ``rebase`` moves
each change onto the current model, then the configured rule; a round is a buffer of updates
0 versions behind), real local training of the digits CNN on the client splits
``sfl simulate`` writes. Time is modelled, not slept: a device's
turnaround is ``overhead + train_seconds x examples x epochs x slowdown``, its slowdown
log-normal as ``sfl simulate --slow-clients SIGMA`` draws it, and a step takes the averager's
``aggregation_seconds``. Every mode runs for the modelled time that 40 rounds with random
selection take at that setting, so final accuracies are compared at equal time.

Measured and written down here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import selection
import torch
from selection import (
    AGGREGATION_SECONDS,
    CLIENT_OVERHEAD_SECONDS,
    TARGETS,
    TRAIN_SECONDS_PER_EXAMPLE_EPOCH,
    Setting,
    _client_data,
    _slowdowns,
)

from sfl.core.config import FederationConfig
from sfl.core.selection import (
    SelectionPolicy,
    cooled_down,
    get_selection_strategy,
    select_clients,
)
from sfl.learning.rules.aggregation import ListUpdates, build_rule
from sfl.learning.rules.bounds import model_norm
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset, ClientData, TrainConfig, TrainingTask
from sfl.server.acceptance import delta_norm
from sfl.server.buffer_step import rebase, weigh
from sfl.state.registry import ClientRecord, statistical_utility

RESULTS = Path(__file__).parent / "results"
PARTITIONS = (("dirichlet", 0.5), ("dirichlet", 0.1))
MODES = (
    ("rounds", "random"),
    ("rounds", "utility"),
    ("buffered", "random"),
    ("buffered", "utility"),
)

Model = dict[str, torch.Tensor]
#: An accepted update as a step reads it: (its base model, the trained model, the examples it
#: claims, how many versions behind the step it is).
Answer = tuple[Model, Model, int, int]


@dataclass(frozen=True)
class Buffered:
    """The buffered mode's settings (the federation keys of the same names)."""

    buffer_size: int = 5
    max_staleness: int = 20
    staleness_weighting: str = "polynomial"
    staleness_exponent: float = 0.5
    staleness_hinge: int = 4


@dataclass
class Run:
    """One federation's pool: its data, its devices' speeds and what the server knows."""

    task: TrainingTask
    test: ArrayDataset
    data: dict[str, ClientData]
    turnaround: dict[str, float]
    config: FederationConfig
    rule: str

    def __post_init__(self) -> None:
        self.strategy = get_selection_strategy(self.rule)
        self.records = {c: ClientRecord(c, last_seen=0.0, registered_at=0.0) for c in self.data}
        # The last step's norm bound: what a step of fewer than three updates clips to.
        self.last_bound = 0.0

    def pick(self, idle: list[str], k: int, number: int, draw: int) -> list[str]:
        """``k`` of the idle devices, by the configured rule, as the initiator picks."""
        candidates = cooled_down([self.records[c].candidate() for c in idle], number)
        rng = random.Random(f"{self.config.seed}/{self.config.experiment}/{number}/{draw}")
        policy = SelectionPolicy.from_config(self.config, number)
        return select_clients(self.strategy, candidates, min(k, len(candidates)), rng, policy)

    def train(self, cid: str, base: Model, seed: int) -> tuple[Model, float]:
        """The device's trained model from ``base``, and the utility the server measures."""
        local = self.task.build_model()
        local.load_state_dict(base)
        cfg = self.config
        trained = self.task.train(
            local,
            self.data[cid].train,
            TrainConfig(
                local_epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed
            ),
        )
        metrics = {"train_loss": trained.loss}
        utility = statistical_utility(metrics, len(self.data[cid].train), cfg.max_num_examples)
        return {n: t.detach().clone() for n, t in local.state_dict().items()}, utility or 0.0

    def answered(self, cid: str, number: int, utility: float) -> None:
        self.records[cid] = self.records[cid].after_round(
            number,
            answered=True,
            turnaround=self.turnaround[cid],
            b=self.config.ewma_b,
            utility=utility,
            pick_window=self.config.selection_window,
        )

    def step(self, current: Model, answers: list[Answer]) -> Model:
        """The averager's step (``sfl.server.buffer_step``): the answers weighed as it weighs
        a buffer's members (``weigh``), each rebased on ``current``, the configured rule."""
        weighing = weigh(
            self.config,
            [examples for _, _, examples, _ in answers],
            [delta_norm(trained, base) for base, trained, _, _ in answers],
            [tau for _, _, _, tau in answers],
            fallback=self.last_bound,
            base_norm=model_norm(current),
        )
        self.last_bound = weighing.bound if math.isfinite(weighing.bound) else 0.0
        rebased = [
            (rebase(current, base, trained, scale), weight)
            for (base, trained, _, _), weight, scale in zip(
                answers, weighing.weights, weighing.scales, strict=True
            )
        ]
        rule = build_rule(self.config.aggregation, self.config.aggregation_params)
        result = rule.aggregate(current, ListUpdates(rebased), None)
        if result is None:
            raise RuntimeError("a step of no updates")
        return result.model

    def accuracy(self, model: Model) -> float:
        net = self.task.build_model()
        net.load_state_dict(model)
        return round(self.task.evaluate(net, self.test).accuracy, 4)


def run_rounds(
    run: Run, concurrency: int, horizon: float, max_rounds: int | None = None
) -> list[dict[str, Any]]:
    """Rounds with a barrier: ``concurrency`` picks, the slowest sets the round's length;
    until ``horizon`` modelled seconds have passed, or ``max_rounds``."""
    model: Model = {
        n: t.clone() for n, t in run.task.build_model(seed=run.config.seed).state_dict().items()
    }
    clock, rows, number = 0.0, [], 0
    while clock < horizon and (max_rounds is None or number < max_rounds):
        number += 1
        picked = run.pick(list(run.data), concurrency, number, 0)
        answers: list[Answer] = []
        for cid in picked:
            trained, utility = run.train(cid, model, run.config.seed + number)
            answers.append((model, trained, len(run.data[cid].train), 0))
            run.answered(cid, number, utility)
        model = run.step(model, answers)
        clock += max(run.turnaround[c] for c in picked) + AGGREGATION_SECONDS
        rows.append(
            {"version": number, "elapsed_seconds": round(clock, 3), "accuracy": run.accuracy(model)}
        )
    return rows


def run_buffered(
    run: Run, concurrency: int, horizon: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """No barrier: ``concurrency`` devices always training, a step every ``buffer_size``."""
    config = run.config
    versions: list[Model] = [
        {n: t.clone() for n, t in run.task.build_model(seed=run.config.seed).state_dict().items()}
    ]
    # (finish time, order, client, base version, its trained model, its utility)
    training: list[tuple[float, int, str, int, Model, float]] = []
    ready_at: list[tuple[float, int]] = []  # versions being aggregated: (ready time, version)
    published = 0  # the newest version devices can download
    draws = 0
    buffer: list[Answer] = []
    staleness: list[int] = []
    refused = 0
    rows: list[dict[str, Any]] = []

    def start(now: float, k: int) -> None:
        nonlocal draws
        busy = {entry[2] for entry in training}
        idle = [c for c in run.data if c not in busy]
        for cid in run.pick(idle, k, published + 1, draws):
            draws += 1
            trained, utility = run.train(cid, versions[published], run.config.seed + draws)
            finish = now + run.turnaround[cid]
            heapq.heappush(training, (finish, draws, cid, published, trained, utility))

    start(0.0, concurrency)
    clock = 0.0
    while clock < horizon and training:
        if ready_at and ready_at[0][0] <= training[0][0]:
            clock, version = heapq.heappop(ready_at)
            published = version
            rows.append(
                {
                    "version": version,
                    "elapsed_seconds": round(clock, 3),
                    "accuracy": run.accuracy(versions[version]),
                }
            )
            continue
        clock, _, cid, base, trained, utility = heapq.heappop(training)
        newest = len(versions) - 1
        tau = newest - base
        run.answered(cid, newest + 1, utility)
        if tau > config.max_staleness:
            refused += 1
        else:
            buffer.append((versions[base], trained, len(run.data[cid].train), tau))
            staleness.append(tau)
        if len(buffer) >= config.buffer_size:
            versions.append(run.step(versions[-1], buffer))
            buffer = []
            heapq.heappush(ready_at, (clock + AGGREGATION_SECONDS, len(versions) - 1))
        start(clock, 1)
    return rows, {
        "refused_too_stale": refused,
        "staleness_mean": round(statistics.fmean(staleness), 3) if staleness else None,
        "staleness_max": max(staleness) if staleness else None,
        "updates": len(staleness),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    accuracies = [r["accuracy"] for r in rows]
    result: dict[str, Any] = {
        "versions": len(rows),
        "final_accuracy": accuracies[-1],
        "last5_mean_accuracy": round(statistics.fmean(accuracies[-5:]), 4),
        "total_seconds": rows[-1]["elapsed_seconds"],
        "accuracy": accuracies,
        "elapsed_seconds": [r["elapsed_seconds"] for r in rows],
    }
    for target in TARGETS:
        first = next((r for r in rows if r["accuracy"] >= target), None)
        result[f"seconds_to_{target:.2f}"] = first["elapsed_seconds"] if first else None
    return result


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per partition and sigma: each mode's time to accuracy as a ratio of rounds/random's
    and of rounds/utility's at the same seed, and final accuracy in points against them."""
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["partition"], run["sigma"], run["seed"]), {})[run["label"]] = run
    groups: dict[tuple[Any, ...], list[dict[str, dict[str, Any]]]] = {}
    for (partition, sigma, _), labels in by_key.items():
        groups.setdefault((partition, sigma), []).append(labels)
    table = []
    for (partition, sigma), seeds in sorted(groups.items()):
        for label in seeds[0]:
            row: dict[str, Any] = {"partition": partition, "sigma": sigma, "mode": label}
            for baseline in ("rounds/random", "rounds/utility"):
                for target in TARGETS:
                    name = f"seconds_to_{target:.2f}"
                    ratios = [
                        s[label][name] / s[baseline][name]
                        for s in seeds
                        if s[label][name] and s[baseline][name]
                    ]
                    row[f"tta_{target:.2f}_vs_{baseline}"] = (
                        round(statistics.fmean(ratios), 3) if ratios else None
                    )
                row[f"final_vs_{baseline}_points"] = round(
                    100
                    * statistics.fmean(
                        s[label]["final_accuracy"] - s[baseline]["final_accuracy"] for s in seeds
                    ),
                    2,
                )
            for target in TARGETS:
                name = f"seconds_to_{target:.2f}"
                reached = [s[label][name] for s in seeds if s[label][name]]
                row[f"tta_{target:.2f}_reached"] = f"{len(reached)}/{len(seeds)}"
                row[f"tta_{target:.2f}_seconds_mean"] = (
                    round(statistics.fmean(reached), 1) if reached else None
                )
            row["final_accuracy_mean"] = round(
                statistics.fmean(s[label]["final_accuracy"] for s in seeds), 4
            )
            table.append(row)
    return table


def _key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE``, checked when the configuration takes it (``with_overrides``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    task = load_task("digits")
    central = task.load_central_data()
    settings = Buffered(
        buffer_size=args.buffer_size,
        max_staleness=args.max_staleness,
        staleness_weighting=args.staleness_weighting,
        staleness_exponent=args.staleness_exponent,
    )
    runs = []
    for seed in args.seeds:
        for partition, alpha in PARTITIONS[: args.partitions]:
            with tempfile.TemporaryDirectory() as out:
                data = _client_data(task, Setting(partition, alpha, 0.0, seed), Path(out))
            for sigma in args.sigmas:
                setting = Setting(partition, alpha, sigma, seed)
                slowdowns = _slowdowns(setting, list(data))
                horizon = 0.0
                for mode, rule in MODES:
                    # The buffered settings are the federation keys of the same names.
                    config = FederationConfig(selection=rule, seed=seed, **settings.__dict__)
                    if mode == "buffered":
                        config = config.with_overrides(dict(args.buffered_set))
                    turnaround = {
                        cid: CLIENT_OVERHEAD_SECONDS
                        + args.train_cost * len(d.train) * config.local_epochs * slowdowns[cid]
                        for cid, d in data.items()
                    }
                    run = Run(task, central.test, data, turnaround, config, rule)
                    started = time.perf_counter()
                    extra: dict[str, Any] = {}
                    if mode == "rounds":
                        if horizon:
                            rows = run_rounds(run, args.concurrency, horizon)
                        else:
                            # rounds/random runs first: its rounds' time is every mode's.
                            rows = run_rounds(run, args.concurrency, float("inf"), args.rounds)
                            horizon = rows[-1]["elapsed_seconds"]
                    else:
                        rows, extra = run_buffered(run, args.concurrency, horizon)
                    row = {
                        "partition": setting.partition_label,
                        "sigma": sigma,
                        "seed": seed,
                        "label": f"{mode}/{rule}",
                        "horizon_seconds": horizon,
                        **extra,
                        **summarise(rows),
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
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "buffered": {**settings.__dict__, **dict(args.buffered_set)},
            "train_seconds_per_example_epoch": args.train_cost,
            "client_overhead_seconds": CLIENT_OVERHEAD_SECONDS,
            "aggregation_seconds": AGGREGATION_SECONDS,
            "horizon": "the modelled time of 40 rounds with random selection, per setting",
        },
        "summary": compare(runs),
        "runs": runs,
    }


E2E_COMMON = [
    "--clients",
    "20",
    "--partition",
    "dirichlet",
    "--alpha",
    "0.5",
    "--slow-clients",
    "1",
    "--seed",
    "5",
]
E2E_MODES = {
    "rounds": ["--rounds", "20", "--set", "fraction=0.5"],
    "buffered": ["--rounds", "40", "--set", "mode=buffered", "--set", "concurrency=10"],
}


def e2e_summary(histories: dict[str, Path]) -> dict[str, Any]:
    """Time to accuracy of ``sfl simulate`` runs, from their history files: summed round
    (version) seconds, from the start and after the first row (which carries the clients'
    one-off warm-up in rounds mode)."""
    out: dict[str, Any] = {}
    for mode, path in histories.items():
        history = json.loads(path.read_text())
        rows = history["rounds"]
        elapsed, points = 0.0, []
        for row in rows:
            elapsed += row["timings"]["total"] or 0.0
            points.append((elapsed, row["accuracy"] or 0.0))
        first = points[0][0]
        result: dict[str, Any] = {
            "command": "sfl simulate " + " ".join(E2E_COMMON + E2E_MODES[mode]),
            "rows": len(rows),
            "wall_seconds": round(history["wall_seconds"], 1),
            "final_accuracy": round(points[-1][1], 4),
        }
        for target in TARGETS:
            hit = next((t for t, a in points if a >= target), None)
            result[f"seconds_to_{target:.2f}"] = None if hit is None else round(hit, 1)
            result[f"seconds_to_{target:.2f}_after_row_1"] = (
                None if hit is None else round(hit - first, 1)
            )
        out[mode] = result
    for target in TARGETS:
        for suffix in ("", "_after_row_1"):
            name = f"seconds_to_{target:.2f}{suffix}"
            r, b = out["rounds"][name], out["buffered"][name]
            out[f"ratio_{name}"] = round(b / r, 3) if r and b else None
    return out


def run_e2e(out: Path) -> dict[str, Any]:
    """Both modes through ``sfl simulate`` (moto over HTTP, the real handlers, edge-client
    threads sleeping their slowdowns), one after the other."""
    histories = {}
    for mode, extra in E2E_MODES.items():
        folder = out / mode
        subprocess.run(
            [sys.executable, "-m", "sfl.cli.main", "simulate", *E2E_COMMON, *extra,
             "--out", str(folder)],
            check=True,
        )  # fmt: skip
        histories[mode] = folder / "history.json"
    # Wall-clock seconds depend on what else the machine runs: say how busy it was.
    return {**e2e_summary(histories), "load_average_at_end": os.getloadavg()}


LABEL_COLOURS = {
    "rounds/random": "tab:gray",
    "rounds/utility": "tab:blue",
    "buffered/random": "tab:red",
    "buffered/utility": "tab:green",
}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    title = "digits, 20 devices, 10 training at once: buffered vs rounds"
    selection.plot(runs, path, title, "modelled seconds", key="label", colours=LABEL_COLOURS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument("--partitions", type=int, default=len(PARTITIONS), choices=(1, 2))
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--buffer-size", type=int, default=Buffered.buffer_size)
    parser.add_argument("--max-staleness", type=int, default=Buffered.max_staleness)
    parser.add_argument("--staleness-weighting", default=Buffered.staleness_weighting)
    parser.add_argument("--staleness-exponent", type=float, default=Buffered.staleness_exponent)
    parser.add_argument("--train-cost", type=float, default=TRAIN_SECONDS_PER_EXAMPLE_EPOCH)
    parser.add_argument(
        "--buffered-set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a federation key for the buffered modes only, e.g. aggregation=fedavgm with "
        'aggregation_params={"server_lr": 2, "momentum": 0} (a server learning rate); '
        "rounds keep the defaults",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "buffered.json")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="instead of running: one report from reports of the same model run apart "
        "(e.g. one process per seed)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="instead of the sweep: both modes end to end through sfl simulate (~10 min)",
    )
    parser.add_argument(
        "--e2e-histories",
        type=Path,
        nargs=2,
        metavar=("ROUNDS", "BUFFERED"),
        help="instead of running: summarise the history.json of the two --e2e commands",
    )
    args = parser.parse_args()
    e2e_out = args.out.with_name(args.out.stem + "-e2e.json")
    if args.e2e or args.e2e_histories:
        if args.e2e_histories:
            rounds, buffered = args.e2e_histories
            summary = e2e_summary({"rounds": rounds, "buffered": buffered})
        else:
            with tempfile.TemporaryDirectory() as folder:
                summary = run_e2e(Path(folder))
        summary["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        e2e_out.write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        runs = [run for part in parts for run in part["runs"]]
        report: dict[str, Any] = {
            **{k: v for k, v in parts[0].items() if k not in ("runs", "summary")},
            "bench_seconds": round(sum(part["bench_seconds"] for part in parts), 1),
            "combined_from": len(parts),
            "summary": compare(runs),
            "runs": runs,
        }
    else:
        started = time.perf_counter()
        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": "digits (MNIST's files are not on this machine)",
            **sweep(args),
        }
        report["bench_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report["runs"], args.out.with_suffix(".png"))
    for row in report["summary"]:
        print(json.dumps(row))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
