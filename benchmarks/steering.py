"""Benchmark: how far one device at both bounds steers a round, by the round's size.

    .venv/bin/python benchmarks/steering.py     # writes benchmarks/results/steering.json

Issue 20's measure. One device of n claims the most examples (10,000,000) and sends a change
of any norm in a chosen direction; the rest are honest. The "step" is the new model's move
along the honest direction, 1.00 being the all-honest round's (the same n devices, the
attacker honest), through the averager's own bounding (``sfl.learning.rules.bounds``) and
FedAvg, for n = 3, 4, 5, 7, 10, 20:

- ``uniform``: honest devices with equal claims and the same unit change (the arithmetic
  model: the step is (n-1 - r f) / (n-1 + r) for weight cap r and clip f);
- ``digits``: real training deltas (digits, Dirichlet 0.5, 2 local epochs, the first round
  and the fourth, seeds 0 and 1), the worst case over which device attacks, in two
  directions: ``reversed_own`` (-10x its own change, as ``--attack steer``) and ``worst``
  (against the all-honest step itself).

Then ``--attack steer`` end to end (5 clients, 1 attacker, digits, 10 rounds, seed 0) with the
default bounds and with the old ones (3x / 2x), and clean. Measured, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sfl.core.config import FederationConfig
from sfl.learning.rules.aggregation import fedavg
from sfl.learning.rules.bounds import bounded_round
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import TrainConfig
from sfl.local.simulate import SimulationOptions, run_simulation

RESULTS = Path(__file__).parent / "results" / "steering.json"
SIZES = (3, 4, 5, 7, 10, 20)
CLAIM = 10_000_000
OLD_BOUNDS = (("max_weight_ratio", "3"), ("norm_bound_factor", "2"))
Tensors = dict[str, torch.Tensor]
Round = tuple[Tensors, list[tuple[Tensors, int]]]


def aggregate(
    base: Mapping[str, torch.Tensor],
    updates: Sequence[tuple[Mapping[str, torch.Tensor], int]],
    ratio: float,
    factor: float,
) -> Tensors:
    result = fedavg(bounded_round(updates, base, max_ratio=ratio, factor=factor))
    assert result is not None
    return result


def along(
    base: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], direction: Tensors
) -> float:
    """``model - base`` projected on ``direction``, over float tensors."""
    return sum(
        float(((model[k].double() - base[k].double()) * direction[k]).sum()) for k in direction
    )


def step(
    base: Tensors,
    honest: list[tuple[Tensors, int]],
    attacker: int,
    attack: Callable[[Tensors, Tensors], Tensors],
    ratio: float,
    factor: float,
) -> float:
    """The attacked round's step along the all-honest round's, 1.0 being the latter."""
    clean = aggregate(base, honest, ratio, factor)
    direction = {
        k: clean[k].double() - base[k].double() for k in base if base[k].dtype.is_floating_point
    }
    norm2 = sum(float((d * d).sum()) for d in direction.values())
    own = {k: honest[attacker][0][k].double() - base[k].double() for k in direction}
    sent = attack(own, direction)
    hostile = {k: (base[k].double() + sent[k]).to(base[k].dtype) for k in direction}
    updates = list(honest)
    updates[attacker] = (hostile, CLAIM)
    return along(base, aggregate(base, updates, ratio, factor), direction) / norm2


ATTACKS: dict[str, Callable[[Tensors, Tensors], Tensors]] = {
    "reversed_own": lambda own, d: {k: -10.0 * v for k, v in own.items()},
    "worst": lambda own, d: {k: -1000.0 * v for k, v in d.items()},
}


def uniform_round(n: int) -> Round:
    base = {"w": torch.zeros(8)}
    change = torch.zeros(8)
    change[0] = 1.0
    return base, [({"w": change.clone()}, 100) for _ in range(n)]


def digits_round(n: int, seed: int, rounds_before: int) -> Round:
    """Real first-round (or later) updates of n digits clients, trained as devices train."""
    task = load_task("digits")
    with tempfile.TemporaryDirectory() as d:
        ids = [f"client-{i:03d}" for i in range(n)]
        write_client_splits(task, Path(d), n, "dirichlet", seed, alpha=0.5, client_ids=ids)
        data = [task.load_client_data(Path(d) / c) for c in ids]
    model = task.build_model(seed)
    for number in range(rounds_before + 1):
        base = {k: v.clone() for k, v in model.state_dict().items()}
        config = TrainConfig(local_epochs=2, lr=0.05, batch_size=16, seed=seed + number + 1)
        trained = []
        for client in data:
            model.load_state_dict(base)
            metrics = task.train(model, client.train, config)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trained.append((state, metrics.num_examples))
        model.load_state_dict(aggregate(base, trained, 1e6, 0.0))
    return base, trained


def step_table(
    bounds: dict[str, tuple[float, float]], seeds: Sequence[int], stages: Sequence[int]
) -> list[dict[str, Any]]:
    rows = []
    for n in SIZES:
        base, honest = uniform_round(n)
        row: dict[str, Any] = {"clients": n, "updates": "uniform"}
        for label, (ratio, factor) in bounds.items():
            row[label] = round(step(base, honest, 0, ATTACKS["worst"], ratio, factor), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        for seed in seeds:
            for before in stages:
                base, honest = digits_round(n, seed, before)
                row = {"clients": n, "updates": f"digits seed {seed} round {before + 1}"}
                for label, (ratio, factor) in bounds.items():
                    for name, attack in ATTACKS.items():
                        row[f"{label} {name}"] = round(
                            min(step(base, honest, a, attack, ratio, factor) for a in range(n)),
                            3,
                        )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def end_to_end(label: str, **options: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_simulation(SimulationOptions(out=Path(out), **options))
        wall = time.perf_counter() - started
    accuracies = [r["accuracy"] for r in result.rounds if r["accuracy"] is not None]
    row = {
        "run": label,
        "final_accuracy": round(accuracies[-1], 4) if accuracies else None,
        "closed_rounds": sum(r["status"] == "CLOSED" for r in result.rounds),
        "wall_seconds": round(wall, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--rounds-before",
        type=int,
        nargs="+",
        default=[0, 3],
        help="FedAvg rounds trained before the measured one (0: the first round)",
    )
    parser.add_argument("--skip-runs", action="store_true", help="the step table only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    defaults = FederationConfig()
    bounds = {
        "default": (defaults.max_weight_ratio, defaults.norm_bound_factor),
        "old 3x/2x": (3.0, 2.0),
    }
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bounds": {
            label: {"max_weight_ratio": r, "norm_bound_factor": f}
            for label, (r, f) in bounds.items()
        },
        "steps": step_table(bounds, args.seeds, args.rounds_before),
    }
    if not args.skip_runs:
        five = {"clients": 5, "rounds": 10, "seed": 0}
        report["runs"] = [
            end_to_end("steer, default bounds", attackers=1, attack="steer", **five),
            end_to_end(
                "steer, old bounds 3x/2x",
                attackers=1,
                attack="steer",
                config_overrides=OLD_BOUNDS,
                **five,
            ),
            end_to_end("clean, default bounds", **five),
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
